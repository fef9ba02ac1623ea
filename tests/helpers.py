"""Shared test utilities: build a layout, compute loss and gradients on it, read its HLO."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import Config, apply_overrides
from jaxsys.config.presets import tiny
from jaxsys.data.batches import global_batch, local_batch
from jaxsys.data.corpus import load_corpus
from jaxsys.model.loss import loss
from jaxsys.parallel import context
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.mesh import make_mesh, replicated
from jaxsys.parallel.rules import with_shardings
from jaxsys.train.state import Setup, TrainState, init_state, setup
from jaxsys.train.step import compile_train_step


def subprocess_env() -> dict[str, str]:
    """The environment for a fresh jaxsys process: this one's, with XLA_FLAGS kept but for the
    simulated device count, which is 1 (the child gets 1 device unless its `--devices` says
    otherwise, whatever the machine's core count: `jaxsys train`'s one-device-per-core default
    sees a count already chosen and leaves it). Keeping `tests/conftest.py`'s
    `--xla_backend_optimization_level=0` measured 19.1 -> 12.0 s for one `jaxsys train --preset
    tiny` process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([*(f for f in env.get("XLA_FLAGS", "").split()
                                   if "host_platform_device_count" not in f),
                                 "--xla_force_host_platform_device_count=1"])
    return env


def tiny_cfg(*overrides: str) -> Config:
    return apply_overrides(tiny(), ["train.batch_size=16", *overrides])


def layout(cfg: Config) -> Setup:
    """Setup on exactly as many devices as the mesh asks for (1 when every axis is 1)."""
    sizes = [getattr(cfg.mesh, a) for a in ("data", "fsdp", "expert", "context", "tensor", "pipe")]
    n = math.prod(sizes) if -1 not in sizes else len(jax.devices())
    return setup(cfg, make_mesh(cfg.mesh, jax.devices()[:n]))


def host_batch(cfg: Config, step: int = 0) -> dict[str, np.ndarray]:
    corpus = load_corpus(cfg.data)
    return local_batch(corpus.train, cfg.train.seed, step, "train", cfg.train.batch_size,
                       cfg.model.seq_len)


def _laid_out(s: Setup, batch):
    """The batch in the sequence layout of `s` (zigzag under context parallelism), as the train
    step lays it out."""
    return context.reorder_batch(s.cfg, s.mesh.shape["context"], batch)


def loss_and_grads(s: Setup, params_host, batch_host):
    """Loss and gradients computed with `s`'s shardings and activation rules (sequence or
    context parallel as `s.cfg` says); returns host numpy trees."""
    params = jax.device_put(params_host, s.state_sharding.params)
    batch = jax.device_put(batch_host, s.batch_sharding)
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss(s.model, p, _laid_out(s, b), None)),
                 in_shardings=(s.state_sharding.params, s.batch_sharding),
                 out_shardings=(replicated(s.mesh), s.state_sharding.params))
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        loss_, grads = fn(params, batch)
    return float(loss_), jax.device_get(grads)


def grad_hlo(s: Setup) -> str:
    """Optimized HLO of loss + gradients with `s`'s shardings: the train step minus the
    optimizer update (which adds no tensor-axis collectives), cheaper to compile."""
    tokens = jax.ShapeDtypeStruct((s.cfg.train.batch_size, s.cfg.model.seq_len), jnp.int32,
                                  sharding=s.batch_sharding)
    params = with_shardings(s.abstract_params, s.state_sharding.params)
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss(s.model, p, _laid_out(s, b), None)),
                 in_shardings=(s.state_sharding.params, s.batch_sharding),
                 out_shardings=(replicated(s.mesh), s.grad_sharding))
    with parallelize(s.mesh, s.activation_rules, s.cfg.context_parallel):
        return fn.lower(params, {"inputs": tokens, "targets": tokens}).compile().as_text()


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def train_steps(s: Setup, state: TrainState, steps: int):
    """(per-step losses, host params) after `steps` compiled train steps from `state` on the
    shipped data (batches 0, 1, ... of seed 0)."""
    step = compile_train_step(s)
    corpus = load_corpus(s.cfg.data)
    losses = []
    for k in range(steps):
        batch = global_batch(corpus.train, 0, k, "train", s.cfg.train.batch_size,
                             s.cfg.model.seq_len, s.batch_sharding)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@functools.lru_cache(maxsize=None)
def losses_and_params_after_steps(*overrides: str, steps: int = 3):
    """`train_steps` of `tiny_cfg(*overrides)` from seed 0; cached per worker (the one-device
    run serves many tests)."""
    s = layout(tiny_cfg(*overrides))
    return train_steps(s, init_state(s, seed=0), steps)


@functools.lru_cache(maxsize=None)
def one_device_reference(*overrides: str):
    """(host params, host batch, loss, grads) of `tiny_cfg("mesh.data=1", *overrides)` at seed 0;
    cached per worker."""
    s = layout(tiny_cfg("mesh.data=1", *overrides))
    params = jax.device_get(init_state(s, seed=0).params)
    batch = host_batch(s.cfg)
    return (params, batch, *loss_and_grads(s, params, batch))
