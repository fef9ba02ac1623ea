"""The train state and everything derived from a config on a mesh before anything runs.

`setup(cfg, mesh)` builds the model and the optimizer, derives every sharding from
`jax.eval_shape` of the initialiser and the rules tables, and checks the layout
(`jaxsys.parallel.layout`): layout errors surface here, as `ConfigError`, before any compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxsys import config as config_lib
from jaxsys.config import Config
from jaxsys.config.checks import check_memory_platform
from jaxsys.model.transformer import Transformer, abstract_model_state, abstract_params, init_variables
from jaxsys.parallel import rules
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.layout import check_layout
from jaxsys.parallel.mesh import replicated
from jaxsys.train import loss_scale
from jaxsys.train.optimizer import make_lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as is)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    # The model's variables that are not parameters, updated by the step outside the optimizer:
    # {"moe_bias": tree} (the MoE loss-free balancing bias, jaxsys.model.moe), else {}.
    model_state: Any = flax.struct.field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """The model, optimizer and shardings for one config on one mesh."""

    cfg: Config
    mesh: Mesh
    model: Transformer
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_params: Any  # tree of ShapeDtypeStruct
    logical_specs: Any  # tree of PartitionSpec with logical names
    state_sharding: TrainState  # tree of NamedSharding
    batch_sharding: NamedSharding
    # ZeRO-2/3: gradients split over fsdp (reduce-scattered); else laid out like the parameters.
    # (With the explicit sync, jaxsys.parallel.zero, ZeRO-1's gradients leave the step split too.)
    grad_sharding: Any = None
    activation_rules: rules.Rules = rules.ACTIVATION_RULES  # pass to parallelize
    # train.offload=optimizer: the optimizer state's shardings in device memory, where the step
    # computes the update (`state_sharding.opt_state` keeps the moments in pinned_host); else None.
    opt_compute_sharding: Any = None


def setup(cfg: Config, mesh: Mesh) -> Setup:
    """Build model and optimizer, derive every sharding from `eval_shape`, and validate the
    layout. Nothing is compiled or allocated; layout errors surface here as `ConfigError`."""
    config_lib.validate(cfg)
    check_memory_platform(cfg, mesh.devices.flat[0].platform)
    model = Transformer(cfg.model)
    lr_schedule = make_lr_schedule(cfg.lr_schedule, cfg.optimizer.lr, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, lr_schedule)
    if loss_scale.enabled(cfg):  # the scale rides in the optimizer state (loss_scale.LossScaleState)
        tx = loss_scale.wrap(tx, cfg.train.loss_scale_init)
    params, logical_specs = abstract_params(cfg.model)
    check_layout(cfg, mesh, params, logical_specs)

    param_sh = rules.param_shardings(logical_specs, mesh, rules.param_rules(cfg.mesh))
    moment_sh = rules.param_shardings(logical_specs, mesh, rules.optimizer_rules(cfg.mesh))
    abstract_opt = jax.eval_shape(tx.init, params)
    # Optimizer moments are laid out like their parameter, split over fsdp from ZeRO-1 on;
    # counters and other non-parameter leaves are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, moment_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    opt_compute_sh = None
    if cfg.train.offload == "optimizer":  # the moments live on the host between steps
        opt_compute_sh = opt_sh
        opt_sh = optax.tree_map_params(tx, lambda _, s: s.with_memory_kind("pinned_host"), abstract_opt,
                                       moment_sh, transform_non_params=lambda _: replicated(mesh))
    model_state_sh = jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_model_state(cfg.model))
    state_sh = TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh, model_state=model_state_sh)
    return Setup(cfg, mesh, model, tx, lr_schedule, params, logical_specs, state_sh,
                 rules.batch_sharding(mesh),
                 grad_sharding=rules.param_shardings(logical_specs, mesh, rules.grad_rules(cfg.mesh)),
                 activation_rules=rules.activation_rules(cfg.mesh), opt_compute_sharding=opt_compute_sh)


def init_state(s: Setup, seed: int) -> TrainState:
    """Initialise parameters and optimizer state directly in their shardings."""
    def init(key: jax.Array) -> TrainState:
        params, model_state = init_variables(s.cfg.model, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=s.tx.init(params),
                          model_state=model_state)
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        return jax.jit(init, out_shardings=s.state_sharding)(jax.random.key(seed))


def state_from_params(s: Setup, params: Any) -> TrainState:
    """A train state at step 0 holding `params` (already in their shardings) and a fresh
    optimizer state: the start of a fine-tune from a params-only checkpoint."""
    def init(p: Any) -> TrainState:
        model_state = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                             abstract_model_state(s.cfg.model))  # a fresh bias
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=s.tx.init(p),
                          model_state=model_state)
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        return jax.jit(init, out_shardings=s.state_sharding, donate_argnums=0)(params)


def abstract_state(s: Setup) -> TrainState:
    """The `TrainState` as a tree of `jax.ShapeDtypeStruct` (no shardings)."""
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=s.abstract_params,
                      opt_state=jax.eval_shape(s.tx.init, s.abstract_params),
                      model_state=abstract_model_state(s.cfg.model))
