"""Autoregressive sampling with temperature and top-k.

The whole generation is one jitted `fori_loop` over a fixed-size token buffer, so it compiles
once per (prompt length, number of new tokens). Each step re-runs the model on the last
`seq_len` tokens (no KV cache yet: simple, and fast enough for small models).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

import numpy as np

from jaxsys.config import ConfigError
from jaxsys.data.tokenizers import Tokenizer
from jaxsys.model.transformer import Transformer


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "num_tokens"))
def generate(model: Transformer, params: Any, prompt_P: jax.Array, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             num_tokens: int = 0) -> jax.Array:
    """Return the prompt followed by `max_new_tokens` sampled ids, int32 [P + max_new_tokens].

    temperature 0 means greedy decoding; top_k 0 means no truncation; `num_tokens` > 0 limits
    sampling to ids below it (the tokenizer's vocabulary, when the model's is padded larger)."""
    P = prompt_P.shape[0]
    T = model.cfg.seq_len
    total = P + max_new_tokens
    buf = jnp.zeros((max(total, T),), jnp.int32).at[:P].set(prompt_P.astype(jnp.int32))

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        buf, key = carry
        length = P + i  # tokens so far
        start = jnp.maximum(length - T, 0)
        window_T = jax.lax.dynamic_slice(buf, (start,), (T,))
        logits_V = model.apply({"params": params}, window_T[None])[0, length - start - 1]
        key, sub = jax.random.split(key)
        if num_tokens:
            logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < num_tokens, logits_V, -jnp.inf)
        if top_k:
            kth = jax.lax.top_k(logits_V, top_k)[0][-1]
            logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
        greedy = jnp.argmax(logits_V)
        sampled = jax.random.categorical(sub, logits_V / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        return buf.at[length].set(token), key

    buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, key))
    return buf[:total]


def check_sampling(tokenizer: Tokenizer, vocab_size: int, prompt: str, max_new_tokens: int,
                   temperature: float, top_k: int) -> np.ndarray:
    """The prompt's ids; `ConfigError` for settings that cannot sample (checked before any
    parameter is read). `vocab_size` is the model's (used when the tokenizer's is unknown)."""
    try:
        prompt_ids = tokenizer.encode(prompt or "\n")
    except ValueError as e:
        raise ConfigError(f"Prompt {prompt!r} cannot be encoded: {e}.") from None
    vocab = tokenizer.vocab_size or vocab_size  # 0: plain ids, the model's vocabulary
    if not 0 <= top_k <= vocab:
        raise ConfigError(f"top_k={top_k} must be between 0 (off) and the vocabulary size {vocab}.")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be ≥ 0.")
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature} must be ≥ 0 (0 is greedy decoding).")
    if len(prompt_ids) == 0:
        raise ConfigError(f"Prompt {prompt!r} encodes to no tokens; give some text (or token ids).")
    return prompt_ids


def sample_text(model: Transformer, params: Any, tokenizer: Tokenizer, prompt: str,
                max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
    """Decode `max_new_tokens` tokens after `prompt` with `generate`, on one device."""
    prompt_ids = check_sampling(tokenizer, model.cfg.vocab_size, prompt, max_new_tokens, temperature, top_k)
    params = jax.device_put(params, jax.devices()[0])  # sampling is small: one device
    ids = generate(model, params, jnp.asarray(prompt_ids), jax.random.key(seed),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   num_tokens=tokenizer.vocab_size)
    return tokenizer.decode(np.asarray(ids))
