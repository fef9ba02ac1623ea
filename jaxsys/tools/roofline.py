"""A roofline step-time estimate from the hardware table (`jaxsys.config.hardware`).

An estimate, not a measurement: compute time = FLOPs / peak, memory time = bytes accessed /
HBM bandwidth, communication time = Σ wire bytes / link bandwidth of the axes each collective
spans. The step time is max(compute, memory) + communication (no overlap: an upper bound on
a well-overlapped program), with the fully overlapped max(...) reported beside it.
"""

from __future__ import annotations

from jaxsys.config.hardware import Accelerator


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
