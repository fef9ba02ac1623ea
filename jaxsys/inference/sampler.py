"""Logits processing and token sampling for a batch of requests, each with its own settings.

A generation engine serves B requests at once, each with its own temperature, truncation and
penalties. Here the settings are data: `stack_params` turns B `SamplingParams` into [B] arrays
(`SamplerArrays`, a pytree), so one compiled step serves every mix of settings, and no Python
branch ever looks at a traced value. An "off" value (temperature 1, top_k 0, top_p 1, min_p 0,
repetition_penalty 1, presence_penalty 0) leaves its row bit-for-bit unchanged.

`processed_logits` applies, in this order (Hugging Face's order for the warpers):

    1. ids >= num_tokens -> -inf   (the tokenizer's vocabulary is smaller than the padded one)
    2. repetition penalty          seen logit > 0 -> logit / r, else logit * r  (CTRL)
    3. presence penalty            seen logit -> logit - p                      (OpenAI)
    4. temperature                 logit / t; t = 0 is greedy: 0 at the argmax, -inf elsewhere
    5. top-k, 6. top-p, 7. min-p   each sets the tokens it removes to -inf

Ties. Every truncation is a threshold on values, so tokens with equal logits are kept or
removed together: the result never depends on token ids, on how a sort orders equal values,
or on a permutation of the vocabulary, and at least one token always survives.

- top-k keeps every token whose logit is >= the k-th largest; a tie at the k-th value keeps
  all the tied tokens (more than k may survive), as Hugging Face's `TopKLogitsWarper` does.
- top-p sorts probabilities in descending order, finds the shortest prefix whose cumulative
  sum reaches (>=) top_p, and keeps every token whose probability is >= the last one in that
  prefix: the smallest nucleus, widened by the tokens tied with its least likely member.
  At an exact boundary (cumulative sum == top_p in float32) the prefix stops there.
- min-p keeps tokens with p >= min_p * p_max, computed as exp(logit - max logit) >= min_p
  (the same ratio without normalising); the argmax always survives.
- greedy (temperature 0) picks the argmax of the penalised logits, the lowest id among ties
  (as `jnp.argmax`).

Each row needs at least one finite logit below `num_tokens`; a row of only -inf is undefined.

Shapes: B requests, V vocabulary (the model's, possibly padded; see jaxsys.model.axes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from jaxsys.config import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings."""

    temperature: float = 1.0  # 0 = greedy (argmax of the penalised logits)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus, in (0, 1]; 1 = off
    min_p: float = 0.0  # in [0, 1); 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # > 0; 1 = off (seen logit > 0 -> logit / r, else logit * r)
    presence_penalty: float = 0.0  # seen tokens' logits minus this; 0 = off; may be negative
    seed: int = 0  # the request's own random stream (`request_keys`)

    def check(self, vocab_size: int) -> None:
        """Raise `ConfigError`, one line naming the field, its value and a fix, for settings
        that cannot sample. `vocab_size` is the number of real tokens (the tokenizer's)."""
        def bad(field: str, rule: str) -> ConfigError:
            return ConfigError(f"sampling.{field}={getattr(self, field)!r}: {rule}")

        t = self.temperature
        if not (t >= 0 and math.isfinite(t)):  # inf would turn the -inf of masked ids into NaN
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy decoding).")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= vocab_size:
            raise bad("top_k", f"must be an integer between 0 (off) and the vocabulary size "
                               f"{vocab_size}.")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]; use 1 to turn nucleus sampling off.")
        if not 0 <= self.min_p < 1:
            raise bad("min_p", "must be in [0, 1); use 0 to turn min-p off.")
        r = self.repetition_penalty
        if not (r > 0 and math.isfinite(r)):
            raise bad("repetition_penalty", "must be a finite number > 0; use 1 to turn it off.")
        if not math.isfinite(self.presence_penalty):
            raise bad("presence_penalty", "must be a finite number; use 0 to turn it off.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad("seed", "must be an integer in [0, 2**63).")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@flax.struct.dataclass
class SamplerArrays:
    """The settings of B requests, one [B] array per field; a pytree, so traced under jit."""

    temperature_B: jax.Array  # float32
    top_k_B: jax.Array  # int32
    top_p_B: jax.Array  # float32
    min_p_B: jax.Array  # float32
    repetition_penalty_B: jax.Array  # float32
    presence_penalty_B: jax.Array  # float32


def stack_params(params: Sequence[SamplingParams]) -> SamplerArrays:
    """The [B] arrays of B requests' settings, in order. Does not validate: call
    `SamplingParams.check` when a request arrives."""
    def col(name: str, dtype: jnp.dtype) -> jax.Array:
        return jnp.asarray([getattr(p, name) for p in params], dtype).reshape(len(params))

    return SamplerArrays(
        temperature_B=col("temperature", jnp.float32), top_k_B=col("top_k", jnp.int32),
        top_p_B=col("top_p", jnp.float32), min_p_B=col("min_p", jnp.float32),
        repetition_penalty_B=col("repetition_penalty", jnp.float32),
        presence_penalty_B=col("presence_penalty", jnp.float32))


def request_keys(params: Sequence[SamplingParams]) -> jax.Array:
    """Typed PRNG keys [B], `jax.random.key(seed)` of each request; the decode loop folds in or
    splits per step so that a request's stream depends on its seed alone."""
    return jnp.stack([jax.random.key(p.seed) for p in params])


def _mask_padding(logits_BV: jax.Array, num_tokens: int) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32)
    if num_tokens:  # static: a Python int, not a traced value
        real_V = jnp.arange(logits_BV.shape[-1]) < num_tokens
        logits_BV = jnp.where(real_V, logits_BV, -jnp.inf)
    return logits_BV


def _at(sorted_BV: jax.Array, index_B: jax.Array) -> jax.Array:
    """sorted_BV[b, index_B[b]] for every row, the index clipped into [0, V)."""
    index_B = jnp.clip(index_B, 0, sorted_BV.shape[-1] - 1)
    return jnp.take_along_axis(sorted_BV, index_B[:, None], axis=-1)[:, 0]


def processed_logits(logits_BV: jax.Array, arrays: SamplerArrays, seen_BV: jax.Array,
                     num_tokens: int = 0) -> jax.Array:
    """float32 [B, V] logits of the distribution each row samples from (steps in the module
    docstring). `logits_BV` are the model's raw logits (any float dtype); `seen_BV` is bool,
    True for ids present in the row's prompt or output so far; `num_tokens` (static) > 0
    removes the padded ids >= num_tokens. Removed tokens are -inf; rows are independent."""
    logits_BV = _mask_padding(logits_BV, num_tokens)
    col = lambda a_B: a_B[:, None]  # noqa: E731  [B] -> [B, 1], to broadcast over V

    r_B1 = col(arrays.repetition_penalty_B)
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / r_B1, logits_BV * r_B1)
    penalised_BV = jnp.where(seen_BV, penalised_BV - col(arrays.presence_penalty_B), logits_BV)

    greedy_B1 = col(arrays.temperature_B) == 0
    is_argmax_BV = jnp.arange(logits_BV.shape[-1]) == jnp.argmax(penalised_BV, axis=-1)[:, None]
    # 0 = log of probability 1, so a greedy row is a normalised one-token distribution.
    one_hot_BV = jnp.where(is_argmax_BV, 0.0, -jnp.inf)
    safe_t_B1 = jnp.where(greedy_B1, 1.0, col(arrays.temperature_B))
    x_BV = jnp.where(greedy_B1, one_hot_BV, penalised_BV / safe_t_B1)

    # One descending sort of values serves all three truncations: each needs only a per-row
    # threshold value, never the ids, so nothing is gathered or scattered back.
    sorted_BV = -jnp.sort(-x_BV, axis=-1)

    k_B = arrays.top_k_B
    kth_B = jnp.where(k_B > 0, _at(sorted_BV, k_B - 1), -jnp.inf)
    x_BV = jnp.where(x_BV >= kth_B[:, None], x_BV, -jnp.inf)
    sorted_BV = jnp.where(sorted_BV >= kth_B[:, None], sorted_BV, -jnp.inf)  # still sorted

    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    cum_BV = jnp.cumsum(probs_BV, axis=-1)
    before_BV = jnp.concatenate([jnp.zeros_like(cum_BV[:, :1]), cum_BV[:, :-1]], axis=-1)
    # Token i (sorted) is in the nucleus while the mass above it has not reached top_p; the
    # cumulative sum never decreases, so the count is the length of the nucleus (>= 1).
    top_p_B = arrays.top_p_B
    length_B = jnp.sum(before_BV < top_p_B[:, None], axis=-1)
    # top_p = 1 is skipped outright: the float32 sum can reach 1 before the tail of the
    # vocabulary and would drop those tokens, and off must mean unchanged.
    last_B = jnp.where(top_p_B < 1, _at(sorted_BV, length_B - 1), -jnp.inf)
    x_BV = jnp.where(x_BV >= last_B[:, None], x_BV, -jnp.inf)

    max_B1 = sorted_BV[:, :1]  # truncation never removes the maximum
    return jnp.where(jnp.exp(x_BV - max_B1) >= col(arrays.min_p_B), x_BV, -jnp.inf)


def sample_tokens(logits_BV: jax.Array, arrays: SamplerArrays, seen_BV: jax.Array,
                  keys_B: jax.Array, num_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """One token per row: (tokens_B int32, logprobs_B float32).

    Row b draws `jax.random.categorical(keys_B[b], processed_logits_b)` (greedy rows take the
    argmax), so its token depends only on its own inputs and key, never on the batch.
    `keys_B` are typed keys (`jax.random.key`). `logprobs_B` is the natural-log probability
    of the chosen token under the model's own distribution, log_softmax of the raw logits over
    ids < num_tokens, before any penalty or truncation (what vLLM reports by default)."""
    x_BV = processed_logits(logits_BV, arrays, seen_BV, num_tokens)
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, x_BV)
    # A greedy row has one finite logit, so categorical already returns it; the explicit
    # argmax keeps greedy exact whatever the random draw does with -inf.
    tokens_B = jnp.where(arrays.temperature_B == 0, jnp.argmax(x_BV, axis=-1), sampled_B)
    tokens_B = tokens_B.astype(jnp.int32)
    model_logprobs_BV = jax.nn.log_softmax(_mask_padding(logits_BV, num_tokens), axis=-1)
    logprobs_B = jnp.take_along_axis(model_logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, logprobs_B
