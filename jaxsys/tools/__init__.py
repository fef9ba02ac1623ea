"""Tools that read a compiled program: the planner (`jaxsys plan`), HLO collective statistics,
and the roofline estimate (numbers from `jaxsys.config.hardware`).
"""
