"""KV-cache generation for a batch of requests: one prefill, then a compiled decode loop.

Shapes (`jaxsys.model.axes`): B requests, T prompt positions (a bucket), S cache slots, V vocabulary,
O new-token slots (the largest `max_new_tokens` of the batch, bucketed).

How a batch runs:
1. **Prefill.** Prompts of different lengths are right-padded to one bucket T (a power of two
   ≥ 16, at most `seq_len`) and run once, filling cache slots 0 .. T-1. Each row's next-token
   logits are read at its own last prompt token, and its length is its prompt's: padding slots
   are masked until the row's own tokens overwrite them, so every row keeps its true positions.
2. **Decode.** A `lax.while_loop` samples one token per row (`sampler.sample_tokens`, with the
   key `fold_in(key(seed), n)` for the row's n-th new token), feeds it at the row's position,
   and stops when every row has met a stop id or its `max_new_tokens`: finished rows cost no
   further steps once all are finished (the batch's shape is fixed, so until then they ride
   along).
3. **Past the context.** The cache holds S = min(seq_len, bucket(prompt + new tokens)) slots. A
   row whose context fills `seq_len` still predicts its next token from all of it; then its
   last `seq_len // 2` tokens are re-prefilled (positions restart at 0) and the new token goes
   after them: learned positions (gpt2) cannot go past `seq_len`, and RoPE models do the same
   so both families behave alike. A prompt longer than `seq_len` is refused.

Each shape compiles once: the prefill per (B, T, S), the decode loop per (B, S, O) with O the
largest `max_new_tokens` rounded up to a bucket (and per bucket of stop ids per row); the cache
is donated from step to step. `Generator.compiles` counts the traces, so a run of mixed prompt
lengths costs one prefill compile per bucket it touches. A row's output depends only on its own
request (its tokens, settings and seed), never on the rest of the batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsys.config import ConfigError
from jaxsys.inference import placement
from jaxsys.inference.quantize import QuantizedWeight, dequantizing
from jaxsys.inference.sampler import SamplerArrays, SamplingParams, sample_tokens, stack_params
from jaxsys.model import hooks, kv_cache, moe
from jaxsys.model.transformer import Transformer, unstack_layers, unstack_tree
from jaxsys.parallel.install import parallelize

MIN_BUCKET = 16
TRACES: collections.Counter = collections.Counter()  # compiled shapes, by function


def bucket(n: int, cap: int) -> int:
    """The smallest power of two ≥ max(n, MIN_BUCKET), at most `cap`."""
    return min(cap, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: prompt ids, how many tokens at most, sampling and stop ids."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class Completion:
    """The new tokens of one request (without the stop id that ended it), their log-
    probabilities under the model (nats), and why it ended: "stop" or "length"."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


def check_model_state(cfg: Any, model_state: dict) -> None:
    """`ConfigError` when the model of `cfg` (a ModelConfig) applies a loss-free MoE bias and
    `model_state` does not carry it."""
    if cfg.moe.num_experts and cfg.moe.bias_update_rate > 0 and moe.BIAS not in model_state:
        raise ConfigError("This MoE model selects experts with the loss-free bias (model.moe.bias_update_rate > 0): "
                          "pass the run's model state too (model_state=LoadedRun.model_state, or the train "
                          "state's model_state).")


def empty_caches(model: Transformer, batch: int, slots: int, kv_dtype: str) -> Any:
    """Zeroed KV caches for `model`: a tuple of per-layer caches, or one stacked (scan_layers)."""
    c = model.cfg.resolved()
    if c.scan_layers:
        return kv_cache.for_model(c, batch, slots, kv_dtype, layers=c.num_layers)
    return tuple(kv_cache.for_model(c, batch, slots, kv_dtype) for _ in range(c.num_layers))


def is_quantized(params: Any) -> bool:
    """Whether any weight of `params` is int8 (`quantize.QuantizedWeight`)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return any(isinstance(x, QuantizedWeight) for x in leaves)


def apply_decode(model: Transformer, params: Any, tokens_BT: jax.Array, positions_BT: jax.Array,
                  caches: Any, logits_at_B: jax.Array | None = None,
                  mesh: Mesh | None = None, model_state: dict | None = None) -> tuple[jax.Array, Any]:
    """`Transformer.decode`, laid out on `mesh` by the parallel hooks when given, with int8
    weights dequantized at their point of use (before the parallel hooks see them).
    `model_state`: the variables besides the parameters (the MoE loss-free bias), if any."""
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(parallelize(mesh))
        if is_quantized(params):
            stack.enter_context(hooks.installed(dequantizing()))
        return model.apply({"params": params, **(model_state or {})}, tokens_BT, positions_BT, caches,
                           logits_at_B, method="decode")


@partial(jax.jit, static_argnames=("model", "mesh"), donate_argnames=("caches",))
def prefill(model: Transformer, params: Any, tokens_BT: jax.Array, lengths_B: jax.Array,
            caches: Any, mesh: Mesh | None = None, model_state: dict | None = None) -> tuple[jax.Array, Any]:
    """Run the right-padded prompts from slot 0: (float32 next-token logits [B, V] at each row's
    last prompt token, caches holding slots 0 .. T-1)."""
    TRACES["prefill"] += 1
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits_B1V, caches = apply_decode(model, params, tokens_BT, positions_BT, caches, lengths_B - 1, mesh,
                                      model_state)
    return logits_B1V[:, 0], caches


def _decode_body(model: Transformer, mesh: Mesh | None, params: Any, model_state: dict | None,
                 arrays: SamplerArrays, keys_B: jax.Array, stop_BM: jax.Array, max_new_B: jax.Array,
                 num_tokens: int, slots: int, carry: dict) -> dict:
    """One step of the decode loop: sample a token per unfinished row and feed it."""
    s = dict(carry)
    B = s["n_B"].shape[0]
    rows = jnp.arange(B)
    active_B = ~s["done_B"]
    step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, s["n_B"])
    tok_B, logprob_B = sample_tokens(s["logits_BV"], arrays, s["seen_BV"], step_keys_B, num_tokens)
    tok_B = jnp.where(active_B, tok_B, 0)
    n_B = s["n_B"]
    # A finished row writes at its slot n, past its completion (or off the end: dropped).
    s["tokens_BO"] = s["tokens_BO"].at[rows, n_B].set(tok_B, mode="drop")
    s["logprobs_BO"] = s["logprobs_BO"].at[rows, n_B].set(logprob_B, mode="drop")
    s["seen_BV"] = s["seen_BV"].at[rows, tok_B].set(s["seen_BV"][rows, tok_B] | active_B)
    s["n_B"] = n_B + active_B
    stopped_B = jnp.any(stop_BM == tok_B[:, None], axis=1)
    s["stopped_B"] = s["stopped_B"] | (stopped_B & active_B)
    s["done_B"] = s["done_B"] | stopped_B | (s["n_B"] >= max_new_B)
    pos_B = jnp.minimum(s["length_B"], slots - 1)  # finished rows write into a slot nobody reads
    logits_B1V, s["caches"] = apply_decode(model, params, tok_B[:, None], pos_B[:, None], s["caches"],
                                            jnp.zeros((B,), jnp.int32), mesh, model_state)
    s["logits_BV"] = jnp.where(active_B[:, None], logits_B1V[:, 0], s["logits_BV"])
    s["length_B"] = s["length_B"] + active_B
    s["steps"] = s["steps"] + 1
    return s


@partial(jax.jit, static_argnames=("model", "num_tokens", "mesh"), donate_argnames=("carry",))
def decode_loop(model: Transformer, params: Any, carry: dict, arrays: SamplerArrays, keys_B: jax.Array,
                stop_BM: jax.Array, max_new_B: jax.Array, max_steps: jax.Array, num_tokens: int = 0,
                mesh: Mesh | None = None, model_state: dict | None = None) -> dict:
    """Decode until every row is finished, a running row has filled the cache, or `max_steps`
    steps (a traced bound: the host's chunk, no recompile) have run."""
    TRACES["decode"] += 1
    slots = jax.tree_util.tree_leaves(carry["caches"])[0].shape[-2]  # k_BKSE

    def cond(s: dict) -> jax.Array:
        running_B = ~s["done_B"]
        return jnp.any(running_B) & jnp.all(~running_B | (s["length_B"] < slots)) & (s["steps"] < max_steps)

    body = partial(_decode_body, model, mesh, params, model_state, arrays, keys_B, stop_BM, max_new_B,
                   num_tokens, slots)
    carry = dict(carry, steps=jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(cond, body, carry)


@partial(jax.jit, static_argnames=("stacked",))
def _select_rows(rows_B: jax.Array, new: Any, old: Any, stacked: bool) -> Any:
    axis = 1 if stacked else 0

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        shape = [1] * a.ndim
        shape[axis] = a.shape[axis]
        return jnp.where(rows_B.reshape(shape), a, b)
    return jax.tree_util.tree_map(pick, new, old)


class Generator:
    """Generates for batches of `Request`s from one model's parameters through a KV cache.

    `kv_dtype` is the cache's storage (`kv_cache.KV_DTYPES`); `num_tokens` > 0 keeps sampling
    below that id (a tokenizer smaller than the model's padded vocabulary). Parameters may be
    int8 (`quantize.quantize_params`). `model_state` is the run's variables besides the
    parameters (`LoadedRun.model_state`: the MoE loss-free bias), required when the model has
    them. A `scan_layers` model decodes with its layers unrolled (`transformer.unstack_layers`;
    the bias tree is unstacked the same way), the same weights. With a `mesh` (data × tensor),
    parameters and caches are placed on it (`placement`), the model state replicated, and every
    step runs with the model's parallel hooks."""

    def __init__(self, model: Transformer, params: Any, *, kv_dtype: str = "float32", num_tokens: int = 0,
                 mesh: Mesh | None = None, model_state: dict | None = None):
        if kv_dtype not in kv_cache.KV_DTYPES:
            raise ConfigError(f"kv_dtype={kv_dtype!r}: choose one of {kv_cache.KV_DTYPES}.")
        model_state = model_state or {}
        if params is not None:
            check_model_state(model.cfg, model_state)
        if model.cfg.scan_layers:  # per-layer caches, updated in place (see `unstack_layers`)
            model_state = {k: unstack_tree(model.cfg, v) for k, v in model_state.items()}
            cfg, params = unstack_layers(model.cfg, params) if params is not None else (
                dataclasses.replace(model.cfg, scan_layers=False), None)
            model = Transformer(cfg)
        if mesh is not None:
            placement.check_mesh(model.cfg, mesh)
            if params is not None:
                params = placement.place_params(params, model.cfg, mesh)
            model_state = jax.device_put(model_state, NamedSharding(mesh, PartitionSpec()))
        self.model, self.params, self.kv_dtype, self.mesh = model, params, kv_dtype, mesh
        self.model_state = model_state
        self.cfg = model.cfg.resolved()
        self.num_tokens = num_tokens
        self.vocab = num_tokens or self.cfg.vocab_size

    @property
    def compiles(self) -> dict[str, int]:
        """Shapes traced so far by the prefill and the decode loop (all generators together)."""
        return dict(TRACES)

    def empty_caches(self, batch: int, slots: int) -> Any:
        """Zeroed caches for `batch` rows of `slots` positions, on the mesh if there is one."""
        caches = empty_caches(self.model, batch, slots, self.kv_dtype)
        return caches if self.mesh is None else placement.place_caches(caches, self.mesh, self.cfg.scan_layers)

    def check(self, requests: Sequence[Request]) -> None:
        """`ConfigError` naming the request and the fix, for anything that cannot generate."""
        if not requests:
            raise ConfigError("No requests: give at least one prompt.")
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            if n == 0:
                raise ConfigError(f"Request {i}: the prompt is empty; give at least one token.")
            if n > self.cfg.seq_len:
                raise ConfigError(f"Request {i}: the prompt has {n} tokens, more than the model's context "
                                  f"model.seq_len={self.cfg.seq_len}; shorten it to its last {self.cfg.seq_len}.")
            if r.max_new_tokens < 0:
                raise ConfigError(f"Request {i}: max_new_tokens={r.max_new_tokens} must be ≥ 0.")
            ids = np.asarray(r.prompt_ids)
            if ids.min() < 0 or ids.max() >= self.vocab:
                raise ConfigError(f"Request {i}: prompt id {int(ids.max() if ids.max() >= self.vocab else ids.min())} "
                                  f"is outside the vocabulary [0, {self.vocab}).")
            try:
                r.sampling.check(self.vocab)
            except ConfigError as e:
                raise ConfigError(f"Request {i}: {e}") from None

    def generate(self, requests: Sequence[Request], *, chunk: int = 0,
                 on_chunk: Any = None) -> list[Completion]:
        """Completions for `requests`, in order. With `chunk` > 0 the decode loop returns to the
        host every `chunk` steps and calls `on_chunk(tokens_per_row: list[list[int]])`, which may
        return row indices to finish early (stop strings, progress bars)."""
        self.check(requests)
        B, T = len(requests), self.cfg.seq_len
        max_new = max(r.max_new_tokens for r in requests)
        slots = bucket(max(len(r.prompt_ids) + r.max_new_tokens for r in requests), T)
        history = [list(map(int, r.prompt_ids)) for r in requests]
        carry = self._start(history, slots, bucket(max_new, 1 << 30))  # O: bucketed, few shapes
        carry["done_B"] = jnp.asarray([r.max_new_tokens == 0 for r in requests])
        carry["seen_BV"] = self._seen(history)
        arrays = stack_params([r.sampling for r in requests])
        keys_B = jax.random.wrap_key_data(jnp.stack([jax.random.key_data(jax.random.key(r.sampling.seed))
                                                     for r in requests]))
        width = bucket(max([len(r.stop_ids) for r in requests] + [1]), 1 << 30)  # few shapes
        stop_BM = np.asarray([list(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r in requests], np.int32)
        max_new_B = np.asarray([r.max_new_tokens for r in requests], np.int32)
        steps = np.asarray(chunk or np.iinfo(np.int32).max, np.int32)
        # Commit every input where the loop's outputs will live: a loop called again (chunks,
        # slides) with the same avals but other shardings would compile again.
        carry, arrays, keys_B, stop_BM, max_new_B, steps = self._commit(
            (carry, arrays, keys_B, stop_BM, max_new_B, steps))
        while True:
            carry = decode_loop(self.model, self.params, carry, arrays, keys_B, stop_BM, max_new_B, steps,
                                num_tokens=self.num_tokens, mesh=self.mesh, model_state=self.model_state)
            done = np.asarray(carry["done_B"])
            if on_chunk is not None:
                n = np.asarray(carry["n_B"])
                out = np.asarray(carry["tokens_BO"])
                finish = on_chunk([out[b, :n[b]].tolist() for b in range(B)]) or ()
                if len(finish):
                    done = done.copy()
                    done[list(finish)] = True
                    carry["done_B"] = self._commit(done)
            if done.all():
                break
            full = (~done) & (np.asarray(carry["length_B"]) >= slots)
            if full.any():
                carry = self._slide(carry, requests, full)
        return self._completions(carry, requests)

    def _commit(self, tree: Any) -> Any:
        """`tree` committed to the one device, or replicated on the mesh (caches keep theirs)."""
        if self.mesh is None:
            return jax.device_put(tree, jax.devices()[0])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        is_cache = lambda x: isinstance(x, kv_cache.LayerCache)  # noqa: E731
        return jax.tree_util.tree_map(lambda x: x if is_cache(x) else jax.device_put(x, replicated), tree,
                                      is_leaf=is_cache)

    def _start(self, history: list[list[int]], slots: int, max_new: int) -> dict:
        B = len(history)
        logits_BV, caches, lengths_B = self._prefill(history, slots)
        return {"caches": caches, "logits_BV": logits_BV, "length_B": lengths_B,
                "tokens_BO": jnp.zeros((B, max_new), jnp.int32),
                "logprobs_BO": jnp.zeros((B, max_new), jnp.float32),
                "n_B": jnp.zeros((B,), jnp.int32), "stopped_B": jnp.zeros((B,), bool),
                "steps": jnp.zeros((), jnp.int32)}

    def _prefill(self, prompts: list[list[int]], slots: int) -> tuple[jax.Array, Any, jax.Array]:
        width = bucket(max(len(p) for p in prompts), slots)
        tokens_BT = np.zeros((len(prompts), width), np.int32)
        for b, p in enumerate(prompts):
            tokens_BT[b, :len(p)] = p
        lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
        logits_BV, caches = prefill(self.model, self.params, jnp.asarray(tokens_BT), lengths_B,
                                    self.empty_caches(len(prompts), slots), self.mesh, self.model_state)
        return logits_BV, caches, lengths_B

    def _seen(self, history: list[list[int]]) -> jax.Array:
        seen_BV = np.zeros((len(history), self.cfg.vocab_size), bool)
        for b, ids in enumerate(history):
            seen_BV[b, ids] = True
        return jnp.asarray(seen_BV)

    def _slide(self, carry: dict, requests: Sequence[Request], full_B: np.ndarray) -> dict:
        """Re-prefill the last seq_len // 2 tokens of each row in `full_B` into its cache (the
        rows' pending logits, from their full context, are kept)."""
        keep = self.cfg.seq_len // 2
        n = np.asarray(carry["n_B"])
        out = np.asarray(carry["tokens_BO"])
        windows = []
        for b, r in enumerate(requests):
            seq = list(map(int, r.prompt_ids)) + out[b, :n[b]].tolist()
            windows.append(seq[-keep:] if full_B[b] else seq[:1])
        slots = jax.tree_util.tree_leaves(carry["caches"])[0].shape[-2]  # k_BKSE
        _, caches, lengths_B = self._prefill(windows, slots)
        rows_B = jnp.asarray(full_B)
        carry["caches"] = _select_rows(rows_B, caches, carry["caches"], self.cfg.scan_layers)
        # The row's next token is still predicted from its full context (the logits the loop
        # stopped with); the re-prefill's own logits are not needed.
        carry["length_B"] = self._commit(np.where(full_B, np.asarray(lengths_B), np.asarray(carry["length_B"])))
        return carry

    def _completions(self, carry: dict, requests: Sequence[Request]) -> list[Completion]:
        n = np.asarray(carry["n_B"])
        stopped = np.asarray(carry["stopped_B"])
        out, lp = np.asarray(carry["tokens_BO"]), np.asarray(carry["logprobs_BO"])
        result = []
        for b in range(len(requests)):
            k = int(n[b]) - int(stopped[b])  # the stop id itself is not part of the completion
            reason = "stop" if stopped[b] or k < requests[b].max_new_tokens else "length"
            result.append(Completion(out[b, :k].tolist(), lp[b, :k].tolist(), reason))
        return result
