"""The one hardware table: peak FLOP/s, memory and link bandwidths per accelerator.

Used by the training loop (MFU: `peak_flops` by the `jax.Device.device_kind` it runs on) and
by `jaxsys plan` (the roofline: `get_accelerator` by name). Figures are vendor datasheets,
dense (without sparsity). A row with only a peak (a chip seen by the loop but never planned
for) has None for the rest, and `get_accelerator` does not offer it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxsys.config.schema import ConfigError

GiB = 2.0 ** 30


@dataclass(frozen=True)
class Accelerator:
    name: str
    device_kinds: tuple[str, ...]  # the `jax.Device.device_kind` strings of this chip
    bf16_flops: float  # dense peak FLOP/s for bf16/fp16 matmuls
    fp32_flops: float | None = None  # dense peak FLOP/s for fp32 matmuls (TF32 tensor cores on NVIDIA)
    hbm_bytes_per_s: float | None = None
    link_bytes_per_s: float | None = None  # per direction, per device, inside a node (NVLink)
    network_bytes_per_s: float | None = None  # per device between nodes
    node_size: int | None = None  # devices joined by `link_bytes_per_s`
    memory_bytes: float | None = None

    @property
    def has_roofline(self) -> bool:
        """Are all the numbers a roofline estimate needs known?"""
        return None not in (self.fp32_flops, self.hbm_bytes_per_s, self.link_bytes_per_s,
                            self.network_bytes_per_s, self.node_size, self.memory_bytes)


ACCELERATORS = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense, 495 TFLOP/s TF32 dense, 3.35 TB/s
    # HBM3, NVLink 4 900 GB/s bidirectional (450 per direction), 80 GB; 400 Gb/s NIC per GPU.
    "h100": Accelerator("H100 SXM", ("NVIDIA H100 80GB HBM3",), 989e12, 494.7e12, 3.35e12, 450e9,
                        50e9, 8, 80 * GiB),
    # NVIDIA H200 SXM datasheet: H100's compute, 4.8 TB/s HBM3e, 141 GB.
    "h200": Accelerator("H200 SXM", ("NVIDIA H200",), 989e12, 494.7e12, 4.8e12, 450e9, 50e9, 8, 141e9),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s bf16, 156 TFLOP/s TF32, 2.039 TB/s HBM2e,
    # NVLink 3 600 GB/s bidirectional (300 per direction); 200 Gb/s HDR NIC per GPU.
    "a100": Accelerator("A100 SXM 80GB", ("NVIDIA A100-SXM4-80GB",), 312e12, 156e12, 2.039e12,
                        300e9, 25e9, 8, 80 * GiB),
    # Peaks only (MFU on these chips; not offered to the planner).
    "a100-40gb": Accelerator("A100 SXM 40GB", ("NVIDIA A100-SXM4-40GB",), 312e12),
    "h100-pcie": Accelerator("H100 PCIe", ("NVIDIA H100 PCIe",), 756e12),
    "h100-nvl": Accelerator("H100 NVL", ("NVIDIA H100 NVL",), 835e12),
    "tpu-v4": Accelerator("TPU v4", ("TPU v4",), 275e12),
    "tpu-v5e": Accelerator("TPU v5 lite", ("TPU v5 lite",), 197e12),
    "tpu-v5p": Accelerator("TPU v5p", ("TPU v5p",), 459e12),
}


def get_accelerator(name: str) -> Accelerator:
    """The roofline row called `name` (``h100``, ``h200``, ``a100``)."""
    choices = sorted(k for k, a in ACCELERATORS.items() if a.has_roofline)
    if name not in choices:
        raise ConfigError(f"Unknown accelerator '{name}'; choose one of {choices}.")
    return ACCELERATORS[name]


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s for a `jax.Device.device_kind`, or None if unknown (e.g. CPUs):
    then no MFU is reported rather than a guessed one."""
    return next((a.bf16_flops for a in ACCELERATORS.values() if device_kind in a.device_kinds), None)
