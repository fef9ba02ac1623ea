"""The planner's closed forms for a train step's temporaries, per device, in bytes.

`closed_form_activations` (Korthikanti et al. 2022, plus the logits) is what `jaxsys plan` has
always printed beside XLA's temp; `closed_form_temporaries` extends it, term by term under the
kinds `jaxsys.tools.memory_breakdown` sorts XLA's live buffers into, with what must also be live
at the memory peak (the head's weight gradient, ZeRO-3's gathered weights). Letters as in
`jaxsys.tools.planner`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsys.config import Config
from jaxsys.parallel.mesh import batch_ways


def closed_form_activations(cfg: Config, sizes: dict[str, int]) -> float:
    """Korthikanti et al. 2022 (Eqs. 1–2) per device, in the compute dtype, without dropout
    masks: per layer sbD·(4 + A/t) + a·s²·b/t elements without SP, sbD·(4 + A)/t + a·s²·b/t with
    SP, sbD (/t with SP) with full remat; A = QKV + attention-output + MLP inputs/outputs in
    units of D. Plus the fp32 logits and their gradient, sbV/t each (V → V/n with the
    tiled loss, n = model.loss_vocab_tiles: one tile's). The sum of `closed_form_temporaries`' activation terms.

    Under context parallelism (c = mesh.context) s is this device's T/c positions, and the
    saved attention probabilities are a·(T/c)·T·b/t for all-gather (local queries, every key),
    (a/c)·T²·b/t for Ulysses (every position, a/c heads) and none for the ring, whose backward
    recomputes each block from q, k, v and the log-sum-exp (flash-attention style)."""
    terms = activation_terms(cfg, sizes)
    return sum(terms.values())


def activation_terms(cfg: Config, sizes: dict[str, int]) -> dict[str, float]:
    """`closed_form_activations` per device in bytes, by the kinds `memory_breakdown` sorts
    XLA's live buffers into:

        attention        L · a·scores·b/t · β         saved probabilities (scores: s², or as CP says)
        attention other  L · sbD·(QKV + out)/t · β    q, k, v and the attention output (A's part)
        mlp              L · sbD·(MLP)/t · β          the MLP's inputs/outputs (A's part)
        other forward    L · sbD·4 (/t with SP) · β   layer inputs and norms (the "4");
                         full remat: L · sbD (/t with SP) · β, every other term of a layer 0
        logits           2 · b·s·V/t · 4              float32 logits and their gradient; with
                                                      model.loss_vocab_tiles = n: 2 · b·s·V/(t·n) · 4

    β = bytes of the compute dtype, t = tensor, b = sequences per device per microbatch."""
    m = cfg.model.resolved()
    t, c = sizes["tensor"], sizes.get("context", 1)
    b = cfg.train.batch_size // cfg.train.grad_accum // batch_ways(sizes)
    T, D, L = m.seq_len, m.embed_dim, m.num_layers
    s = T // c
    scores = {"all-gather": s * T, "ulysses": T * T / c, "ring": 0.0}[cfg.context_parallel.kind] if c > 1 else s * s
    beta = np.dtype(m.compute_dtype).itemsize
    sp = cfg.mesh.sequence_parallel
    mlp_units = width_units(m) - _attention_units(m)
    out = {"logits": 2 * b * s * m.vocab_size / t / max(m.loss_vocab_tiles, 1) * 4}
    if m.remat == "full":
        out.update({"attention": 0.0, "attention other": 0.0, "mlp": 0.0,
                    "other forward": L * s * b * D / (t if sp else 1) * beta})
    else:
        out.update({"attention": L * m.num_heads * scores * b / t * beta,
                    "attention other": L * s * b * D * _attention_units(m) / t * beta,
                    "mlp": L * s * b * D * mlp_units / t * beta,
                    "other forward": L * s * b * D * 4 / (t if sp else 1) * beta})
    return out


def closed_form_temporaries(cfg: Config, sizes: dict[str, int], tp_param_bytes: float) -> dict[str, float]:
    """What the compiled step must hold at its memory peak (the start of the backward, every
    activation saved) beyond its arguments, per device in bytes, by term (the kinds of
    `memory_breakdown`, so each sits beside XLA's number): `activation_terms`, and

        weight-shaped     the head's weight gradient, V·D/t · param bytes (tied: the embedding's;
                          the backward starts there, so it is live at the peak)
        gathered weights  ZeRO-3 (fsdp > 1): the gathered head / embedding table(s), which the
                          backward of the head needs, and one layer's gathered weights (the
                          layer in use): `tp_param_bytes` (parameters per tensor shard) less
                          the table(s), over L

    plus "total temporaries", their sum."""
    m = cfg.model.resolved()
    out = activation_terms(cfg, sizes)
    table = m.vocab_size * m.embed_dim / sizes["tensor"] * np.dtype(m.param_dtype).itemsize
    tables = table * (1 if m.tied_head else 2)
    out["weight-shaped"] = table
    zero3 = cfg.mesh.zero_stage == 3 and sizes["fsdp"] > 1
    out["gathered weights"] = tables + (tp_param_bytes - tables) / m.num_layers if zero3 else 0.0
    out["total temporaries"] = sum(out.values())
    return out


def _attention_units(m: Any) -> float:
    """The attention's part of A (`_width_units`): QKV + output in units of D (MLA: its latents,
    queries, keys, values and output)."""
    if m.attention_kind == "mla":
        W = m.qk_nope_dim + m.qk_rope_dim
        width = m.q_lora_rank + m.kv_lora_rank + m.qk_rope_dim + 2 * m.num_heads * (W + m.v_head_dim)
        return width / m.embed_dim
    return ((m.num_heads + 2 * m.num_kv_heads) * m.head_dim + m.num_heads * m.head_dim) / m.embed_dim


def width_units(m: Any) -> float:
    """A of the activation formula: QKV, attention output and MLP activations in units of D
    (MLA: its latents q_lora + kv_lora + Y, queries and keys H·W, values and output H·E; dense MLP width
    counted for every layer, MoE layers not modelled)."""
    mlp = (2 if m.family == "gpt2" else 3) * m.mlp_dim / m.embed_dim
    if m.attention_kind == "mla":
        W = m.qk_nope_dim + m.qk_rope_dim
        width = m.q_lora_rank + m.kv_lora_rank + m.qk_rope_dim + 2 * m.num_heads * (W + m.v_head_dim)
        return width / m.embed_dim + mlp
    return ((m.num_heads + 2 * m.num_kv_heads) * m.head_dim + m.num_heads * m.head_dim) / m.embed_dim + mlp
