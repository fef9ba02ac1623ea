"""The rules tables: the one place where logical axis names meet mesh axes.

Model code names only *logical* axes (batch, seq, embed, heads, kv_heads, head_dim, mlp,
vocab, layers, expert). Two rule tables map them onto the mesh axes (data, fsdp, expert,
context, tensor, pipe):
`PARAM_RULES` for parameters (and so gradients and optimizer state, which follow them) and
`ACTIVATION_RULES` for activations, as Levanter separates parameter and compute mappings.

- Data parallel: `data` > 1, everything else 1. Parameters are replicated, the batch is split.
- FSDP / ZeRO-3: `fsdp` > 1. Every parameter's `embed` dimension is split over `fsdp`, so
  parameters, gradients and AdamW moments all live 1/fsdp per device; weights are all-gathered
  before use (the `use_weight` hook) and gradients reduce-scattered (`jaxsys.parallel.zero` writes these
  collectives out; with `mesh.grad_sync=xla` the partitioner does). The batch is split over
  data × fsdp.
- ZeRO stages (`mesh.zero_stage`): the `fsdp` axis is the ZeRO axis. Stage 0 shards nothing
  over it (plain data parallel), 1 the AdamW moments, 2 + gradients, 3 + parameters (= FSDP).
  Each of parameters, gradients and optimizer state has its own table (`param_rules`,
  `grad_rules`, `optimizer_rules`); `data` always replicates, so data × fsdp is hybrid sharding.
- Tensor parallelism (Megatron): `heads`, `kv_heads`, `mlp` and `vocab` over `tensor`, so QKV
  and the first MLP matmul are column-parallel and the output projections row-parallel; the
  residual stream (`residual_seq`) is replicated over `tensor` and XLA all-reduces the partial
  sums into it. The vocabulary-parallel embedding and cross-entropy are in `jaxsys.parallel.tensor`.
- Sequence parallelism (`mesh.sequence_parallel`): `residual_seq` → `tensor`, so norms and
  residual adds hold 1/tensor of the sequence; the all-reduce becomes a reduce-scatter into the
  residual and an all-gather before the next column-parallel matmul. Attention's own `seq`
  stays unsharded (a `seq` → tensor rule would clash with `heads` → tensor).
- Expert parallelism (`mesh.expert`): the MoE experts' `expert` dimension over `expert`, so
  each device stores X / expert of the experts' weights and their AdamW moments (fsdp still
  splits their `embed` dimension at ZeRO-3, tensor their `mlp` dimension). The batch is split
  over data × fsdp × expert (`DATA_AXES`); tokens reach their experts' devices by all-to-all
  (`jaxsys.parallel.expert`). Every other parameter is replicated over `expert`, which is one
  more data axis for it.
- Context parallelism (`mesh.context`): `seq` and `residual_seq` → `context`, so every
  activation holds 1/context of the sequence; attention, the one place that needs the whole
  sequence, is `jaxsys.parallel.context` (all-gather, ring or Ulysses).

A new strategy that only moves arrays is a new table (or a derived one, like the per-ZeRO-stage
tables below); one that needs its own collectives is one module of `jaxsys.parallel` that
installs its versions of the model's hooks (`jaxsys.parallel.install`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsys.config import MeshConfig
from jaxsys.model.axes import TOKENS_BT
from jaxsys.parallel.mesh import DATA_AXES

Rules = tuple[tuple[str, Any], ...]

PARAM_RULES: Rules = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("latent", None),  # MLA's compressed rank: whole on every device (jaxsys.model.mla)
    ("layers", "pipe"),  # stacked layers split into pipeline stages (jaxsys.parallel.pipeline)
    ("expert", "expert"),  # MoE experts split over devices (jaxsys.parallel.expert)
)

ACTIVATION_RULES: Rules = (
    ("batch", DATA_AXES),
    ("seq", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("latent", None),
    ("residual_seq", None),  # the residual stream's sequence axis; -> tensor with SP
    ("expert", "expert"),  # expert weights at their point of use stay split (use_weight)
)


def param_rules(mesh_cfg: MeshConfig) -> Rules:
    """Rules for stored parameters: split over `fsdp` only at ZeRO-3."""
    return PARAM_RULES if mesh_cfg.zero_stage >= 3 else _without_fsdp(PARAM_RULES)


def grad_rules(mesh_cfg: MeshConfig) -> Rules:
    """Rules for gradients: reduce-scattered over `fsdp` from ZeRO-2 on, else all-reduced."""
    return PARAM_RULES if mesh_cfg.zero_stage >= 2 else _without_fsdp(PARAM_RULES)


def optimizer_rules(mesh_cfg: MeshConfig) -> Rules:
    """Rules for the AdamW moments: split over `fsdp` from ZeRO-1 on."""
    return PARAM_RULES if mesh_cfg.zero_stage >= 1 else _without_fsdp(PARAM_RULES)


def activation_rules(mesh_cfg: MeshConfig) -> Rules:
    """Rules for activations; with sequence parallelism the residual stream is split over
    tensor; with context parallelism (`mesh.context` != 1) every sequence axis over context."""
    if mesh_cfg.context != 1:
        return tuple((k, "context" if k in ("seq", "residual_seq") else v) for k, v in ACTIVATION_RULES)
    if not mesh_cfg.sequence_parallel:
        return ACTIVATION_RULES
    return tuple((k, "tensor" if k == "residual_seq" else v) for k, v in ACTIVATION_RULES)


def _without_fsdp(rules: Rules) -> Rules:
    return tuple((k, None if v == "fsdp" else v) for k, v in rules)


# ----------------------------------------------------------------------------- specs


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> P:
    """Translate logical names to a mesh `PartitionSpec` (a mesh axis is used at most once)."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def param_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = PARAM_RULES) -> Any:
    """Tree of `NamedSharding` for a tree of logical `PartitionSpec`s (from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` token array: batch over data × fsdp × expert."""
    return NamedSharding(mesh, logical_to_spec(TOKENS_BT, ACTIVATION_RULES))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attach a tree of shardings to a tree of shapes (e.g. a restore or lowering target)."""
    return jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)


def dims_over(logical_axes: Sequence[str | None], rules: Rules, mesh_axis: str) -> list[int]:
    """The dimensions that `rules` split over `mesh_axis` (alone or with other axes)."""
    return [dim for dim, entry in enumerate(logical_to_spec(tuple(logical_axes), rules))
            if mesh_axis in ((entry,) if isinstance(entry, str) else tuple(entry or ()))]
