"""Context parallelism: the sequence of every activation split over the `context` mesh axis.

With `mesh.context` = c > 1 the activation rules put `seq` and `residual_seq` on `context`
(`rules.activation_rules`): embeddings, norms, MLPs and the loss each work on 1/c of the
sequence with no communication. Attention is the one place that needs the whole sequence; the
`attention` hook installed here runs it inside `shard_map` (manual over every mesh axis: batch
over data × fsdp, heads over tensor, sequence over context) by `context_parallel.kind`:

- ``all-gather`` (Llama 3's choice): K and V are all-gathered over context, the local queries
  attend over them (XLA attention with the positional causal mask); the backward
  reduce-scatters dK and dV. Cheap when K/V are small (grouped-query attention).
- ``ring``: K/V blocks rotate around the ring (`jaxsys.parallel.ring_attention`), partial
  outputs merge by log-sum-exp, and the backward is a ring too. Each block is the Pallas flash
  kernel with `model.attention=pallas`, XLA otherwise. Never more than two K/V blocks per device.
- ``ulysses`` (DeepSpeed-Ulysses): an all-to-all turns sequence-split q, k, v into head-split
  ones (each device: all T positions of H/c heads), any `model.attention` runs on whole
  sequences, and an all-to-all turns the output back. Needs c to divide the K/V heads.

**Load balancing** (`context_parallel.load_balance`, on by default). Under a causal mask a
contiguous split gives device i the work of i + 1/2 chunks: the last device does 2c - 1 times
the first's. In the zigzag (dual-chunk) layout the sequence is cut into 2c chunks and device i
holds chunks i and 2c-1-i, so every device attends over the same number of (query, key) pairs.
`reorder_batch` puts the tokens and targets of a batch in layout order and adds their
positions (RoPE or the learned position table follow the tokens); the mean loss is a sum over
tokens, so it is unchanged. `layout_order` is the one definition of the layout.

Packed documents: the segment ids travel with the keys (gathered with them, or around the ring
with each block; Ulysses gathers the whole row's), and each kind masks by them besides the
causal mask, so attention never crosses a document boundary.

Shapes: B batch, T sequence (t = T / c on one device), H query heads, K K/V heads, E head size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsys.config import Config, ContextParallelConfig
from jaxsys.model import attention as attention_lib
from jaxsys.parallel.manual import dividing_spec, shard_map
from jaxsys.parallel.rules import Rules
from jaxsys.parallel.ring_attention import AXIS, RingStatics, ring_attention

KINDS = ("all-gather", "ring", "ulysses")


def layout_order(seq_len: int, context: int, zigzag: bool) -> np.ndarray:
    """The natural position held at each index of the laid-out sequence, int32 [T]: device i
    holds indices i·t .. (i+1)·t - 1. Contiguous: the identity. Zigzag: chunks (of T / 2c)
    i and 2c-1-i on device i, in that order."""
    if not zigzag or context == 1:
        return np.arange(seq_len, dtype=np.int32)
    chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * context, seq_len // (2 * context))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]])
                           for i in range(context)])


def zigzag(cfg: Config) -> bool:
    """Is the sequence laid out zigzag (context > 1 with load balancing)?"""
    return cfg.mesh.context != 1 and cfg.context_parallel.load_balance


def reorder_batch(cfg: Config, context: int, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch` (every [B, T] array of it) in the layout order of a `context`-way split, with
    the natural `positions` of each token unless it has its own (packed documents); also in
    contiguous order: a device that holds part of the sequence cannot count its positions from
    0. Unchanged when context is 1."""
    if context == 1:
        return batch
    order_T = layout_order(batch["inputs"].shape[1], context, cfg.context_parallel.load_balance)
    out = {k: v[:, order_T] for k, v in batch.items()}  # positions and segment ids of packing too
    if "positions" not in batch:
        out["positions"] = jnp.broadcast_to(jnp.asarray(order_T), batch["inputs"].shape)
    return out


def attention_work(seq_len: int, context: int, zigzag: bool, causal: bool = True) -> np.ndarray:
    """(query, key) pairs each device of the context axis attends over: int [c]."""
    order = layout_order(seq_len, context, zigzag).reshape(context, -1)
    if not causal:
        return np.full(context, order.shape[1] * seq_len)
    return np.array([int((q[:, None] >= np.arange(seq_len)[None, :]).sum()) for q in order])


# ----------------------------------------------------------------------------- the kinds (per device)


def _all_gather(cp: ContextParallelConfig, causal: bool, q_bthE, k_btkE, v_btkE, seg_bt=None):
    c, t = jax.lax.axis_size(AXIS), q_bthE.shape[1]
    k_bTkE = jax.lax.all_gather(k_btkE, AXIS, axis=1, tiled=True)  # in layout order
    v_bTkE = jax.lax.all_gather(v_btkE, AXIS, axis=1, tiled=True)
    mask = None
    if causal:
        order_T = jnp.asarray(layout_order(c * t, c, cp.load_balance))
        q_pos_t = jax.lax.dynamic_slice_in_dim(order_T, jax.lax.axis_index(AXIS) * t, t)
        mask = q_pos_t[:, None] >= order_T[None, :]
    if seg_bt is not None:  # packed documents: the keys' ids travel with the keys
        seg_bT = jax.lax.all_gather(seg_bt, AXIS, axis=1, tiled=True)
        same_doc = attention_lib.segment_mask(seg_bt, seg_bT)
        mask = same_doc if mask is None else mask & same_doc
    o_bthE, _ = attention_lib.attention_with_lse(q_bthE, k_bTkE, v_bTkE, causal=False, mask_TS=mask)
    return o_bthE.astype(q_bthE.dtype)


def _ulysses(cp: ContextParallelConfig, causal: bool, impl: str, q_bthE, k_btkE, v_btkE, seg_bt=None):
    c, t = jax.lax.axis_size(AXIS), q_bthE.shape[1]
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2, concat_axis=1, tiled=True)
    q_bTHE, k_bTKE, v_bTKE = to_heads(q_bthE), to_heads(k_btkE), to_heads(v_btkE)  # layout order
    seg_bT = None if seg_bt is None else jax.lax.all_gather(seg_bt, AXIS, axis=1, tiled=True)
    order_T = layout_order(c * t, c, cp.load_balance)
    natural = not np.array_equal(order_T, np.arange(c * t))
    if natural:  # back to natural order, so the plain causal mask (and any kernel) applies
        inverse_T = np.argsort(order_T)
        q_bTHE, k_bTKE, v_bTKE = (x[:, inverse_T] for x in (q_bTHE, k_bTKE, v_bTKE))
        seg_bT = None if seg_bT is None else seg_bT[:, inverse_T]
    o_bTHE = attention_lib.attention(q_bTHE, k_bTKE, v_bTKE, impl=impl, causal=causal, segment_ids=seg_bT)
    if natural:
        o_bTHE = o_bTHE[:, order_T]
    return jax.lax.all_to_all(o_bTHE, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _ring(cp: ContextParallelConfig, causal: bool, impl: str, q_bthE, k_btkE, v_btkE, seg_bt=None):
    st = RingStatics(size=jax.lax.axis_size(AXIS), causal=causal, zigzag=cp.load_balance,
                     impl="pallas" if impl == "pallas" else "xla")
    return ring_attention(q_bthE, k_btkE, v_btkE, st, seg_bt)


def context_attention(mesh: Mesh, rules: Rules, cp: ContextParallelConfig, q_BTHE: jax.Array,
                      k_BSKE: jax.Array, v_BSKE: jax.Array, *, impl: str, causal: bool = True,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """The `attention` hook under context parallelism: [B, T, H, E] laid out as the activation
    rules say (sequence over context), by `cp.kind`; `segment_ids` [B, T] (packed documents, in
    the same layout) keep attention inside each document in every kind."""
    if cp.kind == "all-gather":
        local = functools.partial(_all_gather, cp, causal)
    elif cp.kind == "ulysses":
        local = functools.partial(_ulysses, cp, causal, impl)
    else:
        local = functools.partial(_ring, cp, causal, impl)
    q_spec = dividing_spec(("batch", "seq", "heads", "head_dim"), q_BTHE.shape, mesh, rules)
    kv_spec = dividing_spec(("batch", "seq", "kv_heads", "head_dim"), k_BSKE.shape, mesh, rules)
    args, specs = (q_BTHE, k_BSKE, v_BSKE), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
        args, specs = (*args, segment_ids), (*specs, dividing_spec(("batch", "seq"), segment_ids.shape, mesh, rules))
    return shard_map(local, mesh, mesh.axis_names, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def check_context(cfg: Config, sizes: dict[str, int]) -> None:
    """Raise `ConfigError` for a context layout that cannot run, with the fix (no compile)."""
    from jaxsys.config import ConfigError

    c = sizes.get("context", 1)
    if c == 1:
        return
    m, cp = cfg.model.resolved(), cfg.context_parallel
    chunks = 2 * c if cp.load_balance else c
    if m.seq_len % chunks:
        how = "2 × mesh.context chunks (zigzag load balancing)" if cp.load_balance else "mesh.context"
        raise ConfigError(
            f"model.seq_len={m.seq_len} does not split into {how} = {chunks}; use a seq_len that is a "
            f"multiple of {chunks}" + (" or set context_parallel.load_balance=false." if cp.load_balance else "."))
    if sizes.get("pipe", 1) > 1 and cp.kind == "ring":
        raise ConfigError(
            "context_parallel.kind=ring with mesh.pipe > 1: a pipeline stage runs attention inside "
            "its op's branch, and a ring's sends there wait for stages that are running other ops "
            "(measured: XLA:CPU aborts); use context_parallel.kind=all-gather or ulysses with a pipeline.")
    if cfg.mesh.sequence_parallel and sizes.get("tensor", 1) > 1:
        raise ConfigError("mesh.sequence_parallel=true splits the sequence over tensor, but mesh.context "
                          "> 1 already splits it over context; set mesh.sequence_parallel=false.")
    t = sizes.get("tensor", 1)
    if cp.kind == "ulysses":
        for what, heads in (("model.num_kv_heads", m.num_kv_heads), ("model.num_heads", m.num_heads)):
            if (heads // t) % c:
                raise ConfigError(
                    f"context_parallel.kind=ulysses splits the heads over context, but {what}={heads} "
                    f"(/ mesh.tensor={t} = {heads // t} per device) is not divisible by mesh.context={c}; "
                    f"use a mesh.context dividing {heads // t}, or context_parallel.kind=ring or all-gather.")
    if cp.kind == "all-gather" and m.attention != "xla":
        raise ConfigError(f"context_parallel.kind=all-gather runs XLA attention over the gathered K/V, "
                          f"not model.attention={m.attention}; set model.attention=xla, or use "
                          f"context_parallel.kind=ring (pallas) or ulysses (any).")
    if cp.kind == "ring" and m.attention == "cudnn":
        raise ConfigError("context_parallel.kind=ring needs each block's log-sum-exp, which cuDNN "
                          "attention does not return; use model.attention=pallas or xla, or "
                          "context_parallel.kind=ulysses.")
