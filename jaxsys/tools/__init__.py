"""Tools that read a compiled program: the planner (`jaxsys plan`), HLO collective statistics,
and the roofline estimate (numbers from `jaxsys.config.hardware`); and `plot`, the loss curves of
runs' metrics.jsonl (`jaxsys plot`, `<run_dir>/curves.png`); and `scaling`, the Chinchilla
L(N, D) fit and its compute-optimal frontier (`experiments/scaling_laws.py`).
"""
