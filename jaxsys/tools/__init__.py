"""Tools that read a compiled program: the planner (`jaxsys plan`), HLO collective statistics,
and the roofline estimate (numbers from `jaxsys.config.hardware`); and `plot`, the loss curves of
runs' metrics.jsonl (`jaxsys plot`, `<run_dir>/curves.png`).
"""
