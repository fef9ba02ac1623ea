"""The pure train step `step(state, batch) -> (state, metrics)`, its gradient accumulation, and
its ahead-of-time compile with explicit shardings and donated state.

How the gradients of a step are computed and synced is chosen by the mesh (`_loss_and_grads`):
a pipeline (`mesh.pipe` > 1: `jaxsys.parallel.pipeline`), the explicit data-parallel / ZeRO
sync (`jaxsys.parallel.zero`), or XLA's partitioner with sharding constraints
(`mesh.grad_sync=xla`, or one device).

Shapes (`jaxsys.model.axes`): B global batch, A accumulation microbatches, T sequence.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxsys.config import Config
from jaxsys.data.batches import split_microbatches
from jaxsys.model import hooks, moe
from jaxsys.model.axes import TOKENS_BT
from jaxsys.model.loss import Batch, loss, normalize_loss_mask, objective
from jaxsys.parallel import context, zero
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.mesh import replicated
from jaxsys.parallel.pipeline.executor import pipeline_grads
from jaxsys.parallel.pipeline.program import compile_schedule, make_schedule
from jaxsys.parallel.rules import with_shardings
from jaxsys.train import loss_scale, optimizer
from jaxsys.train.state import Setup, TrainState, abstract_state

Metrics = dict[str, jax.Array]
GradFn = Callable[[Any, Batch, Any], tuple[jax.Array, Any]]


def accumulate(grad_fn: GradFn, params: Any, batch: Batch, key: jax.Array | None,
               per_micro: Callable[[Any], Any] = lambda g: g, *, num_micro: int) -> tuple[jax.Array, Any]:
    """Mean loss and gradients of `grad_fn` over `num_micro` (A) microbatches of `batch` ([B, T]
    arrays, microbatch i = rows i, i + A, ...), summed in float32 inside one `lax.scan` (one
    optimizer update per call, one compile; optax.MultiSteps would need A host calls).
    `per_micro` is applied to each microbatch's gradients (a ZeRO-2 reduce-scatter, or a
    sharding constraint) before they are added up.

    `grad_fn` may return `((loss, stats), grads)` instead of `(loss, grads)`: `stats` a tree of
    per-microbatch means (the MoE statistics), returned as their mean over the microbatches,
    which is the whole batch's mean since the microbatches are of equal size."""
    if num_micro == 1:
        loss_, grads = grad_fn(params, batch, key)
        return loss_, per_micro(grads)

    def split(x_BT: jax.Array) -> jax.Array:  # [B, T] -> [A, B/A, T], rows strided
        return hooks.constrain(split_microbatches(x_BT, num_micro), (None, *TOKENS_BT))

    def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        k = None if key is None else jax.random.fold_in(key, i)
        loss_, grads = grad_fn(params, mb, k)
        loss_, stats = loss_ if isinstance(loss_, tuple) else (loss_, None)
        grad_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_sum, per_micro(grads))
        return (loss_sum + loss_, grad_sum), stats

    # Sum in float32 whatever the parameter dtype, so A microbatches equal one batch.
    shapes = jax.eval_shape(per_micro, params)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
    (loss_sum, grad_sum), stats_A = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                 (jnp.arange(num_micro), jax.tree_util.tree_map(split, batch)))
    grads = jax.tree_util.tree_map(lambda a, x: (a / num_micro).astype(x.dtype), grad_sum, shapes)
    if stats_A is None:
        return loss_sum / num_micro, grads
    return (loss_sum / num_micro, jax.tree_util.tree_map(lambda v: v.mean(0), stats_A)), grads


def _loss_and_grads(s: Setup, model_state: dict[str, Any], scale: jax.Array | None = None) -> GradFn:
    """`(params, batch, key) -> (mean loss, grads)` of one step, by the strategy the mesh asks for;
    for an MoE model `((mean cross-entropy, MoE stats), grads)`, the gradients those of
    `loss.objective` (cross-entropy + balancing terms) with `model_state` held fixed. With a loss
    `scale` (`jaxsys.train.loss_scale`) the gradients are those of scale · loss (the loss
    itself unscaled): the caller unscales them after the sync."""
    cfg = s.cfg
    grad_fn: GradFn = loss_scale.value_and_scaled_grad(lambda p, b, k: loss(s.model, p, b, k), scale)
    if cfg.model.moe.num_experts:
        grad_fn = lambda p, b, k: _moe_grads(s, model_state, p, b, k, scale)  # noqa: E731
    if s.mesh.shape["pipe"] > 1:  # the pipeline computes loss and gradients itself (no dropout;
        # for MoE the objective's, with the statistics beside the cross-entropy; no loss scale: checks.py)
        prog = compile_schedule(make_schedule(cfg, s.mesh.shape["pipe"]))
        grad_fn = lambda p, b, k: pipeline_grads(cfg, s.mesh, prog, p, b, model_state)[:2]  # noqa: E731
    accumulate_ = functools.partial(accumulate, num_micro=cfg.train.grad_accum)
    if zero.uses_explicit_sync(cfg, s.mesh):  # shard_map over data × fsdp, ZeRO by hand
        return zero.make_synced_grads(cfg, s.mesh, s.logical_specs, accumulate_, grad_fn)

    def xla_synced(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
        # XLA's partitioner inserts the gradient collectives.
        constrain = lambda g: jax.lax.with_sharding_constraint(g, s.grad_sharding)  # noqa: E731
        loss_, grads = accumulate_(grad_fn, params, batch, key, constrain)  # ZeRO-2: accumulate shards
        return loss_, constrain(grads)  # ZeRO-2: reduce-scatter
    return xla_synced


def _moe_grads(s: Setup, model_state: dict[str, Any], params: Any, batch: Batch,
               key: Any, scale: jax.Array | None = None) -> tuple[tuple[jax.Array, Any], Any]:
    """((cross-entropy, MoE stats), gradients of cross-entropy + the balancing terms (× `scale`))."""
    (_, (ce, stats)), grads = loss_scale.value_and_scaled_grad(
        lambda p: objective(s.model, p, model_state, batch, key), scale, has_aux=True)(params)
    return (ce, stats), grads


def _poison(cfg: Config, step: jax.Array, loss_: jax.Array, grads: Any) -> tuple[jax.Array, Any]:
    """Fault injection (`faults.nan_steps`): NaN loss and gradients at the chosen steps."""
    nan_steps = jnp.asarray(cfg.faults.nan_steps, jnp.int32)
    poison = jnp.where(jnp.isin(step + 1, nan_steps), jnp.nan, 1.0)
    return loss_ * poison, jax.tree_util.tree_map(lambda g: g * poison.astype(g.dtype), grads)


def make_train_step(s: Setup) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure train step for `s` (not jitted; see `compile_train_step`)."""
    cfg = s.cfg
    use_dropout = cfg.model.dropout > 0.0
    base_key = jax.random.key(cfg.train.seed + 1)
    moe_on = bool(cfg.model.moe.num_experts)
    scaled = loss_scale.enabled(cfg)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(base_key, state.step) if use_dropout else None
        batch = normalize_loss_mask(batch)  # packed documents: weights over the whole batch
        batch = context.reorder_batch(cfg, s.mesh.shape["context"], batch)  # zigzag, if on
        scaling = state.opt_state if scaled else None  # loss_scale.LossScaleState
        scale = scaling.scale if scaled else None
        loss_, grads = _loss_and_grads(s, state.model_state, scale)(state.params, batch, key)
        if scaled:  # after the sync: every device divides the same summed gradients
            grads = loss_scale.unscale(grads, scale)
        loss_, stats = loss_ if moe_on else (loss_, None)
        if cfg.faults.nan_steps:
            loss_, grads = _poison(cfg, state.step, loss_, grads)
        opt_state = state.opt_state
        if s.opt_compute_sharding is not None:  # train.offload=optimizer: host -> device for the update
            opt_state = jax.device_put(opt_state, s.opt_compute_sharding)
        updates, opt_state = s.tx.update(grads, opt_state, state.params)  # leaves for the host again
        finite = loss_scale.unwrap(opt_state)  # optax.apply_if_finite's state
        params = optimizer.apply_updates(state.params, updates, finite)  # unchanged when skipped
        metrics = {"loss": loss_, "grad_norm": optax.global_norm(grads), "lr": s.lr_schedule(state.step),
                   "skipped": 1.0 - finite.last_finite.astype(jnp.float32),
                   "skipped_total": finite.total_notfinite.astype(jnp.float32)}
        if scaled:
            metrics["loss_scale"] = scale
            metrics["overflow"] = loss_scale.overflowed(scaling, loss_, finite.last_finite).astype(jnp.float32)
            opt_state = loss_scale.adjust(opt_state, loss_, finite.last_finite, cfg.train.loss_scale_period)
        model_state = state.model_state
        if moe_on:
            metrics.update(moe.step_metrics(stats))
            # The loss-free bias moves after the update, from the whole step's load; not on a skipped step.
            moved = moe.update_bias(model_state, stats, cfg.model.moe.bias_update_rate)
            model_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite.last_finite, new, old),
                                                 moved, model_state)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          model_state=model_state), metrics

    return train_step


def abstract_batch(s: Setup, batch_size: int,
                   keys: tuple[str, ...] = ("inputs", "targets")) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch a compiled step takes: int32 [batch_size, seq_len] arrays named `keys`
    (`jaxsys.data.batches.batch_keys`: + positions, segment_ids, loss_mask when packed),
    sharded like the tokens."""
    tokens = jax.ShapeDtypeStruct((batch_size, s.cfg.model.seq_len), jnp.int32, sharding=s.batch_sharding)
    return {k: tokens for k in keys}


def compile_train_step(s: Setup, batch_keys: tuple[str, ...] = ("inputs", "targets"),
                       compiler_options: dict[str, Any] | None = None) -> Any:
    """Ahead-of-time compile of the train step with explicit shardings and donated state, for
    batches of `batch_keys` (each int32 [B, T]; `jaxsys.data.batches.batch_keys`).
    `compiler_options`: XLA debug options for this compile only (the planner's memory
    breakdown asks for the buffer-assignment dump, `jaxsys.tools.memory_breakdown`).

    Returns a `jax.stages.Compiled`: calling it never recompiles, and its `memory_analysis()`
    and `cost_analysis()` describe the program per device."""
    state = with_shardings(abstract_state(s), s.state_sharding)
    fn = make_train_step(s)
    if compiler_options and "xla_dump_to" in compiler_options:
        # A dump is only written when XLA really compiles; JAX's persistent cache leaves dump
        # options out of its key and would hand back an earlier executable without one. A name of
        # its own (jit_train_step_<nonce>: the module name is in the key) makes this compile new.
        fn.__name__ = f"train_step_{uuid.uuid4().hex[:12]}"
    step = jax.jit(fn, in_shardings=(s.state_sharding, s.batch_sharding),
                   out_shardings=(s.state_sharding, replicated(s.mesh)), donate_argnums=0)
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        return step.lower(state, abstract_batch(s, s.cfg.train.batch_size, batch_keys)).compile(compiler_options)


def compile_eval_step(s: Setup, batch_size: int, batch_keys: tuple[str, ...] = ("inputs", "targets")) -> Any:
    """Compiled `eval_step(params, batch) -> loss` (cross-entropy, no dropout), for batches of
    `batch_keys`. A model with non-parameter state (the MoE loss-free bias) takes it third:
    `eval_step(params, batch, model_state)` (`jaxsys.train.loop.evaluate` passes it)."""
    param_abstract = with_shardings(s.abstract_params, s.state_sharding.params)
    reorder = functools.partial(context.reorder_batch, s.cfg, s.mesh.shape["context"])
    args = (param_abstract, abstract_batch(s, batch_size, batch_keys))
    shardings = (s.state_sharding.params, s.batch_sharding)
    fn = lambda p, b: loss(s.model, p, reorder(normalize_loss_mask(b)), None)  # noqa: E731
    if s.state_sharding.model_state:
        args += (with_shardings(abstract_state(s).model_state, s.state_sharding.model_state),)
        shardings += (s.state_sharding.model_state,)
        fn = lambda p, b, ms: loss(s.model, p, reorder(normalize_loss_mask(b)), None, ms)  # noqa: E731
    step = jax.jit(fn, in_shardings=shardings, out_shardings=replicated(s.mesh))
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        return step.lower(*args).compile()
