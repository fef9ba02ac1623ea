"""Training FLOPs per token of the transformer (for MFU and the planner's closed forms)."""

from __future__ import annotations

from jaxsys.config import ModelConfig


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·L·H·E·T. N counts the parameters
    used in matmuls: without the position table (gpt2) or the input embedding lookup (llama,
    untied); the attention term counts the full (not causal-halved) score matrix."""
    m = cfg.resolved()
    lookup = m.seq_len if m.family == "gpt2" else m.vocab_size
    n = num_params - lookup * m.embed_dim
    return 6.0 * n + 12.0 * m.num_layers * m.num_heads * m.head_dim * m.seq_len
