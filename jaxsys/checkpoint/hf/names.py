"""Which Hugging Face tensor is which jaxsys parameter, and how its axes move.

One `Entry` per Hugging Face tensor (with `{i}` for the layer index) names the jaxsys leaves it
holds (paths inside one layer, or at the top) and how the axes move:

    plain   the same numbers, reshaped: HF [D, H*E] -> jaxsys [D, H, E]
    linear  torch's Linear stores [out, in]: transposed, then reshaped (q_proj [H*E, D] -> wq [D, H, E])
    split   one tensor holding several leaves side by side along its last axis (GPT-2's fused
            c_attn [D, 3D] -> wq, wk, wv; its bias [3D] -> bq, bk, bv)

Every step is a reshape, transpose or slice, so import -> export gives back the same bits.
GPT-2's `Conv1D` already stores [in, out], hence `plain` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jaxsys.config import ModelConfig

Kind = Literal["plain", "linear", "split"]
# Tensors a source may hold that are not parameters (causal-mask and RoPE buffers of old exports).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: its name (`{i}` = layer), its shape there, the jaxsys leaves it
    holds (paths inside a layer, or from the top) and how their axes move."""

    hf: str
    shape: tuple[int, ...]
    leaves: tuple[tuple[str, ...], ...]
    kind: Kind = "plain"
    per_layer: bool = True


def _gpt2(m: ModelConfig) -> list[Entry]:
    p, D, HE, F = "transformer.h.{i}.", m.embed_dim, m.num_heads * m.head_dim, m.mlp_dim
    e = [Entry(p + "ln_1.weight", (D,), (("ln_attn", "scale"),)),
         Entry(p + "ln_1.bias", (D,), (("ln_attn", "bias"),)),
         Entry(p + "attn.c_attn.weight", (D, 3 * HE), (("attn", "wq"), ("attn", "wk"), ("attn", "wv")), "split"),
         Entry(p + "attn.c_attn.bias", (3 * HE,), (("attn", "bq"), ("attn", "bk"), ("attn", "bv")), "split"),
         Entry(p + "attn.c_proj.weight", (HE, D), (("attn", "wo"),)),
         Entry(p + "attn.c_proj.bias", (D,), (("attn", "bo"),)),
         Entry(p + "ln_2.weight", (D,), (("ln_mlp", "scale"),)), Entry(p + "ln_2.bias", (D,), (("ln_mlp", "bias"),)),
         Entry(p + "mlp.c_fc.weight", (D, F), (("mlp", "wi"),)), Entry(p + "mlp.c_fc.bias", (F,), (("mlp", "bi"),)),
         Entry(p + "mlp.c_proj.weight", (F, D), (("mlp", "wo"),)),
         Entry(p + "mlp.c_proj.bias", (D,), (("mlp", "bo"),))]
    top = [Entry("transformer.wte.weight", (m.vocab_size, D), (("embed",),), per_layer=False),
           Entry("transformer.wpe.weight", (m.seq_len, D), (("pos_embed",),), per_layer=False),
           Entry("transformer.ln_f.weight", (D,), (("ln_final", "scale"),), per_layer=False),
           Entry("transformer.ln_f.bias", (D,), (("ln_final", "bias"),), per_layer=False)]
    return e + top


def _llama(m: ModelConfig) -> list[Entry]:
    p, a = "model.layers.{i}.", "model.layers.{i}.self_attn."
    D, HE, KE, F = m.embed_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.mlp_dim
    e = [Entry(p + "input_layernorm.weight", (D,), (("ln_attn", "scale"),)),
         Entry(a + "q_proj.weight", (HE, D), (("attn", "wq"),), "linear"),
         Entry(a + "k_proj.weight", (KE, D), (("attn", "wk"),), "linear"),
         Entry(a + "v_proj.weight", (KE, D), (("attn", "wv"),), "linear"),
         Entry(a + "o_proj.weight", (D, HE), (("attn", "wo"),), "linear"),
         Entry(p + "post_attention_layernorm.weight", (D,), (("ln_mlp", "scale"),)),
         Entry(p + "mlp.gate_proj.weight", (F, D), (("mlp", "wi_gate"),), "linear"),
         Entry(p + "mlp.up_proj.weight", (F, D), (("mlp", "wi_up"),), "linear"),
         Entry(p + "mlp.down_proj.weight", (D, F), (("mlp", "wo"),), "linear")]
    if m.qkv_bias:
        e += [Entry(a + f"{x}_proj.bias", (n,), (("attn", f"b{x}"),)) for x, n in (("q", HE), ("k", KE), ("v", KE))]
    return e + [Entry("model.embed_tokens.weight", (m.vocab_size, D), (("embed",),), per_layer=False),
                Entry("model.norm.weight", (D,), (("ln_final", "scale"),), per_layer=False)]


def entries(m: ModelConfig) -> list[Entry]:
    """Every Hugging Face tensor of a model of config `m`, with `{i}` for the layer index."""
    m = m.resolved()
    out = _gpt2(m) if m.family == "gpt2" else _llama(m)
    if not m.tied_head:
        out.append(Entry("lm_head.weight", (m.vocab_size, m.embed_dim), (("head",),), "linear", per_layer=False))
    return out


def expanded(m: ModelConfig) -> list[tuple[str, Entry, int]]:
    """(name, entry, layer index or -1) of every Hugging Face tensor of the model, by name."""
    out = [(e.hf.format(i=i), e, i) for e in entries(m) if e.per_layer for i in range(m.num_layers)]
    return sorted(out + [(e.hf, e, -1) for e in entries(m) if not e.per_layer], key=lambda t: t[0])


def to_jaxsys(entry: Entry, hf_TT: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """Leaf `k` of `entry` in jaxsys layout `shape`, from the Hugging Face tensor."""
    if entry.kind == "linear":
        hf_TT = hf_TT.T
    elif entry.kind == "split":
        hf_TT = np.split(hf_TT, len(entry.leaves), axis=-1)[k]
    return np.ascontiguousarray(hf_TT.reshape(shape))


def to_hf(entry: Entry, leaves: list[np.ndarray]) -> np.ndarray:
    """The Hugging Face tensor of `entry` from its jaxsys leaves (the inverse of `to_jaxsys`)."""
    if entry.kind == "linear":
        return np.ascontiguousarray(leaves[0].reshape(entry.shape[::-1]).T)
    if entry.kind == "split":
        return np.concatenate([x.reshape(*entry.shape[:-1], -1) for x in leaves], axis=-1)
    return np.ascontiguousarray(leaves[0].reshape(entry.shape))
