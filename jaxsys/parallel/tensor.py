"""Vocabulary-parallel embedding lookup and cross-entropy (Megatron-LM §3) on the `tensor` axis.

Shapes: B batch, T sequence, D embed, V vocabulary (v = V / tensor on one device).

The embedding table and the output head are split along V over `tensor`. Left to XLA's SPMD
partitioner, the lookup `take(table_VD, tokens)` all-gathers the whole table and the loss
gathers the full `[B, T, V]` logits; so these two pieces are written with `jax.shard_map`,
manual over `tensor` only (batch axes stay automatic):

- lookup: each device gathers the tokens that fall in its vocabulary slice, zeros the rest,
  and the partial rows are summed over `tensor` (psum, or psum_scatter along T under sequence
  parallelism, which leaves the residual stream split along T as SP wants);
- cross-entropy: max, sum of exponentials and the target's logit are reduced over `tensor` as
  [B, T] arrays; the logits never leave their device.

Each has a plain reference in `jaxsys.model.hooks` it must equal (with tensor = 1 the
references run). Every function here takes the mesh and the activation rules first;
`jaxsys.parallel.install` binds them and installs the results as the model's hooks.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys.model.axes import ACT_BTD, IN_BTD
from jaxsys.model.hooks import cross_entropy_reference, embed_lookup_reference
from jaxsys.model.vocab_tiles import tile_stats, tiled_cross_entropy_reference
from jaxsys.parallel.manual import constrain_to, manual_axes, shard_map
from jaxsys.parallel.mesh import DATA_AXES, batch_ways
from jaxsys.parallel.rules import Rules, logical_to_spec

Axes = Sequence[str | None]

# Our shard_maps are manual over the batch axes too: one manual over `tensor` alone replicates
# its operands over the other axes (measured: it all-gathered the batch over `data`, and the
# lookup's gradient rows with it). Inside `jaxsys.parallel.zero`, where the batch axes are
# already manual, `manual.shard_map` drops them.
_MANUAL = frozenset({"tensor", *DATA_AXES})


def _tensor_split(mesh: Mesh) -> bool:
    return dict(mesh.shape).get("tensor", 1) > 1


def _batch_splits(mesh: Mesh, batch: int) -> bool:
    if manual_axes() & set(DATA_AXES):
        return True  # inside jaxsys.parallel.zero: the batch is already this device's rows
    return batch % batch_ways(dict(mesh.shape)) == 0


def _vocab_slice(tokens: jax.Array, v: int) -> tuple[jax.Array, jax.Array]:
    """Local row index of each token in this device's slice of V, and whether it is there."""
    local = tokens - jax.lax.axis_index("tensor") * v
    inside = (local >= 0) & (local < v)
    return jnp.where(inside, local, 0), inside


def embed_lookup(mesh: Mesh, rules: Rules, table_VD: jax.Array, tokens_BT: jax.Array,
                 out_axes: Axes = ACT_BTD) -> jax.Array:
    """Vocabulary-parallel `embed_lookup_reference`: [B, T, D], laid out by `out_axes`."""
    if not _tensor_split(mesh):
        return embed_lookup_reference(table_VD, tokens_BT)
    seq_split = logical_to_spec(out_axes, rules)[1] == "tensor"  # sequence parallelism

    def local(table_vD: jax.Array, tokens: jax.Array) -> jax.Array:
        idx, inside = _vocab_slice(tokens, table_vD.shape[0])
        rows_BTD = jnp.where(inside[..., None], jnp.take(table_vD, idx, axis=0), 0)
        if seq_split:
            return jax.lax.psum_scatter(rows_BTD, "tensor", scatter_dimension=1, tiled=True)
        return jax.lax.psum(rows_BTD, "tensor")

    batch = DATA_AXES if _batch_splits(mesh, tokens_BT.shape[0]) else None
    return shard_map(local, mesh, _MANUAL,
                     in_specs=(P("tensor", None), P(batch)),
                     out_specs=P(batch, "tensor", None) if seq_split else P(batch))(table_VD, tokens_BT)


def cross_entropy(mesh: Mesh, rules: Rules, logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Vocabulary-parallel `cross_entropy_reference`: per-token nats, float32 [B, T]."""
    if not _tensor_split(mesh):
        return cross_entropy_reference(logits_BTV, targets_BT)

    def local(logits_BTv: jax.Array, targets: jax.Array) -> jax.Array:
        logits_BTv = logits_BTv.astype(jnp.float32)
        # The max only stabilises exp(); no gradient flows through it (it cancels exactly).
        m_BT = jax.lax.pmax(jax.lax.stop_gradient(logits_BTv).max(-1), "tensor")
        sumexp_BT = jax.lax.psum(jnp.exp(logits_BTv - m_BT[..., None]).sum(-1), "tensor")
        idx, inside = _vocab_slice(targets, logits_BTv.shape[-1])
        picked_BT = jnp.take_along_axis(logits_BTv, idx[..., None], axis=-1)[..., 0]
        target_BT = jax.lax.psum(jnp.where(inside, picked_BT, 0.0), "tensor")
        return jnp.log(sumexp_BT) + m_BT - target_BT

    return shard_map(local, mesh, {"tensor"},
                     in_specs=(P(None, None, "tensor"), P()), out_specs=P())(logits_BTV, targets_BT)


def tiled_cross_entropy(mesh: Mesh, rules: Rules, xn_BTD: jax.Array, w: jax.Array, tied: bool,
                        targets_BT: jax.Array, tiles: int) -> jax.Array:
    """Vocabulary-parallel `tiled_cross_entropy_reference`: each device runs the tiles of its
    V/t shard of `w` (`tile_stats`), then the running max, exp-sum and target logit are merged
    over `tensor` (3 [B, T] collectives, as `cross_entropy`'s). With sequence parallelism x is
    all-gathered along T once (its backward: a reduce-scatter of dx)."""
    if not _tensor_split(mesh):
        return tiled_cross_entropy_reference(xn_BTD, w, tied, targets_BT, tiles)
    sp = _sequence_parallel(mesh, rules)

    def local(x_BTD: jax.Array, w_local: jax.Array, targets: jax.Array) -> jax.Array:
        if sp:
            x_BTD = jax.lax.all_gather(x_BTD, "tensor", axis=1, tiled=True)
        V = w_local.shape[0] if tied else w_local.shape[1]
        m_BT, s_BT, p_BT = tile_stats(x_BTD, w_local, tied, targets, tiles, jax.lax.axis_index("tensor") * V)
        m_BT = jax.lax.stop_gradient(m_BT)  # only stabilises exp(); cancels exactly
        top_BT = jax.lax.pmax(m_BT, "tensor")
        sumexp_BT = jax.lax.psum(s_BT * jnp.exp(m_BT - top_BT), "tensor")
        return jnp.log(sumexp_BT) + top_BT - jax.lax.psum(p_BT, "tensor")

    x_spec = P(None, "tensor", None) if sp else P()
    w_spec = P("tensor", None) if tied else P(None, "tensor")
    return shard_map(local, mesh, {"tensor"}, in_specs=(x_spec, w_spec, P()), out_specs=P())(xn_BTD, w, targets_BT)


# ----------------------------------------------------------------------------- sequence parallelism
#
# Under SP, XLA's SPMD partitioner on CPU turns the row-parallel output into an all-reduce
# followed by a slice, and the backward of the all-gather into an all-reduce as well, instead of
# reduce-scatters (the GPU pipeline has a pass that rewrites this; CPU does not). So under SP the
# two boundaries of each tensor-parallel region are explicit `shard_map` collectives; without SP
# the plain `jit` path (sharding constraints) already compiles to Megatron's all-reduces.


def _sequence_parallel(mesh: Mesh, rules: Rules) -> bool:
    return _tensor_split(mesh) and logical_to_spec(("residual_seq",), rules)[0] == "tensor"


def _spec(logical: Axes, rules: Rules, batch_splits: bool = True) -> P:
    """Mesh spec of logical axes; the batch stays whole when it does not divide data × fsdp × expert
    (e.g. the 1-sequence dummy batch of `model.init`: every device then computes all of it)."""
    return logical_to_spec([None if a == "batch" and not batch_splits else a for a in logical], rules)


def column_parallel(mesh: Mesh, rules: Rules, spec: str, x_BTD: jax.Array, w: jax.Array, w_axes: Axes,
                    out_axes: Axes, *, in_axes: Axes = IN_BTD, preferred_element_type: Any = None) -> jax.Array:
    """`einsum(spec, x, w)` whose output is split over `tensor` along an axis of `w` (heads,
    mlp, vocab): no communication without SP; with SP, x arrives split along T and is
    all-gathered first (its backward: a reduce-scatter of dx). `x` must be [B, T, D]."""
    if not _sequence_parallel(mesh, rules):
        x_BTD = constrain_to(mesh, rules, x_BTD, in_axes)
        return constrain_to(mesh, rules, jnp.einsum(spec, x_BTD, w, preferred_element_type=preferred_element_type),
                            out_axes)

    ok = _batch_splits(mesh, x_BTD.shape[0])

    def local(x, w):
        x = jax.lax.all_gather(x, "tensor", axis=1, tiled=True)
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)

    return shard_map(local, mesh, _MANUAL,
                     in_specs=(_spec(ACT_BTD, rules, ok), _spec(w_axes, rules)),
                     out_specs=_spec(out_axes, rules, ok))(x_BTD, w)


def row_parallel(mesh: Mesh, rules: Rules, spec: str, h: jax.Array, w: jax.Array, h_axes: Axes,
                 w_axes: Axes, out_axes: Axes = ACT_BTD) -> jax.Array:
    """`einsum(spec, h, w)` contracting a tensor-split axis, summed over `tensor` into the
    residual layout: an all-reduce, or with SP a reduce-scatter along T (backward: all-gather).
    The output must be [B, T, D]."""
    if not _sequence_parallel(mesh, rules):
        return constrain_to(mesh, rules, jnp.einsum(spec, h, w), out_axes)

    ok = _batch_splits(mesh, h.shape[0])

    def local(h, w):
        return jax.lax.psum_scatter(jnp.einsum(spec, h, w), "tensor", scatter_dimension=1, tiled=True)

    return shard_map(local, mesh, _MANUAL,
                     in_specs=(_spec(h_axes, rules, ok), _spec(w_axes, rules)),
                     out_specs=_spec(out_axes, rules, ok))(h, w)
