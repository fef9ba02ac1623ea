"""The model's hooks: the few points where a parallel strategy may change how the model runs.

Model code names logical axes and calls these functions; it never learns which strategies
exist. Each hook has a plain version here (single-device `jnp`), and `jaxsys.parallel.install`
installs parallel versions from outside, for the duration of a trace:

    constrain(x, axes)            pin an activation's layout      parallel: a sharding constraint
    stored_shape(shape, axes)     the shape a parameter arrives in parallel.zero (ZeRO-3 explicit sync: 1/fsdp)
    use_weight(w, axes)           a parameter at its point of use parallel.zero (all-gather over fsdp) + constraint
    column_matmul(...)            einsum whose output is split    parallel.tensor (sequence parallel: all-gather T first)
    row_matmul(...)               einsum contracting a split axis parallel.tensor (all-reduce; SP: reduce-scatter)
    embed_lookup(table, tokens)   token rows of the embedding     parallel.tensor (vocabulary-parallel lookup)
    attention(q, k, v, ...)       softmax attention               parallel.install (the Pallas kernel under shard_map)
    cross_entropy(logits, tgts)   per-token nats                  parallel.tensor (vocabulary-parallel loss)
    tiled_cross_entropy(x, w, ..) per-token nats, V tile by tile  parallel.tensor (per shard, stats merged)
    experts(x, expert, slot, ...) an MoE layer's routed experts   parallel.expert (all-to-all over `expert`)
    amax(x)                       max |x|: an fp8 scale's input   parallel.zero (a max over the batch axes too)

`installed(hooks)` swaps the set in a `with` block (a `ContextVar`, so nested and thread-safe);
`current()` returns the set in force. The plain versions are also the references the parallel
ones are tested against. Hooks are read while JAX traces: the set in force is not part of
`jax.jit`'s cache key, so trace (lower, compile) a function inside the block it is meant for —
a function already traced outside keeps its plain trace. `jaxsys.train.step` builds and
lowers every step inside `parallelize`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxsys.model import attention as attention_lib
from jaxsys.model import experts as experts_lib
from jaxsys.model import vocab_tiles
from jaxsys.model.axes import ACT_BTD, IN_BTD

Axes = Sequence[str | None]


def embed_lookup_reference(table_VD: jax.Array, tokens_BT: jax.Array, out_axes: Axes = ACT_BTD) -> jax.Array:
    """Rows of the table for each token: [B, T, D]."""
    return jnp.take(table_VD, tokens_BT, axis=0)


def cross_entropy_reference(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token next-token cross-entropy in nats, float32: [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def _column_reference(spec: str, x_BTD: jax.Array, w: jax.Array, w_axes: Axes, out_axes: Axes, *,
                      in_axes: Axes = IN_BTD, preferred_element_type: Any = None) -> jax.Array:
    return jnp.einsum(spec, x_BTD, w, preferred_element_type=preferred_element_type)


def _row_reference(spec: str, h: jax.Array, w: jax.Array, h_axes: Axes, w_axes: Axes,
                   out_axes: Axes = ACT_BTD) -> jax.Array:
    return jnp.einsum(spec, h, w)


def _attention_reference(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *, impl: str,
                         causal: bool = True, segment_ids: jax.Array | None = None) -> jax.Array:
    return attention_lib.attention(q_BTHE, k_BSKE, v_BSKE, impl=impl, causal=causal, segment_ids=segment_ids)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """One implementation of every hook; the defaults are the plain single-device versions."""

    constrain: Callable[[jax.Array, Axes], jax.Array] = lambda x, axes: x
    stored_shape: Callable[[tuple[int, ...], Axes], tuple[int, ...]] = lambda shape, axes: shape
    use_weight: Callable[[jax.Array, Axes], jax.Array] = lambda w, axes: w
    column_matmul: Callable[..., jax.Array] = _column_reference
    row_matmul: Callable[..., jax.Array] = _row_reference
    embed_lookup: Callable[..., jax.Array] = embed_lookup_reference
    attention: Callable[..., jax.Array] = _attention_reference
    cross_entropy: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_reference
    tiled_cross_entropy: Callable[..., jax.Array] = vocab_tiles.tiled_cross_entropy_reference
    experts: Callable[..., jax.Array] = experts_lib.experts_reference
    amax: Callable[[jax.Array], jax.Array] = lambda x: jnp.max(jnp.abs(x))


_CURRENT: contextvars.ContextVar[Hooks] = contextvars.ContextVar("jaxsys_model_hooks", default=Hooks())


def current() -> Hooks:
    """The hooks in force (the plain ones outside any `installed` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def installed(hooks: Hooks) -> Iterator[Hooks]:
    """Trace with `hooks` inside the block; the previous set is restored on exit."""
    token = _CURRENT.set(hooks)
    try:
        yield hooks
    finally:
        _CURRENT.reset(token)


# The calls model code makes; each forwards to the hook in force.


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Pin activation `x` to the layout of its logical `axes` (plain: unchanged)."""
    return current().constrain(x, axes)


def stored_shape(shape: tuple[int, ...], axes: Axes) -> tuple[int, ...]:
    """The shape in which a parameter of global `shape` reaches the model (plain: `shape`)."""
    return current().stored_shape(shape, axes)


def use_weight(w: jax.Array, axes: Axes) -> jax.Array:
    """A stored parameter at its point of use, laid out for compute (plain: unchanged)."""
    return current().use_weight(w, axes)


def column_matmul(spec: str, x_BTD: jax.Array, w: jax.Array, w_axes: Axes, out_axes: Axes, *,
                  in_axes: Axes = IN_BTD, preferred_element_type: Any = None) -> jax.Array:
    """`einsum(spec, x, w)` whose output is split along an axis of `w` (heads, mlp, vocab);
    `x` is [B, T, D]."""
    return current().column_matmul(spec, x_BTD, w, w_axes, out_axes, in_axes=in_axes,
                                   preferred_element_type=preferred_element_type)


def row_matmul(spec: str, h: jax.Array, w: jax.Array, h_axes: Axes, w_axes: Axes,
               out_axes: Axes = ACT_BTD) -> jax.Array:
    """`einsum(spec, h, w)` contracting an axis that tensor parallelism splits, into the
    residual layout [B, T, D]."""
    return current().row_matmul(spec, h, w, h_axes, w_axes, out_axes)


def embed_lookup(table_VD: jax.Array, tokens_BT: jax.Array, out_axes: Axes = ACT_BTD) -> jax.Array:
    """The embedding rows of `tokens_BT`: [B, T, D], laid out by `out_axes`."""
    return current().embed_lookup(table_VD, tokens_BT, out_axes)


def attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *, impl: str,
              causal: bool = True, segment_ids: jax.Array | None = None) -> jax.Array:
    """Softmax attention by `model.attention` = `impl`: [B, T, H, E]. `segment_ids` int [B, T]:
    packed documents, attention never crosses from one to another (None: one sequence)."""
    if segment_ids is None:  # so a hook that knows nothing of packing still serves one sequence
        return current().attention(q_BTHE, k_BSKE, v_BSKE, impl=impl, causal=causal)
    return current().attention(q_BTHE, k_BSKE, v_BSKE, impl=impl, causal=causal, segment_ids=segment_ids)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token next-token cross-entropy in nats, float32: [B, T]."""
    return current().cross_entropy(logits_BTV, targets_BT)


def tiled_cross_entropy(xn_BTD: jax.Array, w: jax.Array, tied: bool, targets_BT: jax.Array,
                        tiles: int) -> jax.Array:
    """Per-token cross-entropy in nats, float32 [B, T], of the head's logits x·w without making
    them whole: `tiles` vocabulary tiles (of each device's V) at a time (`jaxsys.model.vocab_tiles`).
    `w`: the tied table [V, D] when `tied`, else the head [D, V], at its point of use."""
    return current().tiled_cross_entropy(xn_BTD, w, tied, targets_BT, tiles)


def experts(x_BTD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array, weight_BTI: jax.Array,
            w: dict[str, jax.Array], *, act: str, capacity: int, dispatch: str) -> jax.Array:
    """An MoE layer's routed experts: y_BTD = Σ_i weight · expert(x) over the kept assignments.

    `expert_BTI` int32 expert id of each of a token's I = top_k choices, `weight_BTI` its combine
    weight (compute dtype), `slot_BTI` its position in its expert's buffer *within its row*
    (== `capacity` when dropped). `w`: "w_in" [X, D, F], "w_out" [X, F, D] (+ "w_gate" [X, D, F]
    for act="swiglu") at their point of use. `capacity` U per sequence (T in dropless mode);
    `dispatch` "capacity" | "dropless" (`jaxsys.model.experts`)."""
    return current().experts(x_BTD, expert_BTI, slot_BTI, weight_BTI, w, act=act, capacity=capacity,
                             dispatch=dispatch)


def amax(x: jax.Array) -> jax.Array:
    """max |x| over the whole (global) array, a scalar in x's dtype: what an fp8 scale is
    computed from (`jaxsys.model.fp8`). Plain: `jnp.max(jnp.abs(x))`."""
    return current().amax(x)
