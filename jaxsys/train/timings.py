"""Where a run's wall time went: seconds per phase, for the breakdown `jaxsys train` prints at
the end (imports, data, setup, compile, training, eval, checkpoints, sample).

`Timings.phase(name)` is a context manager that adds the seconds spent inside it to `name`;
phases may repeat (every eval adds to "eval"). "training" is what the step loop spent outside
its evals and checkpoint saves, so the phases add up to the loop's wall time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

# The order the breakdown prints in; phases not listed here follow in the order first seen.
ORDER = ("imports", "data", "setup", "init", "compile", "training", "eval", "checkpoints", "sample", "plot")


@dataclass
class Timings:
    """Seconds per phase of one run (wall clock, `time.perf_counter`)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def ordered(self) -> list[tuple[str, float]]:
        known = [(k, self.seconds[k]) for k in ORDER if k in self.seconds]
        return known + [(k, v) for k, v in self.seconds.items() if k not in ORDER]

    def total(self) -> float:
        return sum(self.seconds.values())

    def format(self) -> str:
        """One line: `Time: imports 2.9s | data 0.3s | ... | total 31.2s`."""
        parts = [f"{k} {v:.1f}s" for k, v in self.ordered()]
        return "Time: " + " | ".join(parts + [f"total {self.total():.1f}s"])
