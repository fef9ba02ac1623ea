"""Parameter counts (total and active per token) and training FLOPs per token of the
transformer, in closed form from its config (for MFU and the planner's closed forms).

Shapes (`jaxsys.model.axes`): D embed, H / K query / KV heads, E head size (MLA: value head),
F MLP hidden, V vocabulary, L layers, T sequence; MLA: q_lora, kv_lora the latent ranks, W a
query/key head, Y its RoPE part, nope = W - Y. MoE (`model.moe`): X routed experts of width F_x, k of
them per token, s shared experts.

Per layer: attention (MHA: D·H·E + 2·D·K·E + H·E·D, + biases for gpt2 / qkv_bias; MLA:
D·(q_lora + kv_lora + Y) + q_lora + kv_lora + q_lora·H·W + kv_lora·H·(nope + E) + H·E·D, or
D·H·W instead of the query latent's path with q_lora_rank 0), two norms, and the MLP: dense (3·D·F SwiGLU, 2·D·F + F + D GELU) or, in an
MoE layer, a router D·X plus (X + s) experts of 3·D·F_x (SwiGLU) / 2·D·F_x (GELU, no biases).
A token uses all of it but the X - k routed experts it is not sent to: active = total -
(X - k) · expert size · MoE layers. Embedding V·D (+ T·D positions, gpt2), head D·V unless
tied, final norm. `param_counts` is that closed form; `active_params` counts the same from a
model's parameter tree (what the planner and the MFU use), by the logical `expert` axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxsys.config import ModelConfig
from jaxsys.model import moe as moe_lib


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """`total` parameters, and `active`: those one token's forward pass uses (all but the
    routed experts it is not sent to; = total for a dense model)."""

    total: int
    active: int


def attention_params(cfg: ModelConfig) -> int:
    """One layer's attention parameters (MHA / GQA, or MLA with its latent norms)."""
    m = cfg.resolved()
    D, H, K, E = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
    if m.attention_kind == "mla":
        q_lora, kv_lora, nope, Y, Ev = m.q_lora_rank, m.kv_lora_rank, m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim
        q = D * q_lora + q_lora + q_lora * H * (nope + Y) if q_lora else D * H * (nope + Y)
        return q + D * (kv_lora + Y) + kv_lora + kv_lora * H * (nope + Ev) + H * Ev * D
    n = D * H * E + 2 * D * K * E + H * E * D
    if m.family == "gpt2" or m.qkv_bias:
        n += H * E + 2 * K * E
    return n + (D if m.family == "gpt2" else 0)


def _mlp(m: ModelConfig, F: int, bias: bool) -> int:
    if m.family == "gpt2":
        return 2 * m.embed_dim * F + ((F + m.embed_dim) if bias else 0)
    return 3 * m.embed_dim * F


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """`ParamCounts` of the model of `cfg`, in closed form (the module docstring)."""
    m = cfg.resolved()
    D, L, moe = m.embed_dim, m.num_layers, m.moe
    norm = D * (2 if m.family == "gpt2" else 1)  # LayerNorm has a bias
    total = m.vocab_size * D + (m.seq_len * D if m.family == "gpt2" else 0) + (0 if m.tied_head else D * m.vocab_size)
    total += norm
    inactive = 0
    for i in range(L):
        total += attention_params(m) + 2 * norm
        if moe_lib.is_moe_layer(moe, i):
            expert = _mlp(m, moe.expert_dim or m.mlp_dim, bias=False)
            total += D * moe.num_experts + (moe.num_experts + moe.num_shared_experts) * expert
            inactive += (moe.num_experts - moe.top_k) * expert
        else:
            total += _mlp(m, m.mlp_dim, bias=True)
    return ParamCounts(total, total - inactive)


def active_params(cfg: ModelConfig, abstract: Any, logical_specs: Any) -> int:
    """Parameters of a model's tree (arrays or `jax.ShapeDtypeStruct`s, with their logical
    `PartitionSpec`s) that one token uses: each parameter with an `expert` axis (the routed
    experts) counts top_k / num_experts of its size, every other one whole."""
    moe = cfg.moe
    specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    n = 0
    for leaf, spec in zip(jax.tree_util.tree_leaves(abstract), specs):
        size = math.prod(leaf.shape)
        n += size * moe.top_k // moe.num_experts if "expert" in tuple(spec) else size
    return n


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 6·L·H·(W + E)·T, = 6·N + 12·L·H·E·T
    when the query/key head W equals the value head E (MHA). N counts the parameters one token
    uses in matmuls: `num_params` (pass the *active* count, `active_params`, for an MoE model)
    without the position table (gpt2) or the input embedding lookup (llama, untied). The
    attention term counts the full (not causal-halved) score matrix."""
    m = cfg.resolved()
    lookup = m.seq_len if m.family == "gpt2" else m.vocab_size
    n = num_params - lookup * m.embed_dim
    qk, v = (m.qk_nope_dim + m.qk_rope_dim, m.v_head_dim) if m.attention_kind == "mla" else (m.head_dim, m.head_dim)
    return 6.0 * n + 6.0 * m.num_layers * m.num_heads * (qk + v) * m.seq_len
