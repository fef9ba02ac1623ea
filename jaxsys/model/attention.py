"""Causal self-attention with a selectable implementation (`model.attention`), unsharded.

Shapes (`jaxsys.model.axes`): B batch, T query positions, S key positions, H query heads,
K key/value heads (H % K == 0, G = H // K query heads per KV head), E head size.

- ``xla``: plain `jnp` reference; grouped-query attention without repeating K/V.
- ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")`; NVIDIA GPUs only.
- ``pallas``: the flash-attention kernel from `pallas_kernels.flash_attention` (compiled on
  GPU, interpret mode elsewhere).

Packed documents: every implementation takes `segment_ids` (int [B, T], self-attention: equal
ids = same document) and lets query t see key s only when their ids are equal, besides the
causal mask; XLA and cuDNN through a [B, T, S] boolean mask, Pallas in the kernel. A pallas_call cannot be partitioned by GSPMD, so on a mesh
  `jaxsys.parallel.install` runs it under `shard_map` (the model reaches it through the
  `attention` hook).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsys.config import ConfigError

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def segment_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
    """[B, T, S] True where query t and key s belong to the same document."""
    return q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]


def xla_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                  causal: bool = True, scale: float | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """Reference attention; softmax in float32, output in the dtype of `q`. Returns [B,T,H,E].
    `segment_ids` int [B, T] (T == S): attention stays inside each document."""
    T, S = q_BTHE.shape[1], k_BSKE.shape[1]
    # Query t sits at absolute position t + (S - T), so a shorter query block attends correctly.
    mask = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :] if causal else None
    if segment_ids is not None:
        mask = _and(mask, segment_mask(segment_ids, segment_ids))
    return _attend(q_BTHE, k_BSKE, v_BSKE, mask, scale)


def attention_with_lse(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *, causal: bool,
                       mask_TS: jax.Array | None = None, scale: float | None = None,
                       impl: str = "xla", segment_ids: tuple[jax.Array, jax.Array] | None = None,
                       ) -> tuple[jax.Array, jax.Array]:
    """Attention of one block of queries over one block of keys, with its log-sum-exp: (o
    [B, T, H, E] float32, lse [B, H, T] float32, natural log of each query's softmax
    denominator). `causal` aligns the mask bottom-right (T <= S); `mask_TS` (True = visible) is
    an extra mask ([T, S] or [B, T, S]), XLA only; `segment_ids` (q ids [B, T], key ids [B, S])
    keeps attention inside documents. A query that sees no key of the block gets a finite
    lse of about -3e38 (weight 0 in a merge). `impl="pallas"` runs the flash kernel, which
    returns the lse itself. Partial results over disjoint key blocks merge exactly by their lse
    (ring attention)."""
    if impl == "pallas":
        if mask_TS is not None:
            raise ValueError("attention_with_lse: the Pallas kernel takes no extra mask.")
        from pallas_kernels.flash_attention import flash_attention_with_lse, resolve_interpret
        o_BTHE, lse_BHT = flash_attention_with_lse(q_BTHE, k_BSKE, v_BSKE, causal=causal, sm_scale=scale,
                                                   segment_ids=segment_ids,
                                                   interpret=resolve_interpret(None))
        return o_BTHE.astype(jnp.float32), lse_BHT
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
    logits_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                              preferred_element_type=jnp.float32) * scale
    if causal:
        mask_TS = _and(mask_TS, jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])
    if segment_ids is not None:
        mask_TS = _and(mask_TS, segment_mask(*segment_ids))
    if mask_TS is not None:
        logits_BKGTS = jnp.where(_over_heads(mask_TS, 5), logits_BKGTS, jnp.finfo(jnp.float32).min)
    lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
    probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None]).astype(v_BSKE.dtype)
    o_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE, preferred_element_type=jnp.float32)
    return o_BTKGE.reshape(B, T, H, E), lse_BKGT.reshape(B, H, T)


def _and(a: jax.Array | None, b: jax.Array) -> jax.Array:
    return b if a is None else a & b


def _over_heads(mask: jax.Array, ndim: int) -> jax.Array:
    """A [T, S] or [B, T, S] mask shaped to broadcast over logits of `ndim` dims ([B, H, T, S]
    or [B, K, G, T, S])."""
    if mask.ndim == 2:
        return mask
    return mask.reshape(mask.shape[0], *(1,) * (ndim - 3), *mask.shape[1:])


def cached_attention(q_BTHE: jax.Array, k_BKSE: jax.Array, v_BKSE: jax.Array, positions_BT: jax.Array,
                     *, scale: float | None = None) -> jax.Array:
    """Attention of new queries over a KV cache in its heads-major layout (`jaxsys.model.
    kv_cache`): the query at absolute position p of row b sees the cache slots s <= p (slot s
    holds position s). Softmax in float32; returns [B, T, H, E] in the dtype of `q`."""
    B, T, H, E = q_BTHE.shape
    K, S = k_BKSE.shape[1], k_BKSE.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    q_BKGTE = q_BTHE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)  # the T new rows only
    logits_BKGTS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32) * scale
    mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSE.dtype)
    out_BKGTE = jnp.einsum("bkgts,bkse->bkgte", probs_BKGTS, v_BKSE)
    return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


@jax.custom_vjp
def softmax_saving_probs(logits: jax.Array) -> jax.Array:
    """`jax.nn.softmax` over the last axis whose backward reads only the probabilities it
    saved, y·(g − Σ g·y): XLA:CPU otherwise keeps both exp(s − max) and the probabilities of
    every layer for the backward (measured on gpt2-small: two [b, H, T, T] float32 buffers per
    layer, 576 MiB more at b = 1, T = 1024)."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs


def _softmax_bwd(probs: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (probs * (g - (g * probs).sum(-1, keepdims=True)),)


softmax_saving_probs.defvjp(_softmax_fwd, _softmax_bwd)


def _attend(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: jax.Array | None,
            scale: float | None) -> jax.Array:
    """Softmax attention under `mask` ([T, S] or [B, T, S]; None: no mask)."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if K == H:  # multi-head: plain 4-D einsums (measured ~1.6x faster fwd+bwd on CPU than 5-D)
        logits_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BSKE,
                                 preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits_BHTS = jnp.where(_over_heads(mask, 4), logits_BHTS, jnp.finfo(jnp.float32).min)
        probs_BHTS = softmax_saving_probs(logits_BHTS).astype(v_BSKE.dtype)
        return jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BSKE)
    # Grouped-query: G = H // K query heads share each K/V head; K/V are never repeated.
    q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
    logits_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                              preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits_BKGTS = jnp.where(_over_heads(mask, 5), logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = softmax_saving_probs(logits_BKGTS).astype(v_BSKE.dtype)
    out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)
    return out_BTKGE.reshape(B, T, H, E)


def cudnn_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                    causal: bool = True, scale: float | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """cuDNN's fused attention; packed documents through a [B, 1, T, S] mask (untested on a GPU:
    none was available when segment ids were added)."""
    if jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention=cudnn needs an NVIDIA GPU, but the backend is "
            f"'{jax.default_backend()}'; use model.attention=xla on this machine."
        )
    if q_BTHE.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(
            f"model.attention=cudnn supports bfloat16/float16 inputs, got {q_BTHE.dtype}; "
            "set model.compute_dtype=bfloat16."
        )
    mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids)[:, None]
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask, scale=scale, is_causal=causal,
                                        implementation="cudnn")


def pallas_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                     causal: bool = True, scale: float | None = None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """The Pallas flash-attention kernel (compiled on GPU, interpreted elsewhere), on the
    whole arrays; `jaxsys.parallel.install` wraps it in `shard_map` on a mesh."""
    try:
        from pallas_kernels.flash_attention import (check_supported, flash_attention,
                                                    resolve_interpret)
    except ImportError:
        raise ConfigError(
            "model.attention=pallas: the Pallas flash-attention kernel is not available in this "
            "version (pallas_kernels.flash_attention is missing); use model.attention=xla or cudnn."
        ) from None
    interpret = resolve_interpret(None)
    try:
        check_supported(q_BTHE.shape, k_BSKE.shape, v_BSKE.shape, q_BTHE.dtype, interpret=interpret,
                        causal=causal)
    except ValueError as e:
        raise ConfigError(f"model.attention=pallas: {e} Use model.attention=xla for this "
                          "model, or change model.head_dim / model.compute_dtype.") from None
    return flash_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, sm_scale=scale, segment_ids=segment_ids,
                           interpret=interpret)


def attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *, impl: str = "xla",
              causal: bool = True, scale: float | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
    """Dispatch to the implementation named `impl`; all return [B, T, H, E]. `segment_ids`
    int [B, T] (self-attention over packed documents) or None."""
    kw = dict(causal=causal, scale=scale, segment_ids=segment_ids)
    if impl == "xla":
        return xla_attention(q_BTHE, k_BSKE, v_BSKE, **kw)
    if impl == "cudnn":
        return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, **kw)
    if impl == "pallas":
        return pallas_attention(q_BTHE, k_BSKE, v_BSKE, **kw)
    raise ConfigError(f"model.attention={impl!r}; choose one of {IMPLEMENTATIONS}.")
