"""Tiny random Hugging Face models, built offline, every parameter moved away from its initial
value (so a swapped or missing mapping cannot hide behind ones, zeros or equal tensors), saved
with `save_pretrained`; and the logits `transformers` computes for them (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

V, T = 96, 24  # vocabulary, test sequence length
TOKENS_BT = np.random.RandomState(0).randint(0, V, (8, T))  # 8 rows: the batch splits over data × fsdp

_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attention_dropout=0.0)
_ROPE3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, layer_norm_epsilon=1e-4, bos_token_id=0, eos_token_id=1)

# name -> (model class, config): what each covers is in its name.
SPECS = {
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(**_GPT2)),
    "gpt2-exact-gelu": (transformers.GPT2LMHeadModel,
                        lambda: transformers.GPT2Config(**_GPT2, activation_function="gelu")),
    "llama-gqa-llama3-tied": (transformers.LlamaForCausalLM,
                              lambda: transformers.LlamaConfig(**_LLAMA, rope_parameters=_ROPE3,
                                                               tie_word_embeddings=True)),
    "mistral-head-dim-16": (transformers.MistralForCausalLM,
                            lambda: transformers.MistralConfig(**{**_LLAMA, "num_attention_heads": 8,
                                                                  "num_key_value_heads": 4},
                                                               head_dim=16, sliding_window=None)),
    "qwen2-qkv-bias": (transformers.Qwen2ForCausalLM,
                       lambda: transformers.Qwen2Config(**_LLAMA, tie_word_embeddings=False)),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Add N(0, 0.2) noise to every parameter (norm scales and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def build(name: str, out: Path, **save_kw) -> torch.nn.Module:
    """Model `name` of `SPECS`, perturbed, saved to `out` (safetensors); returned in eval mode."""
    cls, config = SPECS[name]
    torch.manual_seed(0)
    model = cls(config()).eval()
    perturb(model)
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    return model


def logits(model: torch.nn.Module, tokens_BT: np.ndarray = TOKENS_BT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BT)).logits.float().numpy()
