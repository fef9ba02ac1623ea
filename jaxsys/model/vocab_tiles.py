"""Vocabulary-tiled cross-entropy: the output projection and the loss without [B, T, V] logits.

The head weight is cut into n contiguous tiles along V; a `lax.scan` over the tiles projects
x onto one tile at a time ([B, T, V/n] float32 logits), and carries three [B, T] running
statistics: the max m (no gradient: it only stabilises exp and cancels), the sum of exp(logit
− m) s, rescaled as m grows (the online softmax), and the target's logit p (0 until its tile).
The cross-entropy is m + log s − p. The body is `jax.checkpoint`ed: the backward recomputes one
tile's logits and writes that tile's weight gradient as the scan's output (in place, no [V, D]
accumulator), while dx, [B, T, D], is the only sum carried over tiles.

`tile_stats` is the per-device part (a vocabulary-parallel head runs it on its V/t shard and
merges the statistics across `tensor`, `jaxsys.parallel.tensor.tiled_cross_entropy`);
`tiled_cross_entropy_reference` the single-device hook. Shapes: B batch, T sequence, D embed,
V vocabulary (this device's), n tiles, W = V/n tile width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tile_stats(xn_BTD: jax.Array, w: jax.Array, tied: bool, targets_BT: jax.Array, tiles: int,
               vocab_offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, s, p), each float32 [B, T], over this weight's V entries in `tiles` tiles: `w` is
    [V, D] when `tied` (the embedding table), else [D, V]; `vocab_offset` the id of its first
    entry (targets outside [offset, offset + V) contribute p = 0). m is gradient-free."""
    V = w.shape[0] if tied else w.shape[1]
    W = V // tiles
    w_nWD = w.reshape(tiles, W, w.shape[1]) if tied else jnp.moveaxis(w.reshape(w.shape[0], tiles, W), 1, 0)
    spec = "btd,wd->btw" if tied else "btd,dw->btw"
    B, T = targets_BT.shape

    @jax.checkpoint
    def tile(carry, xs):
        m_BT, s_BT, p_BT = carry
        w_tile, j = xs
        logits_BTW = jnp.einsum(spec, xn_BTD, w_tile, preferred_element_type=jnp.float32)
        new_m = jnp.maximum(m_BT, jax.lax.stop_gradient(logits_BTW).max(-1))
        s_BT = s_BT * jnp.exp(m_BT - new_m) + jnp.exp(logits_BTW - new_m[..., None]).sum(-1)
        idx_BT = targets_BT - vocab_offset - j * W
        inside = (idx_BT >= 0) & (idx_BT < W)
        picked = jnp.take_along_axis(logits_BTW, jnp.clip(idx_BT, 0, W - 1)[..., None], axis=-1)[..., 0]
        return (new_m, s_BT, p_BT + jnp.where(inside, picked, 0.0)), None

    # + 0·w: the carry varies over the devices like the weight does (inside a shard_map over
    # `tensor`, where each device tiles its own vocabulary shard); the value is unchanged.
    z = (w_nWD[0, 0, 0] * 0).astype(jnp.float32)
    init = (jnp.full((B, T), -jnp.inf, jnp.float32) + z, jnp.zeros((B, T), jnp.float32) + z,
            jnp.zeros((B, T), jnp.float32) + z)
    (m_BT, s_BT, p_BT), _ = jax.lax.scan(tile, init, (w_nWD, jnp.arange(tiles)))
    return m_BT, s_BT, p_BT


def tiled_cross_entropy_reference(xn_BTD: jax.Array, w: jax.Array, tied: bool, targets_BT: jax.Array,
                                  tiles: int) -> jax.Array:
    """Per-token cross-entropy in nats, float32 [B, T], of the logits x·w (w [V, D] when `tied`,
    else [D, V]) computed `tiles` vocabulary tiles at a time (module docstring)."""
    m_BT, s_BT, p_BT = tile_stats(xn_BTD, w, tied, targets_BT, tiles)
    return m_BT + jnp.log(s_BT) - p_BT
