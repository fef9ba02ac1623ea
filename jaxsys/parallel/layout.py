"""The one place that checks a layout against a mesh, before anything is compiled.

`check_layout` raises `ConfigError` (naming the key, the sizes and a fix) for a mesh that does
not match `cfg.mesh`, a head, vocabulary or sequence count that does not divide over `tensor`, a
batch that does not divide over data × fsdp × expert (per accumulation microbatch and, with a pipeline,
per pipeline microbatch), a pipeline schedule that cannot be built, and any parameter dimension
that does not divide over the mesh axes its rules split it on. Checks that need no mesh are in
`jaxsys.config.checks`; checks of the data in `jaxsys.data.corpus.check_corpus`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys.config import Config, ConfigError
from jaxsys.model.params import path_str
from jaxsys.parallel.context import check_context
from jaxsys.parallel.mesh import batch_ways, resolve_mesh_shape
from jaxsys.parallel.pipeline.program import make_schedule
from jaxsys.parallel.rules import logical_to_spec, optimizer_rules


def check_layout(cfg: Config, mesh: Mesh, abstract_params: Any, logical_specs: Any) -> None:
    """Reject, before any compile, a layout whose shapes do not divide over their mesh axes.

    `abstract_params` is a tree of `jax.ShapeDtypeStruct`; `logical_specs` the matching tree of
    logical `PartitionSpec`s. Raises `ConfigError` naming the parameter, dimension, axis and fix.
    """
    wanted = resolve_mesh_shape(cfg.mesh, mesh.devices.size)
    if wanted != dict(mesh.shape):
        raise ConfigError(f"The mesh {dict(mesh.shape)} does not match cfg.mesh {wanted}; build it "
                          "with jaxsys.parallel.mesh.make_mesh(cfg.mesh, devices).")
    sizes = dict(mesh.shape)
    m = cfg.model.resolved()
    tensor = sizes["tensor"]
    for what, value, key in (("model.num_heads", m.num_heads, "heads"),
                             ("model.num_kv_heads", m.num_kv_heads, "kv_heads"),
                             ("model.vocab_size", m.vocab_size, "vocab")):
        if value % tensor:
            raise ConfigError(
                f"{what}={value} is not divisible by the tensor axis (mesh.tensor={tensor}); "
                f"choose mesh.tensor dividing {value}."
            )
    if cfg.mesh.sequence_parallel and m.seq_len % tensor:
        raise ConfigError(
            f"mesh.sequence_parallel=true splits the sequence over the tensor axis, but "
            f"model.seq_len={m.seq_len} is not divisible by mesh.tensor={tensor}; use a seq_len "
            f"that is a multiple of {tensor} or set mesh.sequence_parallel=false."
        )
    data_ways = batch_ways(sizes)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % data_ways:
        raise ConfigError(
            f"The per-step batch of {micro} sequences (train.batch_size={cfg.train.batch_size} / "
            f"train.grad_accum={cfg.train.grad_accum}) is not divisible by data × fsdp × expert = "
            f"{sizes['data']} × {sizes['fsdp']} × {sizes['expert']} = {data_ways}; use a "
            f"train.batch_size that is a multiple of {data_ways * cfg.train.grad_accum}."
        )
    if sizes["pipe"] > 1:
        _check_pipeline(cfg, sizes)
    check_context(cfg, sizes)

    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), logical in zip(flat_shapes, flat_specs):
        mesh_spec = logical_to_spec(tuple(logical), optimizer_rules(cfg.mesh))  # the most split
        for dim, (size, name, axes) in enumerate(zip(leaf.shape, logical, mesh_spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(sizes[a] for a in axes)
            if size % ways:
                divisors = [d for d in range(1, ways + 1) if size % d == 0 and ways % d == 0]
                raise ConfigError(
                    f"Parameter '{path_str(path)}' dimension {dim} ('{name}', size {size}) is not "
                    f"divisible by mesh axis {'×'.join(axes)}={ways}. Use a mesh.{axes[0]} that "
                    f"divides {size} (e.g. {max(divisors)}), or change the model size."
                )


def _check_pipeline(cfg: Config, sizes: dict[str, int]) -> None:
    """A pipeline microbatch must split over data × fsdp × expert, and the schedule must build."""
    p = sizes["pipe"]
    m = cfg.pipeline.microbatches or p
    rows = cfg.train.batch_size // cfg.train.grad_accum // m
    ways = batch_ways(sizes)
    if rows % ways:
        raise ConfigError(
            f"A pipeline microbatch of {rows} sequences (train.batch_size={cfg.train.batch_size} / "
            f"train.grad_accum={cfg.train.grad_accum} / pipeline.microbatches={m}) is not divisible "
            f"by data × fsdp × expert = {ways}; use a train.batch_size that is a multiple of "
            f"{ways * m * cfg.train.grad_accum}.")
    make_schedule(cfg, p)
