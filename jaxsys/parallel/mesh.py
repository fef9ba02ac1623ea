"""The device mesh: its axes, their sizes from `MeshConfig`, and the one name of a layout.

Axes, outermost to innermost: pipe, data, fsdp, expert, context, tensor (`tensor` innermost so
its devices are neighbours: the fastest links; `context` next, so a ring's neighbours are close).
`expert` sits inside data and fsdp because its all-to-all runs twice per MoE layer forward and
twice backward on activations, more often than fsdp's per-layer weight gathers and far more than
data's one gradient all-reduce per step; and outside context and tensor, whose collectives run
in every layer (attention, every matmul). The batch is split over data × fsdp × expert
(`DATA_AXES`: GShard / DeepSpeed-MoE split the batch over the expert axis as over data), the
sequence over context. On a dense model `expert` is one more data axis.

The mesh uses `AxisType.Auto`: we state shardings for inputs, outputs and a few activations
and let XLA's SPMD partitioner choose the collectives. (On `Explicit` meshes, the default of
`jax.make_mesh`, every matmul over a sharded contraction would need an `out_sharding`.)
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsys.config import ConfigError, MeshConfig

MESH_AXES = ("pipe", "data", "fsdp", "expert", "context", "tensor")
DATA_AXES = ("data", "fsdp", "expert")  # the batch dimension is split over all three


def _cpu_hint(fixed: int, processes: int) -> str:
    """How to get `fixed` simulated CPU devices, counting every process's (`--devices` is per process)."""
    if processes == 1:
        return f"on CPU, `jaxsys train --devices {fixed}` simulates {fixed} devices"
    if fixed % processes:
        return (f"with {processes} processes the device count is a multiple of {processes}, so choose "
                f"axis sizes whose product is one")
    return (f"with {processes} processes, `jaxsys launch --processes {processes} -- train --devices "
            f"{fixed // processes}` gives {fixed} devices ({fixed // processes} per process)")


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Axis sizes with -1 replaced by the rest of the devices; raises `ConfigError` on a
    layout whose product does not equal `num_devices` (of all `num_processes` together)."""
    sizes = {name: getattr(mesh_cfg, name) for name in MESH_AXES}
    wild = [n for n, s in sizes.items() if s == -1]
    if len(wild) > 1:
        raise ConfigError(f"Only one mesh axis may be -1, got {wild}; give the others explicit sizes.")
    bad = [n for n, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]} is invalid; axis sizes are ≥ 1 (or -1 for 'the rest').")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    layout = layout_name(sizes)
    if wild:
        if num_devices % fixed:
            raise ConfigError(
                f"The mesh {layout} needs a multiple of {fixed} devices, but there are {num_devices}. "
                f"Choose axis sizes whose product divides {num_devices} ({_cpu_hint(fixed, num_processes)})."
            )
        sizes[wild[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"The mesh {'of all 1s' if layout == '1 device' else layout} has {fixed} devices but {num_devices} are available. "
            f"Make the product of mesh.data, mesh.fsdp, mesh.expert, mesh.context, mesh.tensor and mesh.pipe equal {num_devices} "
            f"(e.g. set mesh.data=-1 to use the rest); {_cpu_hint(fixed, num_processes)}."
        )
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES`, sized from `mesh_cfg` over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_cfg, len(devices), jax.process_count())
    shape = tuple(sizes[n] for n in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)




def batch_ways(sizes: dict[str, int]) -> int:
    """How many ways the batch is split: data × fsdp × expert (`DATA_AXES`) of mesh `sizes`."""
    return math.prod(sizes.get(a, 1) for a in DATA_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def layout_name(sizes: dict[str, int], zero_stage: int | None = None, sequence_parallel: bool = False,
                context_kind: str | None = None) -> str:
    """The one way jaxsys names a layout: the axes whose size is not 1, joined by " × "
    (``data=2 × tensor=4``), then ``zero=S`` when fsdp > 1 (if `zero_stage` is given),
    ``sp`` under sequence parallelism over tensor > 1, and the context-parallel kind (``ring``,
    ``all-gather``, ``ulysses``, if given) when context > 1; ``1 device`` when every axis is 1."""
    name = " × ".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) != 1) or "1 device"
    if zero_stage is not None and sizes.get("fsdp", 1) > 1:
        name += f" zero={zero_stage}"
    if sequence_parallel and sizes.get("tensor", 1) > 1:
        name += " sp"
    if context_kind and sizes.get("context", 1) != 1:
        name += f" {context_kind}"
    return name
