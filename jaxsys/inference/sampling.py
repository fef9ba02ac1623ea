"""Text in, text out: prompts and settings to completions, through the KV-cache engine.

`sample_texts` / `complete` encode prompts, check every setting before anything compiles,
run `decode.Generator` (or `speculative.speculative_generate` with a draft model), apply stop
strings, and decode. `generate_recompute` is the sampler this toolkit had before the KV cache:
each new token re-runs the model over the last `seq_len` tokens. It stays as the baseline
`experiments/bench_generation.py` measures the cache against.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import ConfigError
from jaxsys.data.tokenizers import Tokenizer
from jaxsys.inference.decode import Completion, Generator, Request, check_model_state
from jaxsys.inference.sampler import SamplingParams
from jaxsys.inference.speculative import SpeculativeStats, speculative_generate
from jaxsys.model.transformer import Transformer


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "num_tokens"))
def generate_recompute(model: Transformer, params: Any, prompt_T: jax.Array, key: jax.Array, *,
                       max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                       num_tokens: int = 0, model_state: dict | None = None) -> jax.Array:
    """The no-cache baseline: the prompt followed by `max_new_tokens` sampled ids, int32
    [prompt length + max_new_tokens]; every step runs the model on the last `seq_len` tokens.

    temperature 0 means greedy decoding; top_k 0 means no truncation; `num_tokens` > 0 limits
    sampling to ids below it (the tokenizer's vocabulary, when the model's is padded larger).
    `model_state`: the variables besides the parameters (the MoE loss-free bias), if any."""
    n = prompt_T.shape[0]
    T = model.cfg.seq_len
    total = n + max_new_tokens
    buf = jnp.zeros((max(total, T),), jnp.int32).at[:n].set(prompt_T.astype(jnp.int32))

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        buf, key = carry
        length = n + i  # tokens so far
        start = jnp.maximum(length - T, 0)
        window_T = jax.lax.dynamic_slice(buf, (start,), (T,))
        logits_V = model.apply({"params": params, **(model_state or {})}, window_T[None])[0, length - start - 1]
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


@dataclasses.dataclass(frozen=True)
class TextRequest:
    """A prompt as text, with its settings and stop strings (the completion ends before the
    first one, which is not included)."""

    prompt: str
    max_new_tokens: int = 200
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class TextCompletion:
    text: str
    tokens: list[int]
    logprobs: list[float]  # nats, per token (empty under speculative decoding)
    finish_reason: str  # "stop" (a stop id or string) or "length"


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    """The prompt's ids ("" means a newline); `ConfigError` if it cannot be encoded or is empty."""
    try:
        ids = tokenizer.encode(prompt or "\n")
    except ValueError as e:
        raise ConfigError(f"Prompt {prompt!r} cannot be encoded: {e}.") from None
    if len(ids) == 0:
        raise ConfigError(f"Prompt {prompt!r} encodes to no tokens; give some text (or token ids).")
    return ids


def to_requests(tokenizer: Tokenizer, requests: Sequence[TextRequest]) -> list[Request]:
    return [Request(encode_prompt(tokenizer, r.prompt), r.max_new_tokens, r.sampling) for r in requests]


def _cut_at_stop(tokenizer: Tokenizer, c: Completion, stop: Sequence[str]) -> TextCompletion:
    text = tokenizer.decode(np.asarray(c.tokens, np.int32))
    hits = [text.find(s) for s in stop if s and s in text]
    if not hits:
        return TextCompletion(text, c.tokens, c.logprobs, c.finish_reason)
    cut = min(hits)
    k = len(c.tokens)  # the longest token prefix whose text ends at or before the stop string
    while k > 0 and len(tokenizer.decode(np.asarray(c.tokens[:k], np.int32))) > cut:
        k -= 1
    return TextCompletion(text[:cut], c.tokens[:k], c.logprobs[:k], "stop")


def complete(generator: Generator, tokenizer: Tokenizer, requests: Sequence[TextRequest], *,
             draft: Generator | None = None, gamma: int = 4) -> tuple[list[TextCompletion], SpeculativeStats | None]:
    """Completions of `requests` (one batch), and the speculative counts when a draft is given."""
    token_requests = to_requests(tokenizer, requests)
    if draft is not None:
        out, stats = speculative_generate(generator, draft, token_requests, gamma)
    else:
        stats = None
        stops = [r.stop for r in requests]

        def finished(rows: list[list[int]]) -> list[int]:  # stop strings, checked between chunks
            return [b for b, ids in enumerate(rows)
                    if any(s and s in tokenizer.decode(np.asarray(ids, np.int32)) for s in stops[b])]

        chunk = 32 if any(stops) else 0
        out = generator.generate(token_requests, chunk=chunk, on_chunk=finished if chunk else None)
    return [_cut_at_stop(tokenizer, c, r.stop) for c, r in zip(out, requests)], stats


def sample_text(model: Transformer, params: Any, tokenizer: Tokenizer, prompt: str,
                max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, seed: int = 0,
                model_state: dict | None = None) -> str:
    """The prompt and `max_new_tokens` tokens after it, on one device: the sample `jaxsys
    train` prints at the end. It uses the recompute sampler, not the KV-cache engine: for one
    short sample the engine's compiles cost more than they save (measured 2026-12-01 on the
    2-core VM, shakespeare preset, 200 tokens, compile included: 1.8-2.2 s recompute against
    6.9-7.5 s through `Generator`). `model_state`: the run's variables besides the parameters
    (`TrainState.model_state`: the MoE loss-free bias), if any."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    sampling.check(tokenizer.vocab_size or model.cfg.vocab_size)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be ≥ 0.")
    check_model_state(model.cfg, model_state or {})
    prompt_ids = encode_prompt(tokenizer, prompt)
    params, model_state = jax.device_put((params, model_state or {}), jax.devices()[0])  # small: one device
    ids = generate_recompute(model, params, jnp.asarray(prompt_ids), jax.random.key(seed),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             num_tokens=tokenizer.vocab_size, model_state=model_state)
    return tokenizer.decode(np.asarray(ids))


def with_prompt(tokenizer: Tokenizer, prompt: str, c: TextCompletion) -> str:
    """The prompt and its completion as one text, decoded together (token ids stay
    space-separated; a character split across the boundary decodes whole)."""
    ids = np.concatenate([encode_prompt(tokenizer, prompt), np.asarray(c.tokens, np.int32)])
    return tokenizer.decode(ids.astype(np.int32))
