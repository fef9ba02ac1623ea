"""Metric sinks: `<run_dir>/metrics.jsonl` (one JSON object per line) and TensorBoard events
(via tensorboardX, which needs no TensorFlow). Peak FLOP/s per device kind for MFU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dense bf16 peak FLOP/s per chip (vendor datasheets, without sparsity), by `device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s for a `jax.Device.device_kind`, or None if unknown (e.g. CPUs): then no MFU
    is reported rather than a guessed one."""
    return PEAK_FLOPS.get(device_kind)


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
                if key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
