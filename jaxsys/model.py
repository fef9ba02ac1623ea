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
from jaxsys.sharding import constrain, stored_shape, use_weight
from jaxsys.tensor_parallel import column_parallel, embed_lookup, row_parallel

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# The residual stream: its sequence axis has its own logical name so that sequence parallelism
# can split it over `tensor` while attention's `seq` stays whole (heads use `tensor` there).
_ACT_BTD = ("batch", "residual_seq", "embed")


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           std: float | None, dtype: Any) -> jax.Array:
    """A parameter with logical axes; std=None means ones, std=0 zeros, else normal(0, std)."""
    if std is None:
        init = nn.initializers.ones
    elif std == 0.0:
        init = nn.initializers.zeros
    else:
        init = nn.initializers.normal(std)
    # (Inside jaxsys.data_parallel at ZeRO-3 the stored weight is this device's fsdp slice.)
    w = module.param(name, nn.with_logical_partitioning(init, axes), stored_shape(shape, axes), dtype)
    # Stored by PARAM_RULES, used by ACTIVATION_RULES: under FSDP this is the explicit
    # all-gather of the weight before use (and a reduce-scatter of its gradient), as Levanter
    # separates parameter and compute mappings. Without it XLA may reshard activations instead.
    return use_weight(w, axes)


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

        # One fused QKV matmul (as Megatron): under tensor parallelism its backward all-reduces
        # one dx, where three separate matmuls would all-reduce three. G query heads per KV head.
        B, T, G = x_BTD.shape[0], x_BTD.shape[1], H // K
        w_DKSE = jnp.concatenate([wq_DHE.reshape(D, K, G, E), wk_DKE[:, :, None], wv_DKE[:, :, None]], 2)
        qkv_BTKSE = column_parallel("btd,dkse->btkse", x_BTD, w_DKSE.astype(cdt),  # SP: all-gather T
                                    ("embed", "kv_heads", None, "head_dim"),
                                    ("batch", "seq", "kv_heads", None, "head_dim"))
        q_BTHE = qkv_BTKSE[:, :, :, :G].reshape(B, T, H, E)
        k_BTKE, v_BTKE = qkv_BTKSE[:, :, :, G], qkv_BTKSE[:, :, :, G + 1]
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
        # Row-parallel: all-reduce of the partial sums into the residual (SP: reduce-scatter).
        y_BTD = row_parallel("bthe,hed->btd", o_BTHE, wo_HED.astype(cdt),
                             ("batch", "seq", "heads", "head_dim"), ("heads", "head_dim", "embed"), _ACT_BTD)
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
            h_BTF = column_parallel("btd,df->btf", x_BTD, wi_DF.astype(cdt), ("embed", "mlp"),
                                    ("batch", "seq", "mlp")) + bi_F.astype(cdt)
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        else:
            wg_DF = _param(self, "wi_gate", (D, F), ("embed", "mlp"), 0.02, pdt)
            wu_DF = _param(self, "wi_up", (D, F), ("embed", "mlp"), 0.02, pdt)
            # Fused gate/up matmul: one all-reduce of dx in the backward under TP, not two.
            gu_BTSF = column_parallel("btd,dsf->btsf", x_BTD, jnp.stack([wg_DF, wu_DF], 1).astype(cdt),
                                      ("embed", None, "mlp"), ("batch", "seq", None, "mlp"))
            gate_BTF, up_BTF = gu_BTSF[:, :, 0], gu_BTSF[:, :, 1]
            h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        h_BTF = constrain(h_BTF, ("batch", "seq", "mlp"))
        wo_FD = _param(self, "wo", (F, D), ("mlp", "embed"), out_std, pdt)
        y_BTD = row_parallel("btf,fd->btd", h_BTF, wo_FD.astype(cdt), ("batch", "seq", "mlp"),
                             ("mlp", "embed"), _ACT_BTD)  # all-reduce (SP: reduce-scatter)
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
        pdt = jnp.dtype(cfg.param_dtype)
        if T > cfg.seq_len:
            raise ValueError(f"Input length {T} exceeds model.seq_len={cfg.seq_len}.")
        embed_VD = _param(self, "embed", (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), 0.02, pdt)
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        pos_TD = None
        if cfg.family == "gpt2":
            pos_TD = _param(self, "pos_embed", (cfg.seq_len, cfg.embed_dim), (None, "embed"), 0.02, pdt)
        x_BTD = embed_tokens(cfg, embed_VD, pos_TD, tokens_BT)
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
        return head_logits(cfg, x_BTD, head_DV)


# The pieces of `Transformer.__call__` as functions of the parameter tree it creates, so that a
# pipeline can run the embedding on its first stage, a slice of the stacked layers on each
# stage and the head on its last stage with the model's own parameters (and checkpoints).


def embed_tokens(cfg: ModelConfig, embed_VD: jax.Array, pos_TD: jax.Array | None,
                 tokens_BT: jax.Array) -> jax.Array:
    """Token (+ learned position, gpt2) embedding in `compute_dtype`: [B, T] -> [B, T, D]."""
    x_BTD = embed_lookup(embed_VD, tokens_BT, _ACT_BTD).astype(cfg.compute_dtype)  # vocab-parallel under TP
    if pos_TD is not None:
        x_BTD = x_BTD + pos_TD[:tokens_BT.shape[1]].astype(cfg.compute_dtype)
    return x_BTD


def head_logits(cfg: ModelConfig, x_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """Output projection of final-normed activations: [B, T, D] -> float32 [B, T, V]."""
    # Vocab-parallel head (SP: all-gather along T first); the loss never gathers V.
    return column_parallel("btd,dv->btv", x_BTD, head_DV.astype(cfg.compute_dtype), ("embed", "vocab"),
                           ("batch", "seq", "vocab"), preferred_element_type=jnp.float32)


def embed(cfg: ModelConfig, params: Any, tokens_BT: jax.Array) -> jax.Array:
    """The input embedding from the model's parameter tree (no dropout): [B, T] -> [B, T, D]."""
    embed_VD = constrain(params["embed"], ("vocab", "embed"))
    pos_TD = constrain(params["pos_embed"], (None, "embed")) if cfg.family == "gpt2" else None
    return constrain(embed_tokens(cfg, embed_VD, pos_TD, tokens_BT), _ACT_BTD)


def apply_layers(cfg: ModelConfig, layers: Any, x_BTD: jax.Array) -> jax.Array:
    """Stacked blocks (`params["layers"]`, or a slice of its leading axis) in order, with the
    model's remat policy and no dropout: [B, T, D] -> [B, T, D]; equals the model's `nn.scan`."""
    B, T = x_BTD.shape[:2]
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))

    def block(x_BTD: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        return Block(cfg).apply({"params": layer}, x_BTD, positions_BT)

    if cfg.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat])
    return jax.lax.scan(block, x_BTD, layers)[0]


def head(cfg: ModelConfig, params: Any, x_BTD: jax.Array) -> jax.Array:
    """Final norm and output head from the model's parameter tree: [B, T, D] -> float32 [B, T, V]."""
    x_BTD = Norm(cfg).apply({"params": params["ln_final"]}, x_BTD)
    if cfg.family == "gpt2":  # tied to the input embedding
        head_DV = constrain(params["embed"], ("vocab", "embed")).T
    else:
        head_DV = constrain(params["head"], ("embed", "vocab"))
    return head_logits(cfg, x_BTD, head_DV)


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·L·H·E·T. N counts the parameters
    used in matmuls: without the position table (gpt2) or the input embedding lookup (llama,
    untied); the attention term counts the full (not causal-halved) score matrix."""
    lookup = cfg.seq_len if cfg.family == "gpt2" else cfg.vocab_size
    n = num_params - lookup * cfg.embed_dim
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * cfg.seq_len
