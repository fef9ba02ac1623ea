"""Manual regions: `shard_map` that nests, constraints that work inside one, and the small
collective helpers the strategies share.

Inside a `shard_map` that is manual over some mesh axes (`jaxsys.parallel.zero` over the batch
axes, the pipeline over pipe and the batch axes), constraints and nested shard_maps must use
the context's abstract mesh and may name only the axes that are still automatic. These helpers
drop the manual axes, so `jaxsys.parallel.tensor` reads the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsys.parallel.rules import PARAM_RULES, Rules, logical_to_spec


def manual_axes() -> frozenset[str]:
    """The mesh axes that are manual at this point of tracing (inside a shard_map); else empty."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def without_axes(spec: P, axes: frozenset[str]) -> P:
    """`spec` with the mesh axes in `axes` removed (a dimension left with none becomes None)."""
    entries = []
    for entry in spec:
        names = tuple(n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ()))
                      if n not in axes)
        entries.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*entries)


def shard_map(f: Any, mesh: Mesh, axis_names: Sequence[str], in_specs: Any, out_specs: Any,
              **kwargs: Any) -> Any:
    """`jax.shard_map` that also works nested inside another one: axes already manual are
    dropped from `axis_names` and from every spec, and the context's abstract mesh is used."""
    manual = manual_axes()
    if manual:
        drop = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda sp: without_axes(sp, manual), tree, is_leaf=lambda x: isinstance(x, P))
        mesh, axis_names = jax.sharding.get_abstract_mesh(), set(axis_names) - manual
        if not axis_names:  # all already manual here (jax.shard_map would read {} as "all axes")
            return f
        in_specs, out_specs = drop(in_specs), drop(out_specs)
    return jax.shard_map(f, mesh=mesh, axis_names=set(axis_names), in_specs=in_specs,
                         out_specs=out_specs, **kwargs)


def constrain_to(mesh: Mesh, rules: Rules, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint of `x` by logical names on `mesh` (the parallel `constrain` hook);
    inside a manual region only the automatic axes are constrained."""
    spec, manual = logical_to_spec(logical_axes, rules), manual_axes()
    if manual:
        mesh, spec = jax.sharding.get_abstract_mesh(), without_axes(spec, manual)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def psum_live(x: Any, axes: Sequence[str], sizes: dict[str, int]) -> Any:
    """One all-reduce of `x` over those of `axes` whose size is > 1 (`x` itself if none):
    XLA 0.10 gave a collective over a size-1 manual axis the replica groups of `tensor`
    (measured: an "fsdp" all-gather at fsdp=1 gathered over tensor)."""
    live = tuple(a for a in axes if sizes[a] > 1)
    return jax.lax.psum(x, live) if live else x


def tensor_local(fn: Any, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`fn(x)` on each device's `tensor` block of a parameter-shaped `x` (split over tensor as
    `PARAM_RULES` say), for collectives over the manual batch axes inside a manual region:
    left to XLA, an fsdp all-gather or reduce-scatter of a tensor-split buffer ran on the whole
    buffer (replicated over tensor first). `fn` must keep the tensor-split dimensions' sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    if "tensor" in manual_axes() or "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return fn(x)
    spec = P(*[e if e == "tensor" else None for e in logical_to_spec(logical_axes, PARAM_RULES)])
    return shard_map(fn, mesh, {"tensor"}, in_specs=spec, out_specs=spec, check_vma=False)(x)


def dividing_spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
    """The rules' spec, with dimensions that do not divide over their mesh axes left whole
    (e.g. the batch of 1 that initialisation traces with)."""
    spec = logical_to_spec(logical, rules)
    entries = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        entries.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*entries)
