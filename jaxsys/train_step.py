"""The train state, the loss, and the pure `train_step(state, batch) -> (state, metrics)`.

Shapes: B global batch, M microbatches, T sequence, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxsys import sharding as shd
from jaxsys import data_parallel, tensor_parallel
from jaxsys import config as config_lib
from jaxsys.config import Config, ConfigError
from jaxsys.model import Transformer
from jaxsys.optim import make_optimizer, make_schedule

Batch = dict[str, jax.Array]  # {"inputs": int32[B, T], "targets": int32[B, T]}
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as is)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats per token (float32)."""
    losses_BT = tensor_parallel.cross_entropy(logits_BTV, targets_BT)  # vocab-parallel under TP
    return losses_BT.mean()


@dataclass(frozen=True)
class Setup:
    """The model, optimizer and shardings for one config on one mesh."""

    cfg: Config
    mesh: Mesh
    model: Transformer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_params: Any  # tree of ShapeDtypeStruct
    logical_specs: Any  # tree of PartitionSpec with logical names
    state_sharding: TrainState  # tree of NamedSharding
    batch_sharding: NamedSharding
    # ZeRO-2/3: gradients split over fsdp (reduce-scattered); else laid out like the parameters.
    # (With the explicit sync, jaxsys.data_parallel, ZeRO-1's gradients leave the step split too.)
    grad_sharding: Any = None
    activation_rules: shd.Rules = shd.ACTIVATION_RULES  # pass to shd.activation_sharding


def setup(cfg: Config, mesh: Mesh) -> Setup:
    """Build model and optimizer, derive every sharding from `eval_shape`, and validate the
    layout. Nothing is compiled or allocated; layout errors surface here as `ConfigError`."""
    config_lib.validate(cfg)
    wanted = shd.resolve_mesh_shape(cfg.mesh, mesh.devices.size)
    if wanted != dict(mesh.shape):
        raise ConfigError(f"The mesh {dict(mesh.shape)} does not match cfg.mesh {wanted}; build it "
                          "with jaxsys.sharding.make_mesh(cfg.mesh, devices).")
    model = Transformer(cfg.model)
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    dummy = jax.ShapeDtypeStruct((1, cfg.model.seq_len), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    logical_specs = nn.get_partition_spec(boxed)
    abstract_params = nn.meta.unbox(boxed)
    shd.check_layout(cfg, mesh, abstract_params, logical_specs)

    param_sh = shd.param_shardings(logical_specs, mesh, shd.param_rules(cfg.mesh))
    moment_sh = shd.param_shardings(logical_specs, mesh, shd.optimizer_rules(cfg.mesh))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Optimizer moments are laid out like their parameter, split over fsdp from ZeRO-1 on;
    # counters and other non-parameter leaves are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, moment_sh,
                                   transform_non_params=lambda _: shd.replicated(mesh))
    state_sh = TrainState(step=shd.replicated(mesh), params=param_sh, opt_state=opt_sh)
    return Setup(cfg, mesh, model, tx, schedule, abstract_params, logical_specs, state_sh,
                 shd.batch_sharding(mesh),
                 grad_sharding=shd.param_shardings(logical_specs, mesh, shd.grad_rules(cfg.mesh)),
                 activation_rules=shd.activation_rules(cfg.mesh))


def init_state(s: Setup, seed: int) -> TrainState:
    """Initialise parameters and optimizer state directly in their shardings."""
    def init(key: jax.Array) -> TrainState:
        dummy = jnp.zeros((1, s.cfg.model.seq_len), jnp.int32)
        params = nn.meta.unbox(s.model.init(key, dummy)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=s.tx.init(params))
    with shd.activation_sharding(s.mesh, s.activation_rules):
        return jax.jit(init, out_shardings=s.state_sharding)(jax.random.key(seed))


def loss_fn(model: Transformer, params: Any, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
    if dropout_key is None:
        logits_BTV = model.apply({"params": params}, batch["inputs"])
    else:
        logits_BTV = model.clone(deterministic=False).apply(
            {"params": params}, batch["inputs"], rngs={"dropout": dropout_key})
    return cross_entropy(logits_BTV, batch["targets"])


def accumulate(grad_fn: Callable[[Any, Batch, Any], tuple[jax.Array, Any]], params: Any, batch: Batch,
               key: jax.Array | None, per_micro: Callable[[Any], Any] = lambda g: g, *,
               num_micro: int) -> tuple[jax.Array, Any]:
    """Mean loss and gradients of `grad_fn` over `num_micro` microbatches of `batch` ([B, T]
    arrays, microbatch i = rows i, i + M, ...), summed in float32 inside one `lax.scan` (one
    optimizer update per call, one compile; optax.MultiSteps would need M host calls).
    `per_micro` is applied to each microbatch's gradients (a ZeRO-2 reduce-scatter, or a
    sharding constraint) before they are added up."""
    if num_micro == 1:
        loss, grads = grad_fn(params, batch, key)
        return loss, per_micro(grads)

    def split(x_BT: jax.Array) -> jax.Array:  # [B, T] -> [M, B/M, T], rows strided
        x_MbT = x_BT.reshape(x_BT.shape[0] // num_micro, num_micro, *x_BT.shape[1:])
        return shd.constrain(x_MbT.swapaxes(0, 1), (None, "batch", "seq"))

    def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        k = None if key is None else jax.random.fold_in(key, i)
        loss, grads = grad_fn(params, mb, k)
        grad_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_sum, per_micro(grads))
        return (loss_sum + loss, grad_sum), None

    # Sum in float32 whatever the parameter dtype, so M microbatches equal one batch.
    shapes = jax.eval_shape(per_micro, params)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                           (jnp.arange(num_micro), jax.tree_util.tree_map(split, batch)))
    grads = jax.tree_util.tree_map(lambda a, x: (a / num_micro).astype(x.dtype), grad_sum, shapes)
    return loss_sum / num_micro, grads


def make_train_step(s: Setup) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure train step for `s` (not jitted; see `compile_train_step`)."""
    cfg = s.cfg
    num_micro = cfg.train.microbatches
    use_dropout = cfg.model.dropout > 0.0
    base_key = jax.random.key(cfg.train.seed + 1)
    grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(s.model, p, b, k))
    if s.mesh.shape["pipe"] > 1:  # the pipeline computes loss and gradients itself (no dropout)
        from jaxsys import pipeline
        pipeline.check_config(cfg, s.mesh)
        prog = pipeline.compile_schedule(pipeline.make_schedule(cfg, s.mesh.shape["pipe"]))
        grad_fn = lambda p, b, k: pipeline.loss_and_grads(cfg, s.mesh, prog, p, b)[:2]  # noqa: E731

    nan_steps = jnp.asarray(cfg.train.nan_steps or (-1,), jnp.int32)
    accumulate_ = functools.partial(accumulate, num_micro=num_micro)
    if data_parallel.uses_explicit_sync(cfg, s.mesh):  # shard_map over data × fsdp, ZeRO by hand
        loss_and_grads = data_parallel.make_loss_and_grads(cfg, s.mesh, s.logical_specs, accumulate_, grad_fn)
    else:  # XLA's partitioner inserts the gradient collectives
        def loss_and_grads(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
            constrain = lambda g: jax.lax.with_sharding_constraint(g, s.grad_sharding)  # noqa: E731
            loss, grads = accumulate_(grad_fn, params, batch, key, constrain)  # ZeRO-2: accumulate shards
            return loss, constrain(grads)  # ZeRO-2: reduce-scatter

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(base_key, state.step) if use_dropout else None
        loss, grads = loss_and_grads(state.params, batch, key)
        if cfg.train.nan_steps:  # testing aid: poison the loss and gradients of chosen steps
            poison = jnp.where(jnp.isin(state.step + 1, nan_steps), jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree_util.tree_map(lambda g: g * poison.astype(g.dtype), grads)
        updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)  # zero updates when skipped
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": s.schedule(state.step),
                   "skipped": 1.0 - opt_state.last_finite.astype(jnp.float32),
                   "skipped_total": opt_state.total_notfinite.astype(jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def compile_train_step(s: Setup) -> Any:
    """Ahead-of-time compile of the train step with explicit shardings and donated state.

    Returns a `jax.stages.Compiled`: calling it never recompiles, and its `memory_analysis()`
    and `cost_analysis()` describe the program per device."""
    state = shd.with_shardings(abstract_state(s), s.state_sharding)
    tokens = jax.ShapeDtypeStruct((s.cfg.train.batch_size, s.cfg.model.seq_len), jnp.int32,
                                  sharding=s.batch_sharding)
    step = jax.jit(make_train_step(s), in_shardings=(s.state_sharding, s.batch_sharding),
                   out_shardings=(s.state_sharding, shd.replicated(s.mesh)), donate_argnums=0)
    with shd.activation_sharding(s.mesh, s.activation_rules):
        return step.lower(state, {"inputs": tokens, "targets": tokens}).compile()


def compile_eval_step(s: Setup, batch_size: int) -> Any:
    """Compiled `eval_step(params, batch) -> loss` (no dropout)."""
    param_abstract = shd.with_shardings(s.abstract_params, s.state_sharding.params)
    tokens = jax.ShapeDtypeStruct((batch_size, s.cfg.model.seq_len), jnp.int32, sharding=s.batch_sharding)
    fn = jax.jit(lambda p, b: loss_fn(s.model, p, b, None),
                 in_shardings=(s.state_sharding.params, s.batch_sharding),
                 out_shardings=shd.replicated(s.mesh))
    with shd.activation_sharding(s.mesh, s.activation_rules):
        return fn.lower(param_abstract, {"inputs": tokens, "targets": tokens}).compile()


def abstract_state(s: Setup) -> TrainState:
    """The `TrainState` as a tree of `jax.ShapeDtypeStruct` (no shardings)."""
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=s.abstract_params,
                      opt_state=jax.eval_shape(s.tx.init, s.abstract_params))
