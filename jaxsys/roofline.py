"""Accelerator peak numbers and a roofline step-time estimate.

An estimate, not a measurement: compute time = FLOPs / peak, memory time = bytes accessed /
HBM bandwidth, communication time = Σ wire bytes / link bandwidth of the axes each collective
spans. The step time is max(compute, memory) + communication (no overlap: an upper bound on
a well-overlapped program), with the fully overlapped max(...) reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxsys.config import ConfigError


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense peak FLOP/s for bf16/fp16 matmuls
    fp32_flops: float  # dense peak FLOP/s for fp32 matmuls (TF32 tensor cores on NVIDIA)
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # per direction, per device, inside a node (NVLink)
    network_bytes_per_s: float  # per device between nodes
    node_size: int  # devices joined by `link_bytes_per_s`
    memory_bytes: float


GiB = 2.0 ** 30

ACCELERATORS = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense, 495 TFLOP/s TF32 dense, 3.35 TB/s
    # HBM3, NVLink 4 900 GB/s bidirectional (450 per direction), 80 GB; 400 Gb/s NIC per GPU.
    "h100": Accelerator("H100 SXM", 989e12, 494.7e12, 3.35e12, 450e9, 50e9, 8, 80 * GiB),
    # NVIDIA H200 SXM datasheet: H100's compute, 4.8 TB/s HBM3e, 141 GB.
    "h200": Accelerator("H200 SXM", 989e12, 494.7e12, 4.8e12, 450e9, 50e9, 8, 141e9),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s bf16, 156 TFLOP/s TF32, 2.039 TB/s HBM2e,
    # NVLink 3 600 GB/s bidirectional (300 per direction); 200 Gb/s HDR NIC per GPU.
    "a100": Accelerator("A100 SXM 80GB", 312e12, 156e12, 2.039e12, 300e9, 25e9, 8, 80 * GiB),
}


def get_accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ConfigError(f"Unknown accelerator '{name}'; choose one of {sorted(ACCELERATORS)}.")
    return ACCELERATORS[name]


def link_bandwidth(acc: Accelerator, axes: tuple[str, ...], mesh_shape: dict[str, int],
                   mesh_order: tuple[str, ...]) -> float:
    """Bytes/s for a collective over `axes`: NVLink if its group stays inside one node (the mesh
    is laid out with the last axis innermost), else the network."""
    if not axes:
        return float("inf")
    outermost = min(mesh_order.index(a) for a in axes)
    span = 1
    for a in mesh_order[outermost:]:
        span *= mesh_shape[a]
    return acc.link_bytes_per_s if span <= acc.node_size else acc.network_bytes_per_s


def estimate(acc: Accelerator, flops: float, hbm_bytes: float, comm_seconds: float,
             bf16: bool) -> dict[str, float]:
    """Seconds per step: compute, memory, communication, and the two step-time bounds."""
    compute = flops / (acc.bf16_flops if bf16 else acc.fp32_flops)
    memory = hbm_bytes / acc.hbm_bytes_per_s
    return {"compute_s": compute, "memory_s": memory, "comm_s": comm_seconds,
            "step_s": max(compute, memory) + comm_seconds,
            "step_overlapped_s": max(compute, memory, comm_seconds)}
