"""Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1): `model.attention_kind=mla`.

Keys and values pass through one low-rank latent per token, and queries through another when
`model.q_lora_rank` > 0; RoPE acts only on a separate, decoupled part of each query/key head:

    queries   x -> [wq_a, D->q_lora] -> RMSNorm -> [wq_b, q_lora->H·W]   (or x -> [wq, D->H·W])
    keys/values  x -> [wkv_a, D->kv_lora+Y] = (c_kv, k_rope): c_kv -> RMSNorm -> [wkv_b, kv_lora->H·(nope+E)]
    head h    q = (q_nope, RoPE(q_rope) Y),  k = (k_nope, RoPE(k_rope) Y, one for all heads),
              v of E;  softmax(q·k / sqrt(W)) v,  then [wo, H·E->D]

Shapes (`jaxsys.model.axes`): B batch, T positions, S cache slots, D embed, H heads, Q a
latent's rank (q_lora_rank in cq_BTQ, kv_lora_rank in ckv_BTQ), W a query/key head, Y its RoPE
part (its no-RoPE part, nope = W - Y, has no letter), E value head size (`model.v_head_dim`).

Training runs the decompressed form: per-head K and V through the `attention` hook, so every
implementation and the tensor-parallel hook apply unchanged. `xla` takes values narrower than
queries (E != W) as they are; `pallas` and `cudnn` want one head size, so the narrower of V
and Q/K is zero-padded there (`_attention`; for DeepSeek-V3's E = 128 < W = 192 the p·v matmul
then does 1.5x its work).
Context parallelism (`mesh.context` > 1) is refused with MLA (`config.checks`).

Decoding caches what MLA was made for: per token and layer the normed latent c_kv (kv_lora) and
the rotated RoPE key (Y), kv_lora + Y numbers instead of 2·H·E, stored as a `kv_cache.LayerCache` of one
"head" (k: c_kv, v: k_rope; int8 works as for MHA). The cached step never decompresses the
cache: wkv_b's key half is absorbed into the queries and its value half applied after the
weighted sum (DeepSeek-V2 §2.1.2), so attention runs over the latent directly.

Tensor parallelism: heads over `tensor` (wq / wq_b, wkv_b, wo), the latent projections and
their norms whole on every device (logical axis `latent`, which no rule splits): each device
computes the whole latent, as DeepSeek's inference does; under sequence parallelism the
latents are whole in T (`_latent`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig
from jaxsys.model import hooks, kv_cache
from jaxsys.model.axes import ACT_BTD, Q_BTHE
from jaxsys.model.layers import param, rope

_LATENT_BT = ("batch", "seq", "latent")


def _rms_norm(module: nn.Module, name: str, latent: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RMSNorm of a latent [B, T, Q] (float32 inside, compute dtype out), its scale
    `name` over `latent`."""
    scale = param(module, name, (latent.shape[-1],), ("latent",), None, jnp.dtype(cfg.param_dtype))
    x = latent.astype(jnp.float32)
    y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale
    return y.astype(cfg.compute_dtype)


def latent_cached_attention(q_nope: jax.Array, q_rope_BTHY: jax.Array, c_BSQ: jax.Array,
                            k_rope_BSY: jax.Array, wk_nope: jax.Array, wv_QHE: jax.Array,
                            positions_BT: jax.Array, scale: float) -> jax.Array:
    """Attention of new queries over a latent cache, wkv_b absorbed (never decompressing the S
    slots): score(t, s) = (q_nope·wk) · c_s + q_rope · k_rope_s, the query at position p sees
    slots s <= p; output = (Σ_s p_s c_s) · wv. `q_nope` [B, T, H, nope], `wk_nope` [Q, H,
    nope] (wkv_b's key half), Q = kv_lora_rank. Softmax in float32; returns [B, T, H, E] in the
    dtype of `q_nope`."""
    S = c_BSQ.shape[1]
    q_lat_BTHQ = jnp.einsum("bthi,qhi->bthq", q_nope, wk_nope)
    logits_BHTS = (jnp.einsum("bthq,bsq->bhts", q_lat_BTHQ, c_BSQ, preferred_element_type=jnp.float32)
                   + jnp.einsum("bthy,bsy->bhts", q_rope_BTHY, k_rope_BSY,
                                preferred_element_type=jnp.float32)) * scale
    mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    logits_BHTS = jnp.where(mask_BTS[:, None], logits_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(c_BSQ.dtype)
    o_lat_BTHQ = jnp.einsum("bhts,bsq->bthq", probs_BHTS, c_BSQ)
    return jnp.einsum("bthq,qhe->bthe", o_lat_BTHQ, wv_QHE).astype(q_nope.dtype)


class MLAttention(nn.Module):
    """Multi-head latent attention with `layers.Attention`'s signature: `(x, positions, cache,
    segment_ids) -> (y, cache)`; with a `cache` (see the module docstring) the new tokens'
    latents are written first and the queries attend over the whole cache by position."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: kv_cache.LayerCache | None = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, kv_cache.LayerCache | None]:
        c = self.cfg
        D, H, q_lora, kv_lora = c.embed_dim, c.num_heads, c.q_lora_rank, c.kv_lora_rank
        nope, Y, E = c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
        pdt, cdt = jnp.dtype(c.param_dtype), jnp.dtype(c.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * c.num_layers)
        wkv_a = param(self, "wkv_a", (D, kv_lora + Y), ("embed", "latent"), 0.02, pdt)
        if q_lora:  # one matmul for both latents
            wq_a = param(self, "wq_a", (D, q_lora), ("embed", "latent"), 0.02, pdt)
            latents = _latent(x_BTD, jnp.concatenate([wq_a, wkv_a], 1).astype(cdt))  # [B, T, q_lora + kv_lora + Y]
            cq_BTQ = _rms_norm(self, "q_norm", latents[..., :q_lora], c)
            wq_b = param(self, "wq_b", (q_lora, H, nope + Y), ("latent", "heads", "head_dim"), 0.02, pdt)
            q_BTHW = hooks.constrain(jnp.einsum("btq,qhw->bthw", cq_BTQ, wq_b.astype(cdt)), Q_BTHE)
            kv_latent = latents[..., q_lora:]  # [B, T, kv_lora + Y]: c_kv and the RoPE key
        else:
            wq = param(self, "wq", (D, H, nope + Y), ("embed", "heads", "head_dim"), 0.02, pdt)
            q_BTHW = hooks.column_matmul("btd,dhw->bthw", x_BTD, wq.astype(cdt),
                                         ("embed", "heads", "head_dim"), Q_BTHE)
            kv_latent = _latent(x_BTD, wkv_a.astype(cdt))
        ckv_BTQ = _rms_norm(self, "kv_norm", kv_latent[..., :kv_lora], c)
        k_rope_BTY = rope(kv_latent[..., None, kv_lora:], positions_BT, c)[:, :, 0]
        q_nope, q_rope_BTHY = q_BTHW[..., :nope], rope(q_BTHW[..., nope:], positions_BT, c)  # [B, T, H, nope]
        wkv_b = param(self, "wkv_b", (kv_lora, H, nope + E), ("latent", "heads", "head_dim"), 0.02, pdt).astype(cdt)
        scale = 1.0 / math.sqrt(nope + Y)

        if cache is None:
            kv = hooks.constrain(jnp.einsum("btq,qhj->bthj", ckv_BTQ, wkv_b), Q_BTHE)  # [B, T, H, nope + E]
            B, T = x_BTD.shape[:2]
            k_BTHW = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(k_rope_BTY[:, :, None], (B, T, H, Y))], -1)
            q_BTHW = jnp.concatenate([q_nope, q_rope_BTHY], -1)
            o_BTHE = _attention(c, q_BTHW, k_BTHW, kv[..., nope:], segment_ids_BT)
        else:  # decoding: the new tokens sit at positions start .. start + T - 1 of their row
            cache = kv_cache.write(cache, ckv_BTQ[:, :, None], k_rope_BTY[:, :, None], positions_BT[:, 0])
            c_B1SQ, k_rope_B1SY = kv_cache.read(cache, cdt)
            o_BTHE = latent_cached_attention(q_nope, q_rope_BTHY, c_B1SQ[:, 0], k_rope_B1SY[:, 0],
                                             wkv_b[..., :nope], wkv_b[..., nope:], positions_BT, scale)
        o_BTHE = hooks.constrain(o_BTHE, Q_BTHE)
        wo = param(self, "wo", (H, E, D), ("heads", "head_dim", "embed"), out_std, pdt)
        y_BTD = hooks.row_matmul("bthe,hed->btd", o_BTHE, wo.astype(cdt), Q_BTHE,
                                 ("heads", "head_dim", "embed"), ACT_BTD)
        return y_BTD, cache


def _latent(x_BTD: jax.Array, w: jax.Array) -> jax.Array:
    """The latent projection x·w (w [D, q_lora + kv_lora + Y] or [D, kv_lora + Y]), whole in T and on every
    device: a plain einsum and a constraint, not the column-parallel hook, whose shard_map
    cannot return an output replicated over `tensor` from an all-gathered x. Under sequence
    parallelism the partitioner then chooses what to gather along T (measured on CPU: x, as
    the column-parallel hook would; the latent, 2112 wide for DeepSeek-V3 against D = 7168,
    would be cheaper)."""
    return hooks.constrain(jnp.einsum("btd,dr->btr", x_BTD, w), _LATENT_BT)


def _attention(c: ModelConfig, q_BTHW: jax.Array, k_BTHW: jax.Array, v_BTHE: jax.Array,
               segment_ids_BT: jax.Array | None) -> jax.Array:
    """The `attention` hook over decompressed heads (its default scale 1/sqrt(W) is MLA's).
    `pallas` and `cudnn` want one head size: V narrower than W is zero-padded to W and the
    output sliced back; V wider than W pads q and k instead, q times sqrt(E / W) so that the
    hook's 1/sqrt(E) still scales the scores by 1/sqrt(W)."""
    W, E = q_BTHW.shape[-1], v_BTHE.shape[-1]
    if c.attention != "xla" and E > W:
        pad = ((0, 0), (0, 0), (0, 0), (0, E - W))
        q_BTHW, k_BTHW = jnp.pad(q_BTHW * math.sqrt(E / W), pad), jnp.pad(k_BTHW, pad)
    elif c.attention != "xla" and E < W:
        v_BTHE = jnp.pad(v_BTHE, ((0, 0), (0, 0), (0, 0), (0, W - E)))
    o = hooks.attention(hooks.constrain(q_BTHW, Q_BTHE), hooks.constrain(k_BTHW, Q_BTHE),
                        hooks.constrain(v_BTHE, Q_BTHE), impl=c.attention, causal=True,
                        segment_ids=segment_ids_BT)
    return o[..., :E]
