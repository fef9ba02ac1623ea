"""Pipeline parallelism: schedules as data, compiled to a program, run by one executor.

- `schedules`: GPipe, 1F1B, interleaved 1F1B and ZB-H1 tables, and `check` for any table;
- `program`: a table as static per-tick arrays with stash slots (`compile_schedule`);
- `executor`: `pipeline_grads`, the whole forward and backward of a step on the `pipe` axis.
"""
