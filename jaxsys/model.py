"""A decoder-only transformer in Flax, used as a pure function of a parameter pytree.

One implementation, two families chosen by `ModelConfig.family`:
  gpt2  — learned positions, LayerNorm, GELU MLP, biases, tied input/output embedding;
  llama — RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied output head, no biases.

Dimension letters: B batch, T sequence, D embed, H query heads, K key/value heads,
E head size, F MLP hidden, V vocabulary, L layers.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and key
activations pass through `sharding.constrain`; nothing here mentions a mesh axis.
Parameters are stored in `param_dtype`; matmuls run in `compute_dtype`; norms, softmax and
the logits are float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.attention import attention
from jaxsys.config import ModelConfig
from jaxsys.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACT_BTD = ("batch", "seq", "embed")


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           std: float | None, dtype: Any) -> jax.Array:
    """A parameter with logical axes; std=None means ones, std=0 zeros, else normal(0, std)."""
    if std is None:
        init = nn.initializers.ones
    elif std == 0.0:
        init = nn.initializers.zeros
    else:
        init = nn.initializers.normal(std)
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    # Stored by PARAM_RULES, used by ACTIVATION_RULES: under FSDP this is the explicit
    # all-gather of the weight before use (and a reduce-scatter of its gradient), as Levanter
    # separates parameter and compute mappings. Without it XLA may reshard activations instead.
    return constrain(w, axes)


class Norm(nn.Module):
    """LayerNorm (gpt2, with bias) or RMSNorm (llama) over the embed axis, in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.param_dtype)
        x = x_BTD.astype(jnp.float32)
        scale_D = _param(self, "scale", (cfg.embed_dim,), ("embed",), None, dtype)
        if cfg.family == "gpt2":  # LayerNorm: centre, then scale like RMSNorm, then shift
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale_D
        if cfg.family == "gpt2":
            y = y + _param(self, "bias", (cfg.embed_dim,), ("embed",), 0.0, dtype)
        return y.astype(cfg.compute_dtype)


def rope(x_BTHE: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    E = x_BTHE.shape[-1]
    freqs_E2 = theta ** (-jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    angles_BTE2 = positions_BT[..., None].astype(jnp.float32) * freqs_E2
    sin, cos = jnp.sin(angles_BTE2)[:, :, None, :], jnp.cos(angles_BTE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHE.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        cfg = self.cfg
        D, H, K, E = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual projections
        wq_DHE = _param(self, "wq", (D, H, E), ("embed", "heads", "head_dim"), 0.02, pdt)
        wk_DKE = _param(self, "wk", (D, K, E), ("embed", "kv_heads", "head_dim"), 0.02, pdt)
        wv_DKE = _param(self, "wv", (D, K, E), ("embed", "kv_heads", "head_dim"), 0.02, pdt)
        wo_HED = _param(self, "wo", (H, E, D), ("heads", "head_dim", "embed"), out_std, pdt)

        q_BTHE = jnp.einsum("btd,dhe->bthe", x_BTD, wq_DHE.astype(cdt))
        k_BTKE = jnp.einsum("btd,dke->btke", x_BTD, wk_DKE.astype(cdt))
        v_BTKE = jnp.einsum("btd,dke->btke", x_BTD, wv_DKE.astype(cdt))
        if cfg.family == "gpt2":
            q_BTHE += _param(self, "bq", (H, E), ("heads", "head_dim"), 0.0, pdt).astype(cdt)
            k_BTKE += _param(self, "bk", (K, E), ("kv_heads", "head_dim"), 0.0, pdt).astype(cdt)
            v_BTKE += _param(self, "bv", (K, E), ("kv_heads", "head_dim"), 0.0, pdt).astype(cdt)
        else:
            q_BTHE = rope(q_BTHE, positions_BT, cfg.rope_theta)
            k_BTKE = rope(k_BTKE, positions_BT, cfg.rope_theta)
        q_BTHE = constrain(q_BTHE, ("batch", "seq", "heads", "head_dim"))
        k_BTKE = constrain(k_BTKE, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKE = constrain(v_BTKE, ("batch", "seq", "kv_heads", "head_dim"))

        o_BTHE = attention(q_BTHE, k_BTKE, v_BTKE, impl=cfg.attention, causal=True)
        o_BTHE = constrain(o_BTHE, ("batch", "seq", "heads", "head_dim"))
        y_BTD = jnp.einsum("bthe,hed->btd", o_BTHE, wo_HED.astype(cdt))
        if cfg.family == "gpt2":
            y_BTD += _param(self, "bo", (D,), ("embed",), 0.0, pdt).astype(cdt)
        return y_BTD


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        D, F = cfg.embed_dim, cfg.hidden_dim
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        if cfg.family == "gpt2":
            wi_DF = _param(self, "wi", (D, F), ("embed", "mlp"), 0.02, pdt)
            bi_F = _param(self, "bi", (F,), ("mlp",), 0.0, pdt)
            h_BTF = jnp.einsum("btd,df->btf", x_BTD, wi_DF.astype(cdt)) + bi_F.astype(cdt)
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        else:
            wg_DF = _param(self, "wi_gate", (D, F), ("embed", "mlp"), 0.02, pdt)
            wu_DF = _param(self, "wi_up", (D, F), ("embed", "mlp"), 0.02, pdt)
            gate_BTF = jnp.einsum("btd,df->btf", x_BTD, wg_DF.astype(cdt))
            up_BTF = jnp.einsum("btd,df->btf", x_BTD, wu_DF.astype(cdt))
            h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        h_BTF = constrain(h_BTF, ("batch", "seq", "mlp"))
        wo_FD = _param(self, "wo", (F, D), ("mlp", "embed"), out_std, pdt)
        y_BTD = jnp.einsum("btf,fd->btd", h_BTF, wo_FD.astype(cdt))
        if cfg.family == "gpt2":
            y_BTD += _param(self, "bo", (D,), ("embed",), 0.0, pdt).astype(cdt)
        return y_BTD


class Block(nn.Module):
    """Pre-norm residual block. `__call__(carry, _)` has the signature `nn.scan` expects."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h_BTD = Attention(cfg, name="attn")(Norm(cfg, name="ln_attn")(x_BTD), positions_BT)
        x_BTD = constrain(x_BTD + drop(h_BTD), _ACT_BTD)
        h_BTD = Mlp(cfg, name="mlp")(Norm(cfg, name="ln_mlp")(x_BTD))
        x_BTD = constrain(x_BTD + drop(h_BTD), _ACT_BTD)
        return x_BTD, None


class Transformer(nn.Module):
    """`apply({'params': p}, tokens_BT) -> logits_BTV` (float32)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, T = tokens_BT.shape
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        if T > cfg.seq_len:
            raise ValueError(f"Input length {T} exceeds model.seq_len={cfg.seq_len}.")
        embed_VD = _param(self, "embed", (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), 0.02, pdt)
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cdt)
        if cfg.family == "gpt2":
            pos_TD = _param(self, "pos_embed", (cfg.seq_len, cfg.embed_dim), (None, "embed"), 0.02, pdt)
            x_BTD = x_BTD + pos_TD[:T].astype(cdt)
        x_BTD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BTD)
        x_BTD = constrain(x_BTD, _ACT_BTD)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # One traced block, parameters stacked on a leading 'layers' axis: compile time does
            # not grow with depth.
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, _ = stack(cfg, self.deterministic, name="layers")(x_BTD, positions_BT)
        else:
            for i in range(cfg.num_layers):
                x_BTD, _ = block(cfg, self.deterministic, name=f"layer_{i}")(x_BTD, positions_BT)

        x_BTD = Norm(cfg, name="ln_final")(x_BTD)
        if cfg.family == "gpt2":  # tied: the output head is the input embedding
            head_DV = embed_VD.T
        else:
            head_DV = _param(self, "head", (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, pdt)
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(cdt),
                                preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "seq", "vocab"))


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·L·H·E·T. N counts the parameters
    used in matmuls: without the position table (gpt2) or the input embedding lookup (llama,
    untied); the attention term counts the full (not causal-halved) score matrix."""
    lookup = cfg.seq_len if cfg.family == "gpt2" else cfg.vocab_size
    n = num_params - lookup * cfg.embed_dim
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * cfg.seq_len
