"""What remat and host offload move, for `jaxsys plan` (`planner.Plan.remat`, `.offload`).

Kept apart from `planner` (one concept: the memory that the remat policy and the offload
settings move, beside the planner's layout costs). On the CPU, which refuses host offload
(`jaxsys.config.checks.check_memory_platform`), the planner compiles `offload_stand_in`: the same
step without the offload, and reports what the offload would move from shardings and a formula.

Letters as in `planner`: L layers, b sequences per device per microbatch, T sequence (s = T/c),
D embed, F MLP hidden, H heads, K kv heads, E head size, t tensor, c context.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxsys.config import Config, apply_overrides
from jaxsys.parallel.mesh import batch_ways
from jaxsys.train import remat_auto
from jaxsys.train import state as state_lib


def _mib(x: float) -> str:
    return f"{x / 2**20:.3f}"


def offload_stand_in(cfg: Config, platform: str) -> Config:
    """On the CPU, which refuses host offload (`check_memory_platform`), the config planned in its
    place: the same step without the offload (train.offload=none; offload_dots_no_batch ->
    dots_no_batch, which saves the same activations on the device). Elsewhere `cfg`."""
    if platform != "cpu":
        return cfg
    over = ["train.offload=none"] * (cfg.train.offload != "none")
    over += ["model.remat=dots_no_batch"] * (cfg.model.remat == "offload_dots_no_batch")
    return apply_overrides(cfg, over) if over else cfg


def memory_moves(cfg: Config, s: state_lib.Setup, compiled: Any, tried: list[remat_auto.Tried],
                 sizes: dict[str, int]) -> tuple[dict[str, Any], dict[str, float]]:
    """(remat, offload) of a `Plan`: the policy compiled and every policy tried with its peak and
    temporaries in bytes; and the bytes per device host offload moves (`optimizer`: the AdamW
    moments' shards, measured from their shardings; `activations`: `closed_form_offloaded`, the
    saved weight-matmul outputs; `compiled_host_temp`: what the compiled program keeps in host
    memory, 0 where the offload was not compiled: on the CPU `offload_stand_in` planned without it)."""
    remat = {"configured": cfg.model.remat, "compiled": s.cfg.model.remat,
             "tried": [dataclasses.asdict(t) for t in tried]}
    offload: dict[str, float] = {}
    if cfg.train.offload == "optimizer":
        moments = optax_moments(state_lib.abstract_state(s).opt_state, s.state_sharding.opt_state)
        offload["optimizer"] = moments
    if cfg.model.remat == "offload_dots_no_batch":
        offload["activations"] = closed_form_offloaded(cfg, sizes)
    if offload:
        offload["compiled_host_temp"] = float(getattr(compiled.memory_analysis(), "host_temp_size_in_bytes", 0))
    return remat, offload


def optax_moments(abstract_opt: Any, opt_shardings: Any) -> float:
    """Per-device bytes of the optimizer state's array leaves of more than one element (the AdamW
    moments; not the step counters)."""
    leaves = jax.tree_util.tree_leaves(abstract_opt)
    shs = jax.tree_util.tree_leaves(opt_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return float(sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                     for x, sh in zip(leaves, shs) if math.prod(x.shape) > 1))


def closed_form_offloaded(cfg: Config, sizes: dict[str, int]) -> float:
    """Bytes per device `model.remat=offload_dots_no_batch` sends to the host: per layer the outputs
    of the matmuls without batch dimensions (`dots_with_no_batch_dims_saveable`: QKV (H + 2K)·E, the
    attention output projection D, the MLP's input (1 or, SwiGLU, 2 × F) and output D per token), in
    the compute dtype, for s = T/c positions of b sequences, the tensor-split ones divided by t."""
    m = cfg.model.resolved()
    t, c = sizes["tensor"], sizes.get("context", 1)
    b = cfg.train.batch_size // cfg.train.grad_accum // batch_ways(sizes)
    mlp_in = (1 if m.family == "gpt2" else 2) * m.mlp_dim
    per_token = ((m.num_heads + 2 * m.num_kv_heads) * m.head_dim + mlp_in) / t + 2 * m.embed_dim
    return m.num_layers * b * (m.seq_len // c) * per_token * np.dtype(m.compute_dtype).itemsize


def format_memory_moves(r: dict[str, Any], offload: dict[str, float]) -> list[str]:
    """The remat policy compiled (and, for auto, each tried) and what host offload moves."""
    if not r:
        return []
    tried = "; ".join(f"{t['policy']} peak {_mib(t['peak'])}, temp {_mib(t['temp'])} MiB" for t in r["tried"])
    lines = [f"  remat: {r['compiled']}" + (f" (auto, first to fit of: {tried})" if r["configured"] == "auto" else "")]
    where = {"optimizer": "AdamW moments, compiled shardings", "activations": "saved weight-matmul outputs, formula",
             "compiled_host_temp": "host temporaries of the compiled step"}
    for key, nbytes in offload.items():
        lines.append(f"  {'to host: ' + key:<26} {_mib(nbytes):>9}  ({where[key]})")
    return lines
