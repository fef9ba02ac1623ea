"""Speculative decoding: a small draft model proposes γ tokens, the target verifies them in one
forward pass, and `speculative_rule.accept_draft` keeps a prefix so that the output is
distributed exactly as the target's own samples (greedy: identical to greedy target decoding).

Shapes (`jaxsys.model.axes`): B requests, R the γ draft tokens of a round, V vocabulary,
O new-token slots.

One round, for every unfinished row at once (one compiled `lax.while_loop` over rounds):
1. The draft is fed the row's last emitted token `cur` (at position n) and then its own γ
   samples x_0 .. x_{γ-1}: γ + 1 one-token steps, giving q_0 .. q_{γ-1} (the last step only
   writes x_{γ-1} into the draft's cache).
2. The target runs [cur, x_0, .., x_{γ-1}] at positions n .. n + γ in one call: p_0 .. p_γ.
3. `accept_draft` keeps a ≤ γ draft tokens and draws one more token y; the row emits
   x_0 .. x_{a-1}, y, and y becomes `cur` at position n + a + 1.
Both caches always hold every emitted token but `cur`; entries past it (rejected drafts) are
masked and later overwritten, so a rejection costs no cache copy.

Both models sample from the request's processed distribution (temperature, top-k, top-p,
min-p; `sampler.processed_logits`); any q keeps the output exact, a q close to p accepts more.
Repetition and presence penalties are refused (the penalised distribution would change along
the draft), and the whole generation must fit the context: prompt + max_new_tokens + γ ≤
seq_len (plain decoding slides the window; speculation does not).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsys.config import ConfigError
from jaxsys.inference.decode import TRACES, Completion, Generator, Request, apply_decode, bucket, prefill
from jaxsys.inference.sampler import SamplerArrays, processed_logits, stack_params
from jaxsys.inference.speculative_rule import accept_draft
from jaxsys.model.transformer import Transformer


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over the unfinished rows of every round: draft tokens proposed and accepted."""

    rounds: int
    proposed: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def _probs(logits_BV: jax.Array, arrays: SamplerArrays, num_tokens: int) -> jax.Array:
    seen_BV = jnp.zeros(logits_BV.shape, bool)  # no penalties under speculation
    return jax.nn.softmax(processed_logits(logits_BV, arrays, seen_BV, num_tokens), axis=-1)


def _round(models: tuple[Transformer, Transformer], gamma: int, num_tokens: int, mesh: Mesh | None,
           params: tuple[Any, Any], states: tuple[dict, dict],
           arrays: SamplerArrays, keys_B: jax.Array, stop_BM: jax.Array, max_new_B: jax.Array,
           s: dict) -> dict:
    """One speculative round for every row (finished rows compute and are left unchanged)."""
    target, draft = models
    B = s["n_B"].shape[0]
    rows = jnp.arange(B)
    active_B = ~s["done_B"]
    round_keys_B = jax.vmap(jax.random.fold_in)(keys_B, s["n_B"])  # a row's stream: its seed and count
    caches = s["draft_caches"]
    tok_B, pos_B = s["cur_B"], s["pos_B"]
    drafted, q_list = [], []
    for j in range(gamma + 1):
        logits_B1V, caches = apply_decode(draft, params[1], tok_B[:, None], (pos_B + j)[:, None], caches,
                                           jnp.zeros((B,), jnp.int32), mesh, states[1])
        if j == gamma:
            break  # this step only wrote x_{γ-1} into the draft's cache
        q_BV = _probs(logits_B1V[:, 0], arrays, num_tokens)
        step_keys_B = jax.vmap(lambda k: jax.random.fold_in(k, j + 1))(round_keys_B)
        tok_B = jax.vmap(jax.random.categorical)(step_keys_B, jnp.log(q_BV)).astype(jnp.int32)
        drafted.append(tok_B)
        q_list.append(q_BV)
    draft_BR = jnp.stack(drafted, axis=1)
    q_BRV = jnp.stack(q_list, axis=1)
    fed_BT = jnp.concatenate([s["cur_B"][:, None], draft_BR], axis=1)  # T = γ + 1
    positions_BT = pos_B[:, None] + jnp.arange(gamma + 1)
    logits_BTV, target_caches = apply_decode(target, params[0], fed_BT, positions_BT, s["target_caches"],
                                              None, mesh, states[0])
    p_BTV = jax.vmap(lambda lo: _probs(lo, arrays, num_tokens), in_axes=1, out_axes=1)(logits_BTV)
    accept_keys_B = jax.vmap(lambda k: jax.random.fold_in(k, 0))(round_keys_B)
    a_B, y_B = accept_draft(p_BTV, q_BRV, draft_BR, accept_keys_B)

    emitted_BT = jnp.where(jnp.arange(gamma + 1) < a_B[:, None], jnp.pad(draft_BR, ((0, 0), (0, 1))), 0)
    emitted_BT = emitted_BT.at[rows, a_B].set(y_B)
    count_B = a_B + 1
    # A stop id among the emitted tokens ends the row there (kept, as in decode: dropped later).
    is_stop_BT = jnp.any(emitted_BT[:, :, None] == stop_BM[:, None, :], axis=-1) & (jnp.arange(gamma + 1) < count_B[:, None])
    first_stop_B = jnp.argmax(is_stop_BT, axis=1)
    stopped_B = jnp.any(is_stop_BT, axis=1)
    count_B = jnp.where(stopped_B, first_stop_B + 1, count_B)
    count_B = jnp.minimum(count_B, max_new_B - s["n_B"])  # never past max_new_tokens
    slots_BT = s["n_B"][:, None] + jnp.arange(gamma + 1)
    write_BT = (jnp.arange(gamma + 1) < count_B[:, None]) & active_B[:, None]
    out = s["tokens_BO"]
    s = dict(s)
    s["tokens_BO"] = out.at[rows[:, None], jnp.where(write_BT, slots_BT, out.shape[1])].set(emitted_BT, mode="drop")
    stopped_B = stopped_B & (first_stop_B < count_B)
    s["stopped_B"] = s["stopped_B"] | (stopped_B & active_B)
    s["n_B"] = s["n_B"] + jnp.where(active_B, count_B, 0)
    s["done_B"] = s["done_B"] | s["stopped_B"] | (s["n_B"] >= max_new_B)
    s["cur_B"] = jnp.where(active_B, y_B, s["cur_B"])
    s["pos_B"] = jnp.where(active_B, pos_B + a_B + 1, pos_B)
    s["draft_caches"], s["target_caches"] = caches, target_caches
    s["proposed"] = s["proposed"] + gamma * jnp.sum(active_B)
    s["accepted"] = s["accepted"] + jnp.sum(jnp.where(active_B, a_B, 0))
    s["rounds"] = s["rounds"] + 1
    return s


@partial(jax.jit, static_argnames=("models", "gamma", "num_tokens", "mesh"), donate_argnames=("carry",))
def speculative_loop(models: tuple[Transformer, Transformer], params: tuple[Any, Any], carry: dict,
                     arrays: SamplerArrays, keys_B: jax.Array, stop_BM: jax.Array, max_new_B: jax.Array,
                     gamma: int, num_tokens: int = 0, mesh: Mesh | None = None,
                     states: tuple[dict, dict] = ({}, {})) -> dict:
    """Rounds until every row is finished (compiled once per batch, cache size and γ).
    `states`: the two models' states besides their parameters (the MoE bias), `{}` if none."""
    TRACES["speculative"] += 1
    body = partial(_round, models, gamma, num_tokens, mesh, params, states, arrays, keys_B, stop_BM, max_new_B)
    return jax.lax.while_loop(lambda s: jnp.any(~s["done_B"]), body, carry)


def check_speculative(target: Generator, draft: Generator, requests: Sequence[Request], gamma: int) -> None:
    """`ConfigError` for a draft, γ or request that speculation cannot serve, before compiling."""
    target.check(requests)
    if draft.mesh != target.mesh:
        raise ConfigError("The draft and the target must be on the same mesh (or both on one device).")
    if not 1 <= gamma <= 16:
        raise ConfigError(f"gamma={gamma}: the draft length must be between 1 and 16 tokens.")
    if draft.cfg.vocab_size != target.cfg.vocab_size or draft.num_tokens != target.num_tokens:
        raise ConfigError(f"The draft's vocabulary ({draft.cfg.vocab_size}, tokenizer {draft.num_tokens}) differs "
                          f"from the target's ({target.cfg.vocab_size}, tokenizer {target.num_tokens}): train the "
                          "draft with the same tokenizer and model.vocab_size.")
    limit = min(target.cfg.seq_len, draft.cfg.seq_len)
    for i, r in enumerate(requests):
        if r.sampling.repetition_penalty != 1 or r.sampling.presence_penalty != 0:
            raise ConfigError(f"Request {i}: speculative decoding does not apply repetition or presence "
                              "penalties; drop them or decode without a draft.")
        if len(r.prompt_ids) + r.max_new_tokens + gamma > limit:
            raise ConfigError(f"Request {i}: prompt ({len(r.prompt_ids)}) + max_new_tokens ({r.max_new_tokens}) + "
                              f"gamma ({gamma}) exceeds the context {limit} of the models; speculative decoding "
                              "stays inside it: ask for fewer tokens or decode without a draft.")


def speculative_generate(target: Generator, draft: Generator, requests: Sequence[Request],
                         gamma: int = 4) -> tuple[list[Completion], SpeculativeStats]:
    """Completions of `requests` by the target model, drafted `gamma` tokens at a time by
    `draft`, and the acceptance counts. Same `Completion` semantics as `Generator.generate`."""
    check_speculative(target, draft, requests, gamma)
    B = len(requests)
    O = max(r.max_new_tokens for r in requests) + gamma + 1  # a round may run past max_new
    slots = bucket(max(len(r.prompt_ids) + r.max_new_tokens for r in requests) + gamma + 1,
                   min(target.cfg.seq_len, draft.cfg.seq_len))
    prompts = [list(map(int, r.prompt_ids)) for r in requests]
    width = bucket(max(len(p) for p in prompts), slots)
    tokens_BT = np.zeros((B, width), np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, :len(p)] = p
    lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
    caches = []
    for g in (target, draft):  # both caches hold the prompt; its last token is re-fed as `cur`
        _, c = prefill(g.model, g.params, jnp.asarray(tokens_BT), lengths_B, g.empty_caches(B, slots), g.mesh,
                       g.model_state)
        caches.append(c)
    carry = {"target_caches": caches[0], "draft_caches": caches[1],
             "cur_B": jnp.asarray([p[-1] for p in prompts], jnp.int32), "pos_B": lengths_B - 1,
             "tokens_BO": jnp.zeros((B, O), jnp.int32), "n_B": jnp.zeros((B,), jnp.int32),
             "done_B": jnp.asarray([r.max_new_tokens == 0 for r in requests]),
             "stopped_B": jnp.zeros((B,), bool), "proposed": jnp.zeros((), jnp.int32),
             "accepted": jnp.zeros((), jnp.int32), "rounds": jnp.zeros((), jnp.int32)}
    width = bucket(max([len(r.stop_ids) for r in requests] + [1]), 1 << 30)
    stop_BM = jnp.asarray([list(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r in requests], jnp.int32)
    keys_B = jax.vmap(jax.random.key)(jnp.asarray([r.sampling.seed for r in requests], jnp.uint32))
    carry = speculative_loop((target.model, draft.model), (target.params, draft.params), carry,
                             stack_params([r.sampling for r in requests]), keys_B, stop_BM,
                             jnp.asarray([r.max_new_tokens for r in requests], jnp.int32),
                             gamma=gamma, num_tokens=target.num_tokens, mesh=target.mesh,
                             states=(target.model_state, draft.model_state))
    n, stopped, out = (np.asarray(carry[k]) for k in ("n_B", "stopped_B", "tokens_BO"))
    completions = []
    for b, r in enumerate(requests):
        k = int(n[b]) - int(stopped[b])
        completions.append(Completion(out[b, :k].tolist(), [], "stop" if stopped[b] else "length"))
    stats = SpeculativeStats(int(carry["rounds"]), int(carry["proposed"]), int(carry["accepted"]))
    return completions, stats
