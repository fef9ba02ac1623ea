"""Dynamic loss scaling for float16 compute (`train.loss_scale`, Micikevicius et al. 2018).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and above 65504 overflow. The
loss is multiplied by a scale S before the backward pass (so small gradients stay representable
in the float16 parts of the backward), the gradients are divided by S after the data-parallel
sync, and S adapts:

- a step whose loss is finite but whose gradients are not is an *overflow*: it is skipped
  (`optax.apply_if_finite` leaves parameters and moments untouched), S is halved (never below
  `MIN_SCALE`) and the count of good steps restarts;
- after `train.loss_scale_period` finite steps in a row S doubles;
- a step whose *loss* is not finite (divergence, `faults.nan_steps`) says nothing about S: S and
  the count stay as they were, and the step is a skip like any other (it counts toward
  `train.max_consecutive_skips`; an overflow does not). At S = `MIN_SCALE` non-finite gradients
  are not the scale's fault either: they count as an ordinary skip.

The state is a `LossScaleState` (scale float32 [], good_steps int32 []) wrapped around the
optimizer's state (`wrap`), so it is checkpointed with the `TrainState`, and runs without loss
scaling keep the checkpoint layout they had before it existed (a new `TrainState` field would
make every older checkpoint unrestorable: Orbax refuses a target with a key the disk lacks).
The step reads the scale before the backward pass and writes the adjusted one after the update.

Why not a library: `flax.training.dynamic_scale.DynamicScale` owns the `value_and_grad` call,
so its scale would be adjusted per microbatch and per device inside `accumulate` and the
explicit-sync shard_map, not once per step after the sync; `jmp.DynamicLossScale` has the same
three operations as here (scale, unscale, adjust) but is an extra, unmaintained dependency
(0.0.4, 2023) for these few lines, and adjusts on any non-finite gradient (also a NaN loss);
Optax has no loss scaling.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsys.config import Config

MIN_SCALE = 1.0
MAX_SCALE = 2.0**64  # growth stops here (float32 would reach inf at 2**128)


class LossScaleState(NamedTuple):
    """The optimizer state with the loss scale beside it (`wrap`)."""

    scale: jax.Array  # float32 []: the factor of the next step's loss
    good_steps: jax.Array  # int32 []: finite steps in a row since the scale last changed
    inner: Any  # the wrapped optimizer's state


def enabled(cfg: Config) -> bool:
    """Is dynamic loss scaling on (`train.loss_scale`, "auto" = on for float16 compute)?"""
    t = cfg.train
    return t.loss_scale == "dynamic" or (t.loss_scale == "auto" and cfg.model.compute_dtype == "float16")


def wrap(tx: optax.GradientTransformation, init_scale: float) -> optax.GradientTransformation:
    """`tx` whose state carries the loss scale (`LossScaleState`, starting at `init_scale`);
    its update is `tx`'s (the step unscales the gradients before, and `adjust`s after)."""
    def init(params: Any) -> LossScaleState:
        return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), tx.init(params))

    def update(updates: Any, state: LossScaleState, params: Any = None) -> tuple[Any, LossScaleState]:
        updates, inner = tx.update(updates, state.inner, params)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init, update)


def unwrap(opt_state: Any) -> Any:
    """The wrapped optimizer's state (`opt_state` itself without loss scaling)."""
    return opt_state.inner if isinstance(opt_state, LossScaleState) else opt_state


def value_and_scaled_grad(fn: Callable[..., Any], scale: jax.Array | None,
                          has_aux: bool = False) -> Callable[..., Any]:
    """`jax.value_and_grad(fn, has_aux)` whose gradients are those of `scale · fn` (the value
    returned unscaled). `fn(params, *args)` returns a float32 scalar, or `(scalar, aux)` with
    `has_aux`. `scale` None: plain `value_and_grad`."""
    if scale is None:
        return jax.value_and_grad(fn, has_aux=has_aux)

    def scaled(params: Any, *args: Any) -> tuple[jax.Array, Any]:
        out = fn(params, *args)
        value = out[0] if has_aux else out
        return value * scale.astype(value.dtype), out

    def value_and_grad(params: Any, *args: Any) -> tuple[Any, Any]:
        (_, out), grads = jax.value_and_grad(scaled, has_aux=True)(params, *args)
        return out, grads
    return value_and_grad


def unscale(grads: Any, scale: jax.Array) -> Any:
    """The gradients of the loss from those of `scale · loss` (each in its own dtype)."""
    inv = 1.0 / scale
    return jax.tree_util.tree_map(lambda g: (g * inv.astype(g.dtype)).astype(g.dtype), grads)


def overflowed(state: LossScaleState, loss: jax.Array, grads_finite: jax.Array) -> jax.Array:
    """bool []: was this step's skip the loss scale's doing (finite loss, non-finite gradients,
    scale above `MIN_SCALE`)?"""
    return jnp.isfinite(loss) & ~grads_finite & (state.scale > MIN_SCALE)


def adjust(state: LossScaleState, loss: jax.Array, grads_finite: jax.Array, period: int) -> LossScaleState:
    """The state after a step: halved on an overflow, doubled after `period` finite steps in a
    row, unchanged after a step whose loss was not finite."""
    scale, good = state.scale, state.good_steps
    over = overflowed(state, loss, grads_finite)
    grow = grads_finite & (good + 1 >= period)
    new_scale = jnp.where(over, jnp.maximum(scale / 2, MIN_SCALE), jnp.where(grow, jnp.minimum(scale * 2, MAX_SCALE), scale))
    new_good = jnp.where(grads_finite, jnp.where(grow, 0, good + 1), jnp.where(over, 0, good))
    return state._replace(scale=new_scale.astype(jnp.float32), good_steps=new_good.astype(jnp.int32))
