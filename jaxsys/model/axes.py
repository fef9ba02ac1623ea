"""The one glossary of dimension letters, and the logical axis names the model uses.

Shapes are written in variable names (`x_BTD`: batch × sequence × embed); lower-case letters
are the per-device or per-block share of a dimension (`b` rows of one microbatch on one
device). Every module of jaxsys, the Pallas kernels included, uses these letters and no other
meaning for them.

    B  batch (sequences)                 b  rows of one microbatch on one device
    T  sequence (query positions)        S  key/value positions (= T in self-attention; the
                                            slots of a KV cache when decoding)
    D  embed (model width)               E  head size (`model.head_dim`)
    H  query heads                       K  key/value heads (`model.num_kv_heads`)
    G  query heads per K/V head (H / K)  F  MLP hidden (`model.mlp_dim`)
    V  vocabulary                        L  layers
    J  pieces fused into one matmul (G + 2 for Q, K, V; 2 for SwiGLU's gate and up)
    A  gradient-accumulation microbatches per optimizer step (`train.grad_accum`)
    M  pipeline microbatches (`pipeline.microbatches`)
    P  pipeline stages (`mesh.pipe`)     C  layer chunks per stage (`pipeline.virtual_stages`)
    N  pipeline schedule ticks           Z  pipeline stash slots
    O  new-token slots of a generation   R  draft tokens of one speculative round (γ)
    X  routed experts (`model.moe.num_experts`; the MoE hidden size is F = `moe.expert_dim`)
    I  a token's expert choices (`model.moe.top_k`)
    U  capacity: slots of one expert's buffer per sequence (`jaxsys.model.moe.capacity`)

Multi-head latent attention (`model.attention_kind=mla`, `jaxsys.model.mla`), with the three
letters the alphabet had left; E is then the value head size (`model.v_head_dim`), the size the
output projection reads per head:

    Q  a latent's rank: the query latent's (`model.q_lora_rank`) or the K/V latent's
       (`model.kv_lora_rank`); an array holds one of them and its name says which (cq_BTQ, ckv_BTQ)
    W  a query/key head (`model.qk_nope_dim` + `model.qk_rope_dim`)
    Y  its decoupled RoPE part (`model.qk_rope_dim`; the key's is one per token, for all heads);
       the rest, W - Y, has no letter (`q_nope`, `k_nope`)

Logical axes (names, not letters) are what parameters and activations are annotated with;
`jaxsys.parallel.rules` maps them onto mesh axes, and model code never names a mesh axis:

    batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers, residual_seq, expert, latent

`residual_seq` is the sequence axis of the residual stream, kept apart from attention's `seq`
so that sequence parallelism can split the one over `tensor` while the other stays whole.
`expert` is the leading axis of the MoE experts' weights ([X, D, F] and [X, F, D]).
`latent` is MLA's compressed rank axis (Q, and the K/V latent + RoPE key width): every device
computes the whole latent (no rule splits it), heads are split after it.
"""

from __future__ import annotations

Axes = tuple[str | None, ...]

# Activations.
ACT_BTD: Axes = ("batch", "residual_seq", "embed")  # the residual stream
IN_BTD: Axes = ("batch", "seq", "embed")  # the input of a column-parallel matmul
Q_BTHE: Axes = ("batch", "seq", "heads", "head_dim")
KV_BTKE: Axes = ("batch", "seq", "kv_heads", "head_dim")
H_BTF: Axes = ("batch", "seq", "mlp")
LOGITS_BTV: Axes = ("batch", "seq", "vocab")
TOKENS_BT: Axes = ("batch", "seq")
EXPERT_XDF: Axes = ("expert", "embed", "mlp")  # an MoE layer's w_in / w_gate
EXPERT_XFD: Axes = ("expert", "mlp", "embed")  # its w_out
