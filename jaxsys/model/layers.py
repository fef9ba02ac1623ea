"""The layers of the transformer: parameters, norm, RoPE, attention and MLP (the block that
joins them is `jaxsys.model.block`).

Two families by `ModelConfig.family`:
  gpt2  — LayerNorm, GELU MLP (tanh or exact: `model.gelu`), biases;
  llama — RMSNorm, RoPE (optionally Llama 3 scaled: `model.rope_scaling`), SwiGLU MLP,
          grouped-query attention, no biases (but q/k/v biases with `model.qkv_bias`, Qwen2).

Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed, H query heads, K key/value heads,
G = H / K, E head size, F MLP hidden.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and reaches
compute through the `use_weight` hook; activations pass through `constrain`, matmuls that
tensor parallelism splits through `column_matmul` / `row_matmul` (`jaxsys.model.hooks`), and
those through `fp8.matmul`, which rounds their operands and gradients through fp8 with
`model.fp8=current` (`jaxsys.model.fp8`).
Nothing here names a mesh axis or a parallel strategy. Parameters are stored in
`param_dtype`; matmuls run in `compute_dtype`; norms, softmax and the logits are float32.
Each module expects a `resolved()` config (the `Transformer` passes one).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig
from jaxsys.model import attention as attention_lib
from jaxsys.model import fp8, hooks, kv_cache
from jaxsys.model.axes import ACT_BTD, H_BTF, KV_BTKE, Q_BTHE

def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           std: float | None, dtype: Any) -> jax.Array:
    """A parameter with logical axes, at its point of use (`hooks.use_weight`); std=None means
    ones, std=0 zeros, else normal(0, std)."""
    if std is None:
        init = nn.initializers.ones
    elif std == 0.0:
        init = nn.initializers.zeros
    else:
        init = nn.initializers.normal(std)
    w = module.param(name, nn.with_logical_partitioning(init, axes), hooks.stored_shape(shape, axes), dtype)
    return hooks.use_weight(w, axes)


class Norm(nn.Module):
    """LayerNorm (gpt2, with bias) or RMSNorm (llama) over the embed axis, in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.param_dtype)
        x = x_BTD.astype(jnp.float32)
        scale_D = param(self, "scale", (cfg.embed_dim,), ("embed",), None, dtype)
        if cfg.family == "gpt2":  # LayerNorm: centre, then scale like RMSNorm, then shift
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale_D
        if cfg.family == "gpt2":
            y = y + param(self, "bias", (cfg.embed_dim,), ("embed",), 0.0, dtype)
        return y.astype(cfg.compute_dtype)


def rope_freqs(cfg: ModelConfig, E: int) -> jax.Array:
    """RoPE's E/2 inverse wavelengths (radians per position), float32: `rope_theta`^(-2i/E),
    then `rope_scaling` ("llama3": the formula of transformers' `_compute_llama3_parameters`)."""
    freqs_E2 = cfg.rope_theta ** (-jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    if cfg.rope_scaling == "llama3":
        old, factor = cfg.rope_original_max_positions, cfg.rope_factor
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen_E2 = 2 * math.pi / freqs_E2
        scaled_E2 = jnp.where(wavelen_E2 > old / lo, freqs_E2 / factor, freqs_E2)
        smooth_E2 = (old / wavelen_E2 - lo) / (hi - lo)
        smoothed_E2 = (1 - smooth_E2) * scaled_E2 / factor + smooth_E2 * scaled_E2
        medium = ~(wavelen_E2 < old / hi) & ~(wavelen_E2 > old / lo)
        freqs_E2 = jnp.where(medium, smoothed_E2, scaled_E2)
    return freqs_E2


def rope(x_BTHE: jax.Array, positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary position embedding (rotate-half form) at `positions_BT`, computed in float32."""
    freqs_E2 = rope_freqs(cfg, x_BTHE.shape[-1])
    angles_BTE2 = positions_BT[..., None].astype(jnp.float32) * freqs_E2
    sin, cos = jnp.sin(angles_BTE2)[:, :, None, :], jnp.cos(angles_BTE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHE.dtype)


class Attention(nn.Module):
    """Self-attention; with a `cache`, the new tokens' K/V are written into it first and the
    queries attend over the whole cache by position (`attention.cached_attention`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: kv_cache.LayerCache | None = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, kv_cache.LayerCache | None]:
        cfg = self.cfg
        D, H, K, E = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual projections
        wq_DHE = param(self, "wq", (D, H, E), ("embed", "heads", "head_dim"), 0.02, pdt)
        wk_DKE = param(self, "wk", (D, K, E), ("embed", "kv_heads", "head_dim"), 0.02, pdt)
        wv_DKE = param(self, "wv", (D, K, E), ("embed", "kv_heads", "head_dim"), 0.02, pdt)
        wo_HED = param(self, "wo", (H, E, D), ("heads", "head_dim", "embed"), out_std, pdt)

        # One fused QKV matmul (as Megatron): under tensor parallelism its backward all-reduces
        # one dx, where three separate matmuls would all-reduce three. G query heads per KV head.
        B, T, G = x_BTD.shape[0], x_BTD.shape[1], H // K
        w_DKJE = jnp.concatenate([wq_DHE.reshape(D, K, G, E), wk_DKE[:, :, None], wv_DKE[:, :, None]], 2)
        qkv_BTKJE = fp8.matmul(cfg.fp8, hooks.column_matmul, "btd,dkje->btkje", x_BTD,  # SP: all-gather T
                               w_DKJE.astype(cdt), ("embed", "kv_heads", None, "head_dim"),
                                    ("batch", "seq", "kv_heads", None, "head_dim"))
        q_BTHE = qkv_BTKJE[:, :, :, :G].reshape(B, T, H, E)
        k_BTKE, v_BTKE = qkv_BTKJE[:, :, :, G], qkv_BTKJE[:, :, :, G + 1]
        if cfg.family == "gpt2" or cfg.qkv_bias:  # llama + qkv_bias: Qwen2 (biases before RoPE)
            q_BTHE += param(self, "bq", (H, E), ("heads", "head_dim"), 0.0, pdt).astype(cdt)
            k_BTKE += param(self, "bk", (K, E), ("kv_heads", "head_dim"), 0.0, pdt).astype(cdt)
            v_BTKE += param(self, "bv", (K, E), ("kv_heads", "head_dim"), 0.0, pdt).astype(cdt)
        if cfg.family != "gpt2":
            q_BTHE = rope(q_BTHE, positions_BT, cfg)
            k_BTKE = rope(k_BTKE, positions_BT, cfg)
        q_BTHE = hooks.constrain(q_BTHE, Q_BTHE)
        k_BTKE = hooks.constrain(k_BTKE, KV_BTKE)
        v_BTKE = hooks.constrain(v_BTKE, KV_BTKE)

        if cache is None:
            o_BTHE = hooks.attention(q_BTHE, k_BTKE, v_BTKE, impl=cfg.attention, causal=True,
                                     segment_ids=segment_ids_BT)
        else:  # decoding: the new tokens sit at positions start .. start + T - 1 of their row
            cache = kv_cache.write(cache, k_BTKE, v_BTKE, positions_BT[:, 0])
            k_BKSE, v_BKSE = kv_cache.read(cache, cdt)
            o_BTHE = attention_lib.cached_attention(q_BTHE, k_BKSE, v_BKSE, positions_BT)
        o_BTHE = hooks.constrain(o_BTHE, Q_BTHE)
        # Row-parallel: all-reduce of the partial sums into the residual (SP: reduce-scatter).
        y_BTD = fp8.matmul(cfg.fp8, hooks.row_matmul, "bthe,hed->btd", o_BTHE, wo_HED.astype(cdt),
                           Q_BTHE, ("heads", "head_dim", "embed"), ACT_BTD)
        if cfg.family == "gpt2":
            y_BTD += param(self, "bo", (D,), ("embed",), 0.0, pdt).astype(cdt)
        return y_BTD, cache


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        D, F = cfg.embed_dim, cfg.mlp_dim
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        if cfg.family == "gpt2":
            wi_DF = param(self, "wi", (D, F), ("embed", "mlp"), 0.02, pdt)
            bi_F = param(self, "bi", (F,), ("mlp",), 0.0, pdt)
            h_BTF = fp8.matmul(cfg.fp8, hooks.column_matmul, "btd,df->btf", x_BTD, wi_DF.astype(cdt),
                               ("embed", "mlp"), ("batch", "seq", "mlp")) + bi_F.astype(cdt)
            h_BTF = jax.nn.gelu(h_BTF, approximate=cfg.gelu == "tanh")
        else:
            wg_DF = param(self, "wi_gate", (D, F), ("embed", "mlp"), 0.02, pdt)
            wu_DF = param(self, "wi_up", (D, F), ("embed", "mlp"), 0.02, pdt)
            # Fused gate/up matmul: one all-reduce of dx in the backward under TP, not two.
            gu_BTJF = fp8.matmul(cfg.fp8, hooks.column_matmul, "btd,djf->btjf", x_BTD,
                                 jnp.stack([wg_DF, wu_DF], 1).astype(cdt), ("embed", None, "mlp"),
                                 ("batch", "seq", None, "mlp"))
            gate_BTF, up_BTF = gu_BTJF[:, :, 0], gu_BTJF[:, :, 1]
            h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        h_BTF = hooks.constrain(h_BTF, H_BTF)
        wo_FD = param(self, "wo", (F, D), ("mlp", "embed"), out_std, pdt)
        y_BTD = fp8.matmul(cfg.fp8, hooks.row_matmul, "btf,fd->btd", h_BTF, wo_FD.astype(cdt),
                           ("batch", "seq", "mlp"), ("mlp", "embed"), ACT_BTD)  # all-reduce (SP: reduce-scatter)
        if cfg.family == "gpt2":
            y_BTD += param(self, "bo", (D,), ("embed",), 0.0, pdt).astype(cdt)
        return y_BTD
