"""Metric sinks: `<run_dir>/metrics.jsonl` (one JSON object per line) and TensorBoard events
(via tensorboardX, which needs no TensorFlow). (Peak FLOP/s for MFU: `jaxsys.config.hardware`.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricWriter:
    """Appends metrics to JSONL and TensorBoard; only the writing process should create one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                # A skipped step's NaN loss stays in metrics.jsonl; TensorBoard would only draw a
                # gap, after two "NaN or Inf found in input tensor" warnings from tensorboardX.
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
