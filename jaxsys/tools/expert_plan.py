"""Closed forms of expert parallelism for `jaxsys plan`: the all-to-all wire bytes and how the
experts' weights split (`jaxsys.parallel.expert`).

Letters: b sequences per device per microbatch (batch / grad_accum / (data·fsdp·expert)), T
sequence, D embed, X experts, U capacity (ceil(capacity_factor·T·top_k/X); T when dropless), n
mesh.expert, L' MoE layers, A train.grad_accum.

Per MoE layer and microbatch each device sends four buffers of b·X·U·D elements (compute
dtype): dispatch and combine forward, and their transposes backward (the combine's cotangent
dispatched, the dispatch's combined); each all-to-all keeps 1/n of its buffer at home, so
(n − 1)/n of it is on the wire. Full remat (`model.remat=full`) runs the forward's two once more.
In token terms a buffer is b·T·top_k·D × (X·U / (T·top_k)) = the capacity factor (X/top_k in
dropless mode, which uses U = T buffers under expert parallelism).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxsys.config import Config
from jaxsys.parallel.mesh import batch_ways


def moe_layers(cfg: Config) -> int:
    """L', the number of layers with routed experts (`model.moe.first_dense_layers`, `every`)."""
    m = cfg.model.moe
    if m.num_experts <= 0:
        return 0
    return sum(1 for i in range(cfg.model.num_layers)
               if i >= m.first_dense_layers and (i - m.first_dense_layers) % m.every == 0)


def capacity(cfg: Config) -> int:
    """U, the slots of one expert's buffer per sequence, as `jaxsys.model.moe.capacity`."""
    m, T = cfg.model.moe, cfg.model.seq_len
    if m.dispatch == "dropless":
        return T
    return math.ceil(m.capacity_factor * T * m.top_k / m.num_experts)


def closed_form_expert(cfg: Config, sizes: dict[str, int]) -> dict[str, float]:
    """All-to-all wire bytes per device per step: 4 (+2 with full remat) × (n − 1)/n × b·X·U·D
    × dtype bytes per MoE layer and microbatch (see the module docstring); {} without expert
    parallelism."""
    n = sizes.get("expert", 1)
    if n == 1 or moe_layers(cfg) == 0:
        return {}
    m, A = cfg.model, cfg.train.grad_accum
    b = cfg.train.batch_size // A // batch_ways(sizes)
    buffer = b * m.moe.num_experts * capacity(cfg) * m.embed_dim * np.dtype(m.compute_dtype).itemsize
    passes = 4 + (2 if m.remat == "full" else 0)
    return {"all-to-all": A * moe_layers(cfg) * passes * (n - 1) / n * buffer}


def is_expert_leaf(logical: P) -> bool:
    """Is this parameter (by its logical axes) an expert weight, split over `expert`?"""
    return "expert" in tuple(logical)


def expert_leaves(tree: Any, logical_specs: Any) -> list[Any]:
    """The leaves of a parameter-shaped `tree` (arrays, shapes or shardings) that are expert
    weights, by the matching tree of logical `PartitionSpec`s."""
    treedef = jax.tree_util.tree_structure(logical_specs, is_leaf=lambda x: isinstance(x, P))
    specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
    return [x for x, lg in zip(treedef.flatten_up_to(tree), specs) if is_expert_leaf(lg)]


def expert_params(abstract: Any, logical_specs: Any) -> int:
    """Scalars in the experts' weights (those with an `expert` axis)."""
    return sum(int(x.size) for x in expert_leaves(abstract, logical_specs))
