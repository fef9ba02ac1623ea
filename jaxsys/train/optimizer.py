"""Optax optimizer and learning-rate schedules built from config.

AdamW with global-norm clipping and a weight-decay mask: matrices (attention and MLP kernels,
the untied output head) are decayed; norm scales, biases and the position table never are;
the token embedding only if `optimizer.decay_embeddings`. With `optimizer.master_dtype=float32`
(bfloat16 parameters) AdamW runs on float32 master copies kept in the optimizer state
(`master_weights`) and the parameters are those copies rounded (`apply_updates`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsys.config import ConfigError, LRScheduleConfig, OptimizerConfig

# Leaf names (last path component) that are never weight-decayed.
_NO_DECAY = ("scale", "bias", "bq", "bk", "bv", "bo", "bi", "pos_embed")
_EMBEDDINGS = ("embed",)


def make_lr_schedule(cfg: LRScheduleConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (0-based)."""
    warmup = cfg.warmup_steps
    decay_steps = cfg.decay_steps or total_steps
    end_lr = peak_lr * cfg.min_lr_ratio
    if warmup >= decay_steps and cfg.kind in ("linear", "cosine", "wsd"):
        raise ConfigError(
            f"lr_schedule.warmup_steps={warmup} must be smaller than the decay length {decay_steps} "
            "(lr_schedule.decay_steps, or train.steps when 0)."
        )

    def with_warmup(after: optax.Schedule) -> optax.Schedule:
        if warmup == 0:
            return after
        ramp = optax.linear_schedule(0.0, peak_lr, warmup)
        return optax.join_schedules([ramp, after], [warmup])

    if cfg.kind == "constant":
        return with_warmup(optax.constant_schedule(peak_lr))
    if cfg.kind == "linear":
        return with_warmup(optax.linear_schedule(peak_lr, end_lr, decay_steps - warmup))
    if cfg.kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, decay_steps, end_lr)
    if cfg.kind == "wsd":
        decay_len = max(1, int(round(cfg.decay_fraction * decay_steps)))
        stable_len = decay_steps - warmup - decay_len
        if stable_len < 0:
            raise ConfigError(
                f"lr_schedule.kind=wsd: warmup ({warmup}) + decay ({decay_len} = decay_fraction × "
                f"{decay_steps}) exceed the run; lower lr_schedule.warmup_steps or lr_schedule.decay_fraction."
            )
        stable_then_decay = optax.join_schedules(
            [optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, end_lr, decay_len)],
            [stable_len])
        return with_warmup(stable_then_decay)
    if cfg.kind == "exponential":
        return with_warmup(optax.exponential_decay(peak_lr, cfg.transition_steps, cfg.decay_rate,
                                                   staircase=False))
    if cfg.kind == "step":
        return with_warmup(optax.piecewise_constant_schedule(
            peak_lr, {b - warmup: cfg.step_factor for b in cfg.step_boundaries}))
    raise ConfigError(f"lr_schedule.kind={cfg.kind!r} is unknown.")  # pragma: no cover


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Tree of bools, True where weight decay applies."""
    def leaf_mask(path: tuple, _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in _NO_DECAY:
            return False
        if name in _EMBEDDINGS:
            return decay_embeddings
        return True
    return jax.tree_util.tree_map_with_path(leaf_mask, params)


class MasterState(NamedTuple):
    """`master_weights`' state: the float32 copies of the parameters and the inner state."""

    master: Any
    inner: Any


def master_weights(inner: optax.GradientTransformation, dtype: Any = jnp.float32) -> optax.GradientTransformation:
    """`inner` applied to copies of the parameters in `dtype` (the master weights), kept in the
    state: gradients are cast up, `inner` updates the master copies, and the updates returned
    move the parameters to about the master copies (in the parameters' dtype;
    `apply_updates` rounds the copies themselves). The copies are a parameter-shaped tree, so `optax.tree_map_params` (and with it
    `jaxsys.train.state.setup`) lays them out like the moments: split over fsdp from ZeRO-1.

    Optax has no such wrapper (its `mu_dtype` keeps only the first moment in another dtype)."""
    def init(params: Any) -> MasterState:
        master = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
        return MasterState(master, inner.init(master))

    def update(updates: Any, state: MasterState, params: Any = None) -> tuple[Any, MasterState]:
        grads = jax.tree_util.tree_map(lambda g: g.astype(dtype), updates)
        step, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, step)
        # In the parameters' dtype (apply_if_finite's zero updates are): `apply_updates` below
        # rounds the master copies instead of adding these.
        moves = jax.tree_util.tree_map(lambda m, p: (m - p.astype(dtype)).astype(p.dtype), master, params)
        return moves, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any, opt_state: Any) -> Any:
    """The parameters after `make_optimizer`'s update (`opt_state`: its state, the
    `optax.apply_if_finite` one): `optax.apply_updates`, or with master weights the master
    copies rounded to the parameters' dtype (also after a skipped step, when the copies did not
    move: the parameters are their rounding already)."""
    inner = getattr(opt_state, "inner_state", None)
    if isinstance(inner, MasterState):
        return jax.tree_util.tree_map(lambda m, p: m.astype(p.dtype), inner.master, params)
    return optax.apply_updates(params, updates)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clip by global norm (if `grad_clip` > 0), then AdamW with the decay mask (on float32
    master weights if `master_dtype` says so), inside `optax.apply_if_finite`: a step with
    non-finite gradients changes neither the parameters nor the moments (its state counts such
    steps; the training loop decides when to give up)."""
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        adamw = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    if cfg.master_dtype != "none":
        adamw = master_weights(adamw, jnp.dtype(cfg.master_dtype))
    # The training loop stops after train.max_consecutive_skips; never let Optax apply a bad update.
    return optax.apply_if_finite(adamw, max_consecutive_errors=2**31 - 1)
