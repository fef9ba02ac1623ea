"""Data parallelism and ZeRO 0–3 with the gradient collectives written out (`mesh.grad_sync=explicit`).

Left to XLA's SPMD partitioner, the gradient sync of a batch-split step is whatever the
partitioner and the backend's passes make of it. On XLA:CPU (measured, docs/benchmarks.md) that
is an all-reduce of every gradient, also where ZeRO wants a reduce-scatter (XLA:GPU has a pass
that rewrites all-reduce + slice into a reduce-scatter; XLA:CPU has none), and the tied
embedding's two gradient contributions (lookup and output head) are all-reduced separately.

Here the loss and gradients of a step run inside `jax.shard_map`, manual over the batch axes
(data, fsdp, expert) and `context` (`tensor` stays with XLA, and `jaxsys.parallel.tensor`'s and
`jaxsys.parallel.context`'s own shard_maps nest inside), each device on its own rows and its own
share of their positions, and the sync is the ZeRO paper's, stage by stage (`mesh.zero_stage`),
with `context` reduced alongside `data` (its devices hold parameters whole, like data's):

- 0: all-reduce every gradient over data × fsdp (one all-reduce over both axes), once per
  step, after accumulation.
- 1: accumulate the full local gradients over the step's microbatches, then reduce-scatter them
  over fsdp (each device keeps the slice its AdamW moments cover) and all-reduce the slice over
  data. XLA all-gathers the updated parameters after the sharded AdamW update.
- 2: reduce-scatter each microbatch's gradients over fsdp as soon as they exist (only a 1/fsdp
  accumulator lives); all-reduce the slices over data at the end.
- 3: parameters arrive split over fsdp (the model's `stored_shape` hook says so) and the
  `use_weight` hook all-gathers each where it is used (`gathering_weights`); the transpose of
  that all-gather is the reduce-scatter of its gradient (per layer, per microbatch). All-reduce
  over data at the end.

Every collective over the batch axes runs on each device's `tensor` block
(`manual.tensor_local`, a shard_map nested over `tensor`): left to XLA 0.10's partitioner, a
manual fsdp all-gather or reduce-scatter of a tensor-split buffer ran on the whole buffer and
all-gathered it over tensor first (measured: 2.4× the closed-form bytes on fsdp=4 × tensor=2).

Expert parallelism (`mesh.expert`, `jaxsys.parallel.expert`): `expert` is a batch axis, so
every parameter's gradient is reduced over it too, except the experts' own weights: those
arrive split over `expert` (each device owns X / expert experts, and their gradients already
hold every device's tokens, brought back by the transpose of the dispatch all-to-all), so they
are reduced over data, fsdp and context only.

Parameters that no rule splits over fsdp (biases and norms without an `embed` axis) are
all-reduced over fsdp instead. Gradients are summed in the autodiff graph before any collective,
so the tied embedding is synced once. Each device's loss is the mean over its own rows, so the
global loss and gradients are the sums over the batch axes divided by data × fsdp × expert
(× context).

`mesh.grad_comm_dtype` (float32 / bfloat16) is the dtype on the wire of every gradient
reduction here: each gradient is cast to it before its psum or reduce-scatter and back after
(ZeRO-3: the backward of the weight all-gather, `_gather`, reduce-scatters in it; the forward
all-gather stays in the parameter dtype). The sums over devices are then rounded to that dtype
once per collective (XLA:CPU's ring adds in the wire dtype): bfloat16 halves the bytes of
float32 for ~3 significant digits of the summed gradient.

With dropout, each device folds its index over the batch axes into the step's key: the masks
differ from a one-device run's (as they would on any other number of devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys.config import Config
from jaxsys.model import hooks
from jaxsys.parallel.manual import manual_axes, psum_live, shard_map, tensor_local
from jaxsys.parallel.mesh import DATA_AXES, batch_ways
from jaxsys.parallel.rules import PARAM_RULES, Rules, dims_over, param_rules

Batch = dict[str, jax.Array]
GradFn = Callable[[Any, Batch, Any], tuple[jax.Array, Any]]


# The region's manual axes: the batch axes, and `context`, which splits the sequence of every
# row: its devices' gradients are partial sums over their tokens, reduced with data's.
SYNC_AXES = (*DATA_AXES, "context")


def uses_explicit_sync(cfg: Config, mesh: Mesh) -> bool:
    """Does the train step sync gradients here (rather than leave it to XLA)?"""
    sizes = dict(mesh.shape)
    return (cfg.mesh.grad_sync == "explicit" and sizes["pipe"] == 1
            and batch_ways(sizes) * sizes["context"] > 1)


def _fsdp_dim(logical: P, rules: Rules) -> int | None:
    """The dimension that `rules` split over fsdp for a parameter with these logical axes."""
    dims = dims_over(tuple(logical), rules, "fsdp")
    return dims[0] if dims else None


def _manual_dims(axes: Any, rules: Rules, mesh_axis: str) -> list[int]:
    """The dimensions `rules` split over `mesh_axis`, where that axis is manual here and > 1."""
    if mesh_axis not in manual_axes() or jax.sharding.get_abstract_mesh().shape[mesh_axis] == 1:
        return []  # (a collective over a size-1 manual axis got tensor's replica groups: skip it)
    return dims_over(axes, rules, mesh_axis)


def comm_dtype(cfg: Config) -> Any:
    """`mesh.grad_comm_dtype` as a dtype, or None ("auto": the gradients' own)."""
    return None if cfg.mesh.grad_comm_dtype == "auto" else jnp.dtype(cfg.mesh.grad_comm_dtype)


def _fully_manual(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """`fn(x)` in a region manual over every mesh axis. The axes still automatic here (tensor
    when `tensor_local` did not split, pipe) are of size 1, so nothing moves."""
    mesh = jax.sharding.get_abstract_mesh()
    rest = set(mesh.axis_names) - set(mesh.manual_axes)
    if not rest:
        return fn(x)
    assert all(mesh.shape[a] == 1 for a in rest), rest
    return jax.shard_map(fn, mesh=mesh, axis_names=rest, in_specs=P(), out_specs=P(), check_vma=False)(x)


def _in_dtype(collective: Callable[[jax.Array], jax.Array], x: jax.Array, dtype: Any) -> jax.Array:
    """`collective(x)` (a psum or reduce-scatter) sent in `dtype` (None: x's own), returned in
    x's dtype. A 16-bit wire runs fully manual (`_fully_manual`): XLA:CPU 0.10 aborts on a
    bfloat16 all-reduce or reduce-scatter in a partially manual region ("Invalid binary
    instruction opcode copy": its reducer ends in a sharding-constraint copy); before this,
    model.param_dtype=bfloat16 with the explicit sync did not compile."""
    wire = x.dtype if dtype is None else jnp.dtype(dtype)
    if jnp.dtype(wire).itemsize >= 4:
        return collective(x.astype(wire)).astype(x.dtype)
    return _fully_manual(collective, x.astype(wire)).astype(x.dtype)


def _gather(x: jax.Array, dim: int, dtype: Any) -> jax.Array:
    """All-gather `x` over fsdp along `dim` (in x's dtype); its transpose, the gradient's
    reduce-scatter, is sent in `dtype` (None: the gradient's own) through `_in_dtype`."""
    def gather(v: jax.Array) -> jax.Array:
        return jax.lax.all_gather(v, "fsdp", axis=dim, tiled=True)
    if dtype is None and x.dtype.itemsize >= 4:
        return gather(x)  # JAX's own transpose

    @jax.custom_vjp
    def f(v: jax.Array) -> jax.Array:
        return gather(v)

    def bwd(_: None, ct: jax.Array) -> tuple[jax.Array]:
        return (_in_dtype(lambda c: jax.lax.psum_scatter(c, "fsdp", scatter_dimension=dim, tiled=True), ct, dtype),)
    f.defvjp(lambda v: (gather(v), None), bwd)
    return f(x)


def gathering_weights(outer: hooks.Hooks, stored_rules: Rules, dtype: Any = None) -> hooks.Hooks:
    """`outer` with the ZeRO-3 weight hooks for a region manual over `fsdp` whose parameters
    arrive split as `stored_rules` say: `stored_shape` is the local slice's shape (also 1/expert
    of an `expert` dimension when `expert` is manual: each device holds its own experts), and
    `use_weight` all-gathers each weight over fsdp where it is used, then applies `outer`'s
    (expert weights stay split over `expert`: `jaxsys.parallel.expert` uses them locally)."""

    def fsdp_dims(axes: Any) -> list[int]:
        return _manual_dims(axes, stored_rules, "fsdp")

    def stored_shape(shape: tuple[int, ...], axes: Any) -> tuple[int, ...]:
        mesh = jax.sharding.get_abstract_mesh()
        ways = {d: mesh.shape[a] for a in ("fsdp", "expert") for d in _manual_dims(axes, stored_rules, a)}
        return tuple(n // ways.get(d, 1) for d, n in enumerate(shape))

    def use_weight(w: jax.Array, axes: Any) -> jax.Array:
        for dim in fsdp_dims(axes):
            w = tensor_local(lambda x, d=dim: _gather(x, d, dtype), w, axes)
        return outer.use_weight(w, axes)

    return dataclasses.replace(outer, stored_shape=stored_shape, use_weight=use_weight)


def _global_amax(local: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """The `amax` hook inside the region: each device's amax, maxed over the batch axes and
    context, so an fp8 scale (`jaxsys.model.fp8`) is the one a single device would compute for
    the whole batch (and equal on every device). One scalar all-reduce per scaled tensor."""
    return lambda x: jax.lax.pmax(local(x), SYNC_AXES)


def _spec(ndim: int, dim: int | None, expert_dim: int | None = None) -> P:
    return P(*[("fsdp" if d == dim else "expert" if d == expert_dim else None) for d in range(ndim)])


def _reduce_scatter(g: jax.Array, dim: int, logical: P, dtype: Any = None) -> jax.Array:
    """Reduce-scatter `g` over fsdp along `dim`, on each device's tensor block, sent in `dtype`."""
    return tensor_local(lambda x: _in_dtype(
        lambda v: jax.lax.psum_scatter(v, "fsdp", scatter_dimension=dim, tiled=True), x, dtype), g, tuple(logical))


@dataclasses.dataclass(frozen=True)
class _SyncPlan:
    """Per parameter leaf (in tree order): its logical axes, the dimension it arrives split on
    over fsdp (ZeRO-3), the dimension its gradient leaves split on (ZeRO 1-3), whether that
    gradient is reduce-scattered per microbatch (ZeRO-2), and the dimension split over `expert`
    (expert weights, at every stage; None elsewhere)."""

    treedef: Any
    logical: list[P]
    stored: list[int | None]
    out: list[int | None]
    early: list[bool]
    experts: list[int | None]
    sizes: dict[str, int]
    dtype: Any = None  # the wire dtype of the reductions (mesh.grad_comm_dtype; None = the gradients')

    @classmethod
    def make(cls, cfg: Config, mesh: Mesh, logical_specs: Any) -> "_SyncPlan":
        stage, sizes = cfg.mesh.zero_stage, dict(mesh.shape)
        leaves, treedef = jax.tree_util.tree_flatten(logical_specs, is_leaf=lambda x: isinstance(x, P))
        split = sizes["fsdp"] > 1
        stored = [_fsdp_dim(lg, param_rules(cfg.mesh)) if split else None for lg in leaves]
        out = [_fsdp_dim(lg, PARAM_RULES) if stage >= 1 and split else None for lg in leaves]
        early = [o is not None and st is None and stage == 2 for st, o in zip(stored, out)]
        experts = [(dims_over(tuple(lg), PARAM_RULES, "expert") or [None])[0] if sizes["expert"] > 1
                   else None for lg in leaves]
        return cls(treedef, leaves, stored, out, early, experts, sizes, comm_dtype(cfg))

    def scatter_early(self, grads: Any) -> Any:
        """ZeRO-2: reduce-scatter each microbatch's gradients over fsdp as they are made."""
        flat = self.treedef.flatten_up_to(grads)
        return self.treedef.unflatten([_reduce_scatter(g, o, lg, self.dtype) if e else g
                                       for g, lg, o, e in zip(flat, self.logical, self.out, self.early)])

    def finish(self, grads: Any) -> Any:
        """Reduce what is not reduced yet, then divide by data × fsdp × expert × context (the
        mean over devices: each holds as many tokens). Expert weights are not reduced over
        `expert`: each device owns other experts."""
        ways = batch_ways(self.sizes) * self.sizes["context"]
        result = []
        for g, lg, st, o, e, x in zip(self.treedef.flatten_up_to(grads), self.logical, self.stored,
                                      self.out, self.early, self.experts):
            if st is not None or e:  # reduced over fsdp already (a transpose, or per microbatch)
                axes = tuple(a for a in SYNC_AXES if a != "fsdp")
            elif o is not None:  # ZeRO-1: reduce-scatter over fsdp now
                g, axes = _reduce_scatter(g, o, lg, self.dtype), tuple(a for a in SYNC_AXES if a != "fsdp")
            else:  # not split over fsdp: one all-reduce over data × fsdp × expert × context
                axes = SYNC_AXES
            if x is not None:
                axes = tuple(a for a in axes if a != "expert")
            result.append(tensor_local(lambda v, a=axes: _in_dtype(lambda u: psum_live(u, a, self.sizes), v,
                                                                  self.dtype) / ways, g, tuple(lg)))
        return self.treedef.unflatten(result)

    def specs(self, dims: list[int | None]) -> Any:
        return self.treedef.unflatten([_spec(len(lg), d, x) for lg, d, x in zip(self.logical, dims, self.experts)])


def make_synced_grads(cfg: Config, mesh: Mesh, logical_specs: Any,
                      accumulate: Callable[..., tuple[jax.Array, Any]],
                      grad_fn: GradFn) -> Callable[[Any, Batch, Any], tuple[jax.Array, Any]]:
    """`(params, batch, key) -> (mean loss, grads)` with explicit ZeRO collectives.

    `accumulate(grad_fn, params, batch, key, per_micro)` sums `grad_fn` over the step's
    microbatches (see `jaxsys.train.step.accumulate`); `logical_specs` is the parameters' tree of
    logical `PartitionSpec`s. The returned grads are split over fsdp for stages 1–3 (the layout of
    the AdamW moments) and whole for stage 0; call it inside `jax.jit`."""
    plan = _SyncPlan.make(cfg, mesh, logical_specs)
    ways = batch_ways(plan.sizes) * plan.sizes["context"]

    def local(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
        if key is not None:  # different dropout masks per device
            key = jax.random.fold_in(key, jax.lax.axis_index(SYNC_AXES))
        inner = dataclasses.replace(gathering_weights(hooks.current(), param_rules(cfg.mesh), plan.dtype),
                                    amax=_global_amax(hooks.current().amax))
        with hooks.installed(inner):
            loss, grads = accumulate(grad_fn, params, batch, key, plan.scatter_early)
        # The loss (or (loss, MoE stats), a tree of per-device means) averaged over the devices.
        mean = lambda v: psum_live(v, SYNC_AXES, plan.sizes) / ways  # noqa: E731
        return jax.tree_util.tree_map(mean, loss), plan.finish(grads)

    in_params, out_grads = plan.specs(plan.stored), plan.specs(plan.out)

    def loss_and_grads(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
        batch_specs = {k: P(DATA_AXES, "context") for k in batch}  # [B, T]: rows, and positions
        if key is None:
            fn, args, in_specs = (lambda p, b: local(p, b, None)), (params, batch), (in_params, batch_specs)
        else:
            fn, args, in_specs = local, (params, batch, key), (in_params, batch_specs, P())
        # check_vma=False: with it on, JAX's AD would psum the gradient of every parameter that
        # enters replicated (the transpose of its implicit broadcast to the per-device rows), an
        # all-reduce per use; the sync here is the only one.
        return shard_map(fn, mesh, SYNC_AXES, in_specs=in_specs,
                         out_specs=(P(), out_grads), check_vma=False)(*args)

    return loss_and_grads
