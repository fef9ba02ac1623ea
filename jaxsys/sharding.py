"""The one place where logical axis names meet mesh axes.

Model code names only *logical* axes (batch, seq, embed, heads, kv_heads, head_dim, mlp,
vocab, layers). Two rule tables map them onto the mesh axes (data, fsdp, tensor, pipe):
`PARAM_RULES` for parameters (and so gradients and optimizer state, which follow them) and
`ACTIVATION_RULES` for activations, as Levanter separates parameter and compute mappings.

- Data parallel: `data` > 1, everything else 1. Parameters are replicated, the batch is split.
- FSDP / ZeRO-3: `fsdp` > 1. Every parameter's `embed` dimension is split over `fsdp`, so
  parameters, gradients and AdamW moments all live 1/fsdp per device; weights are all-gathered
  before use (`use_weight`) and gradients reduce-scattered (`jaxsys.data_parallel` writes these
  collectives out; with `mesh.grad_sync=xla` the partitioner does). The batch is split over
  data × fsdp.
- ZeRO stages (`mesh.zero_stage`): the `fsdp` axis is the ZeRO axis. Stage 0 shards nothing
  over it (plain data parallel), 1 the AdamW moments, 2 + gradients, 3 + parameters (= FSDP).
  Each of parameters, gradients and optimizer state has its own table (`param_rules`,
  `grad_rules`, `optimizer_rules`); `data` always replicates, so data × fsdp is hybrid sharding.
- Tensor parallelism (Megatron): `heads`, `kv_heads`, `mlp` and `vocab` over `tensor`, so QKV
  and the first MLP matmul are column-parallel and the output projections row-parallel; the
  residual stream (`residual_seq`) is replicated over `tensor` and XLA all-reduces the partial
  sums into it. The vocabulary-parallel embedding and cross-entropy are in `tensor_parallel`.
- Sequence parallelism (`mesh.sequence_parallel`): `residual_seq` → `tensor`, so norms and
  residual adds hold 1/tensor of the sequence; the all-reduce becomes a reduce-scatter into the
  residual and an all-gather before the next column-parallel matmul. Attention's own `seq`
  stays unsharded (a `seq` → tensor rule would clash with `heads` → tensor).

The mesh uses `AxisType.Auto`: we state shardings for inputs, outputs and a few activations
and let XLA's SPMD partitioner choose the collectives. (On `Explicit` meshes, the default of
`jax.make_mesh`, every matmul over a sharded contraction would need an `out_sharding`.)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsys.config import Config, ConfigError, MeshConfig

# Outermost to innermost: `tensor` innermost so its devices are neighbours (fastest links).
MESH_AXES = ("pipe", "data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both

Rules = tuple[tuple[str, Any], ...]

PARAM_RULES: Rules = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", "pipe"),  # stacked layers split into pipeline stages (jaxsys.pipeline)
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
    ("residual_seq", None),  # the residual stream's sequence axis; -> tensor with SP
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
    """Rules for activations; with sequence parallelism the residual stream is split over tensor."""
    if not mesh_cfg.sequence_parallel:
        return ACTIVATION_RULES
    return tuple((k, "tensor" if k == "residual_seq" else v) for k, v in ACTIVATION_RULES)


def _without_fsdp(rules: Rules) -> Rules:
    return tuple((k, None if v == "fsdp" else v) for k, v in rules)


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 replaced by the rest of the devices; raises `ConfigError` on a
    layout whose product does not equal `num_devices`."""
    sizes = {name: getattr(mesh_cfg, name) for name in MESH_AXES}
    wild = [n for n, s in sizes.items() if s == -1]
    if len(wild) > 1:
        raise ConfigError(f"Only one mesh axis may be -1, got {wild}; give the others explicit sizes.")
    bad = [n for n, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]} is invalid; axis sizes are ≥ 1 (or -1 for 'the rest').")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    layout = " × ".join(f"{n}={s}" for n, s in sizes.items() if s != 1)
    if wild:
        if num_devices % fixed:
            raise ConfigError(
                f"The mesh {layout} needs a multiple of {fixed} devices, but there are {num_devices}. "
                f"Choose axis sizes whose product divides {num_devices} (on CPU, `jaxsys train "
                f"--devices {fixed}` simulates {fixed} devices)."
            )
        sizes[wild[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"The mesh {layout or 'of all 1s'} has {fixed} devices but {num_devices} are available. "
            f"Make the product of mesh.data, mesh.fsdp, mesh.tensor and mesh.pipe equal {num_devices} "
            f"(e.g. set mesh.data=-1 to use the rest); on CPU, `jaxsys train --devices {fixed}` "
            f"simulates {fixed} devices."
        )
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES`, sized from `mesh_cfg` over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


# ----------------------------------------------------------------------------- specs


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> P:
    """Translate logical names to a mesh `PartitionSpec` (a mesh axis is used at most once)."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def param_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = PARAM_RULES) -> Any:
    """Tree of `NamedSharding` for a tree of logical `PartitionSpec`s (from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` token array: batch over data × fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), ACTIVATION_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attach a tree of shardings to a tree of shapes (e.g. a restore or lowering target)."""
    return jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxsys_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = ACTIVATION_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `mesh` via `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, activation rules) set by the enclosing `activation_sharding`, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activation_sharding_off() -> Iterator[None]:
    """Trace without activation constraints (e.g. inside a `shard_map` that is manual over some
    mesh axes, where XLA propagates the layout from the inputs instead)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ----------------------------------------------------------------------------- manual regions
#
# Inside a `shard_map` that is manual over some mesh axes (`jaxsys.data_parallel` over the batch
# axes, `jaxsys.pipeline` over pipe and the batch axes), constraints and nested shard_maps must
# use the context's abstract mesh and may name only the axes that are still automatic. These
# helpers drop the manual axes, so model code and `tensor_parallel` read the same everywhere.


def manual_axes() -> frozenset[str]:
    """The mesh axes that are manual at this point of tracing (inside a shard_map); else empty."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def without_axes(spec: P, axes: frozenset[str]) -> P:
    """`spec` with the mesh axes in `axes` removed (a dimension left with none becomes None)."""
    entries = []
    for entry in spec:
        names = tuple(n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ()))
                      if n not in axes)
        entries.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*entries)


def shard_map(f: Any, mesh: Mesh, axis_names: Sequence[str], in_specs: Any, out_specs: Any,
              **kwargs: Any) -> Any:
    """`jax.shard_map` that also works nested inside another one: axes already manual are
    dropped from `axis_names` and from every spec, and the context's abstract mesh is used."""
    manual = manual_axes()
    if manual:
        drop = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda sp: without_axes(sp, manual), tree, is_leaf=lambda x: isinstance(x, P))
        mesh, axis_names = jax.sharding.get_abstract_mesh(), set(axis_names) - manual
        if not axis_names:  # all already manual here (jax.shard_map would read {} as "all axes")
            return f
        in_specs, out_specs = drop(in_specs), drop(out_specs)
    return jax.shard_map(f, mesh=mesh, axis_names=set(axis_names), in_specs=in_specs,
                         out_specs=out_specs, **kwargs)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec, manual = logical_to_spec(logical_axes, rules), manual_axes()
    if manual:
        mesh, spec = jax.sharding.get_abstract_mesh(), without_axes(spec, manual)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


_STORED_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "jaxsys_stored_param_rules", default=None)


@contextlib.contextmanager
def manual_fsdp(param_rules: Rules) -> Iterator[None]:
    """Inside a shard_map manual over `fsdp` whose parameters arrive split as `param_rules`
    say: `use_weight` all-gathers each weight over fsdp where it is used."""
    token = _STORED_RULES.set(param_rules)
    try:
        yield
    finally:
        _STORED_RULES.reset(token)


def dims_over(logical_axes: Sequence[str | None], rules: Rules, mesh_axis: str) -> list[int]:
    """The dimensions that `rules` split over `mesh_axis` (alone or with other axes)."""
    return [dim for dim, entry in enumerate(logical_to_spec(tuple(logical_axes), rules))
            if mesh_axis in ((entry,) if isinstance(entry, str) else tuple(entry or ()))]


def _stored_fsdp_dims(logical_axes: Sequence[str | None]) -> list[int]:
    """Dimensions of a weight that arrive split over a manual fsdp axis (inside `manual_fsdp`)."""
    stored = _STORED_RULES.get()
    if stored is None or "fsdp" not in manual_axes() or jax.sharding.get_abstract_mesh().shape["fsdp"] == 1:
        return []  # (a collective over a size-1 manual axis got tensor's replica groups: skip it)
    return dims_over(logical_axes, stored, "fsdp")


def stored_shape(shape: tuple[int, ...], logical_axes: Sequence[str | None]) -> tuple[int, ...]:
    """The shape in which a parameter of global `shape` reaches the model here: its fsdp
    dimension divided by the fsdp size inside `manual_fsdp` (ZeRO-3), else `shape`."""
    dims = _stored_fsdp_dims(logical_axes)
    if not dims:
        return shape
    fsdp = jax.sharding.get_abstract_mesh().shape["fsdp"]
    return tuple(n // fsdp if d in dims else n for d, n in enumerate(shape))


def tensor_local(fn: Any, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`fn(x)` on each device's `tensor` block of a parameter-shaped `x` (split over tensor as
    `PARAM_RULES` say), for collectives over the manual batch axes inside a manual region:
    left to XLA, an fsdp all-gather or reduce-scatter of a tensor-split buffer ran on the whole
    buffer (replicated over tensor first). `fn` must keep the tensor-split dimensions' sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    if "tensor" in manual_axes() or "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return fn(x)
    spec = P(*[e if e == "tensor" else None for e in logical_to_spec(logical_axes, PARAM_RULES)])
    return shard_map(fn, mesh, {"tensor"}, in_specs=spec, out_specs=spec, check_vma=False)(x)


def use_weight(w: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """A stored parameter at its point of use, laid out for compute (`ACTIVATION_RULES`).

    Under XLA's partitioner this is a sharding constraint: for an fsdp-split weight, XLA emits
    the all-gather (and for its gradient an all-reduce, or a reduce-scatter where the backend
    has the pass). Inside `manual_fsdp` it is an explicit `all_gather` over fsdp, whose
    transpose is a `psum_scatter`: the gradient arrives reduce-scattered, ZeRO-3 exactly."""
    for dim in _stored_fsdp_dims(logical_axes):
        w = tensor_local(lambda x, d=dim: jax.lax.all_gather(x, "fsdp", axis=d, tiled=True), w, logical_axes)
    return constrain(w, logical_axes)


# ----------------------------------------------------------------------------- validation


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_layout(cfg: Config, mesh: Mesh, abstract_params: Any, logical_specs: Any) -> None:
    """Reject, before any compile, a layout whose shapes do not divide over their mesh axes.

    `abstract_params` is a tree of `jax.ShapeDtypeStruct`; `logical_specs` the matching tree of
    logical `PartitionSpec`s. Raises `ConfigError` naming the parameter, dimension, axis and fix.
    """
    sizes = dict(mesh.shape)
    m = cfg.model
    tensor = sizes["tensor"]
    for what, value, key in (("model.num_heads", m.num_heads, "heads"),
                             ("model.num_kv_heads", m.kv_heads, "kv_heads"),
                             ("model.vocab_size", m.vocab_size, "vocab")):
        if value % tensor:
            raise ConfigError(
                f"{what}={value} is not divisible by the tensor axis (mesh.tensor={tensor}); "
                f"choose mesh.tensor dividing {value}."
            )
    if cfg.mesh.sequence_parallel and m.seq_len % tensor:
        raise ConfigError(
            f"mesh.sequence_parallel=true splits the sequence over the tensor axis, but "
            f"model.seq_len={m.seq_len} is not divisible by mesh.tensor={tensor}; use a seq_len "
            f"that is a multiple of {tensor} or set mesh.sequence_parallel=false."
        )
    data_ways = sizes["data"] * sizes["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % data_ways:
        raise ConfigError(
            f"The per-step batch of {micro} sequences (train.batch_size={cfg.train.batch_size} / "
            f"train.microbatches={cfg.train.microbatches}) is not divisible by data × fsdp = "
            f"{sizes['data']} × {sizes['fsdp']} = {data_ways}; use a train.batch_size that is a "
            f"multiple of {data_ways * cfg.train.microbatches}."
        )

    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), logical in zip(flat_shapes, flat_specs):
        mesh_spec = logical_to_spec(tuple(logical), optimizer_rules(cfg.mesh))  # the most split
        for dim, (size, name, axes) in enumerate(zip(leaf.shape, logical, mesh_spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(sizes[a] for a in axes)
            if size % ways:
                divisors = [d for d in range(1, ways + 1) if size % d == 0 and ways % d == 0]
                raise ConfigError(
                    f"Parameter '{_path_str(path)}' dimension {dim} ('{name}', size {size}) is not "
                    f"divisible by mesh axis {'×'.join(axes)}={ways}. Use a mesh.{axes[0]} that "
                    f"divides {size} (e.g. {max(divisors)}), or change the model size."
                )
