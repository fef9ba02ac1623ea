"""Training: the state, the pure train step, the optimizer, and the host loop around it.

- `state`: `TrainState`, `Setup` (model, optimizer and every sharding for a config on a mesh);
- `step`: the pure `step(state, batch) -> (state, metrics)`, accumulation, AOT compile;
- `optimizer`: Optax AdamW and learning-rate schedules from config;
- `loop`: `train`, in phases; `run_dir`: what a resume must agree with;
- `metrics`, `rollback`, `preemption`: metric sinks, rollback after NaN streaks, SIGTERM;
- `trackers` (W&B, SwanLab), `console` (text / JSON / quiet lines), `profiling` (step traces).

Imports config, model, data, parallel and checkpoint; never inference, tools or cli.
"""
