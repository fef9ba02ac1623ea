"""A `jax.profiler` trace of chosen steps (`logging.profile_steps`), into `<run_dir>/profile`.

The trace starts before the first chosen step is dispatched and stops after the last one,
once its state is ready (the loop dispatches ahead, so without the wait the trace would end
before the device work). It holds an `.xplane.pb` for TensorBoard's profile plugin
(`tensorboard --logdir <run_dir>/profile`, with tensorboard-plugin-profile) and a
`perfetto_trace.json.gz` that https://ui.perfetto.dev opens. Each process traces itself
(with several, into `profile/process_<i>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax


class StepProfiler:
    """Traces loop steps `min(steps)..max(steps)` (1-based, as in metrics.jsonl) once per run."""

    def __init__(self, steps: tuple[int, ...], run_dir: Path, log: Callable[..., None]):
        self.first, self.last = (min(steps), max(steps)) if steps else (0, -1)
        self.dir = Path(run_dir) / "profile"
        if jax.process_count() > 1:
            self.dir = self.dir / f"process_{jax.process_index()}"
        self._log = log
        self.active = self.finished = False

    def before(self, step: int) -> None:
        """Call before dispatching loop step `step` (the one metrics.jsonl calls `step`)."""
        if not (self.active or self.finished) and self.first <= step <= self.last:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Call after dispatching `step`; stops the trace after the last chosen step."""
        if self.active and step >= self.last:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active, self.finished = False, True
        self._log(f"Profiled steps {self.first}..{self.last}: trace in {self.dir}", "profile",
                  path=str(self.dir), first=self.first, last=self.last)
