"""Plain-`jnp` attention that the flash-attention kernel must equal (STYLE.md rule 7).

Shapes: B batch, T query length, S key length, H query heads, K key/value heads
(G = H // K query heads share one K/V head: query head h reads K/V head h // G), E head size.

Masking conventions shared with `pallas_kernels.flash_attention`:
- causal: query t sits at absolute position t + (S - T) (bottom-right aligned, as in
  `jaxsys.model.attention.xla_attention`), and sees keys s <= t + (S - T);
- segment ids: query t sees key s only when `q_segment_ids[b, t] == kv_segment_ids[b, s]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite, so a fully masked row gives a uniform softmax instead of NaN (both implementations).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(T: int, S: int, *, causal: bool, q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None) -> jax.Array | None:
    """Boolean mask [B or 1, T, S] (True = attend), or None when nothing is masked."""
    mask = None
    if causal:
        mask = (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])[None]
    if q_segment_ids is not None:
        seg_BTS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = seg_BTS if mask is None else mask & seg_BTS
    return mask


def flash_attention_reference(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                              causal: bool = True, sm_scale: float | None = None,
                              q_segment_ids: jax.Array | None = None,
                              kv_segment_ids: jax.Array | None = None,
                              ) -> tuple[jax.Array, jax.Array]:
    """Materialises the [T, S] scores. Returns (o [B,T,H,E] in q's dtype, lse [B,H,T]).

    Computes in float32, or in float64 when the inputs are float64 (tests run it under
    `jax.enable_x64` as the ground truth). `lse` is the natural-log log-sum-exp of the scaled,
    masked scores of each query row.
    """
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G = H // K
    acc = jnp.promote_types(q_BTHE.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(E) if sm_scale is None else sm_scale
    q_BTKGE = q_BTHE.astype(acc).reshape(B, T, K, G, E)
    s_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE.astype(acc)) * scale
    mask = attention_mask(T, S, causal=causal, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids)
    if mask is not None:
        s_BKGTS = jnp.where(mask[:, None, None], s_BKGTS, MASK_VALUE)
    lse_BKGT = jax.nn.logsumexp(s_BKGTS, axis=-1)
    p_BKGTS = jnp.exp(s_BKGTS - lse_BKGT[..., None])
    o_BTKGE = jnp.einsum("bkgts,bske->btkge", p_BKGTS, v_BSKE.astype(acc))
    return o_BTKGE.reshape(B, T, H, E).astype(q_BTHE.dtype), lse_BKGT.reshape(B, H, T)
