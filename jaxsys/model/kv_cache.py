"""The key/value cache of autoregressive decoding: a preallocated buffer per layer, written at
each row's own position and read back whole under a position mask.

Shapes (`jaxsys.model.axes`): B batch, S cache slots (= positions 0 .. S-1), K key/value heads
(a grouped-query cache holds K heads, not H), E head size, T new tokens of one call.

The layout is [B, K, S, E], heads before slots: the decode step's two dots (q·k over E, p·v
over S) then have their batch dimensions (B, K) leading, which XLA's dot wants; with [B, S, K,
E] it transposed the whole cache at every step (measured 4.3x slower per step at batch 8,
512 slots on CPU).

Slot s of row b holds the key/value of that row's token at absolute position s. A call writes
its T new tokens at slots `start_B .. start_B + T - 1` (their positions) and attends from query
position p to the slots s <= p. Slots past a row's length hold stale or garbage entries (padding
of a shorter prompt, rejected speculative tokens); the mask hides them until they are
overwritten, so rolling a row back is just lowering its length.

Two storage formats:
- ``float32`` / ``bfloat16``: K and V as they are;
- ``int8``: K and V rounded to int8 with one float32 scale per token and head (symmetric,
  max |x| / 127 over E), dequantized when read: a quarter of float32's bytes plus 1/E of scales.

Multi-head latent attention (`model.attention_kind=mla`) caches its latent instead: one "head"
whose key is the normed K/V latent (`model.kv_lora_rank` wide) and whose value is the rotated
RoPE key (`model.qk_rope_dim` wide),
see `cache_dims` and `jaxsys.model.mla`.

The cache type lives here, beside the attention that reads it; the allocator and the decode
loop that own it live in `jaxsys.inference`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig

KV_DTYPES = ("float32", "bfloat16", "int8")


@flax.struct.dataclass
class LayerCache:
    """One layer's cache (or all layers', stacked on a leading L axis under `scan_layers`).
    `k_scale_BKS` / `v_scale_BKS` are None unless the cache is int8."""

    k_BKSE: jax.Array
    v_BKSE: jax.Array
    k_scale_BKS: jax.Array | None = None
    v_scale_BKS: jax.Array | None = None

    @property
    def slots(self) -> int:
        return self.k_BKSE.shape[-2]


def empty(batch: int, slots: int, kv_heads: int, head_dim: int, dtype: str = "float32",
          layers: int | None = None, v_head_dim: int | None = None) -> LayerCache:
    """A zeroed cache of `slots` positions for `batch` rows, in storage `dtype` (`KV_DTYPES`);
    with `layers`, stacked on a leading L axis (for `scan_layers`). Values are `v_head_dim`
    wide when given, else `head_dim` as the keys."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV-cache dtype {dtype!r}: choose one of {KV_DTYPES}.")
    lead = () if layers is None else (layers,)
    k_shape = (*lead, batch, kv_heads, slots, head_dim)
    v_shape = (*lead, batch, kv_heads, slots, head_dim if v_head_dim is None else v_head_dim)
    if dtype == "int8":
        scale = (*lead, batch, kv_heads, slots)  # separate buffers: the cache is donated
        return LayerCache(jnp.zeros(k_shape, jnp.int8), jnp.zeros(v_shape, jnp.int8),
                          jnp.zeros(scale, jnp.float32), jnp.zeros(scale, jnp.float32))
    return LayerCache(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype))


def cache_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads K, key width, value width) of one token's cache entry in one layer: (K, E, E)
    for multi-head / grouped-query attention; for MLA (`jaxsys.model.mla`) one "head" holding
    the normed latent (kv_lora_rank) as the key and the rotated RoPE key (qk_rope_dim) as the value."""
    c = cfg.resolved()
    if c.attention_kind == "mla":
        return 1, c.kv_lora_rank, c.qk_rope_dim
    return c.num_kv_heads, c.head_dim, c.head_dim


def for_model(cfg: ModelConfig, batch: int, slots: int, dtype: str = "float32",
              layers: int | None = None) -> LayerCache:
    """`empty` with `cfg`'s `cache_dims`."""
    K, Ek, Ev = cache_dims(cfg)
    return empty(batch, slots, K, Ek, dtype, layers, v_head_dim=Ev)


def quantize(x_BKTE: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scale [B, K, T]): symmetric per token and head; x ≈ values * scale."""
    x = x_BKTE.astype(jnp.float32)
    scale_BKT = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale_BKT > 0, scale_BKT, 1.0)[..., None]  # an all-zero vector stays zero
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale_BKT


def _write_rows(buf_BKS: jax.Array, new_BKT: jax.Array, start_B: jax.Array) -> jax.Array:
    """Each row's T new entries into its slots start .. start + T - 1 (axis 2; any trailing dims)."""
    def one(buf_KS, new_KT, start):
        return jax.lax.dynamic_update_slice_in_dim(buf_KS, new_KT.astype(buf_KS.dtype), start, axis=1)
    return jax.vmap(one)(buf_BKS, new_BKT, start_B)


def write(cache: LayerCache, k_BTKE: jax.Array, v_BTKE: jax.Array, start_B: jax.Array) -> LayerCache:
    """The cache with row b's T new keys/values at slots start_B[b] .. start_B[b] + T - 1.
    The caller keeps start + T <= S (`dynamic_update_slice` would clamp, not fail)."""
    k_BKTE, v_BKTE = k_BTKE.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)  # T new: small
    if cache.k_scale_BKS is None:
        return LayerCache(_write_rows(cache.k_BKSE, k_BKTE, start_B),
                          _write_rows(cache.v_BKSE, v_BKTE, start_B))
    kq, ks = quantize(k_BKTE)
    vq, vs = quantize(v_BKTE)
    return LayerCache(_write_rows(cache.k_BKSE, kq, start_B), _write_rows(cache.v_BKSE, vq, start_B),
                      _write_rows(cache.k_scale_BKS, ks, start_B), _write_rows(cache.v_scale_BKS, vs, start_B))


def read(cache: LayerCache, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(k_BKSE, v_BKSE) of every slot in `dtype` (int8 entries dequantized)."""
    if cache.k_scale_BKS is None:
        return cache.k_BKSE.astype(dtype), cache.v_BKSE.astype(dtype)
    k = cache.k_BKSE.astype(jnp.float32) * cache.k_scale_BKS[..., None]
    v = cache.v_BKSE.astype(jnp.float32) * cache.v_scale_BKS[..., None]
    return k.astype(dtype), v.astype(dtype)


def nbytes(cache: Any) -> int:
    """Bytes held by a cache pytree (values and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
