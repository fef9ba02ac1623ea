"""Data parallelism and ZeRO 0–3 with the gradient collectives written out (`mesh.grad_sync=explicit`).

Left to XLA's SPMD partitioner, the gradient sync of a batch-split step is whatever the
partitioner and the backend's passes make of it. On XLA:CPU (measured, docs/benchmarks.md) that
is an all-reduce of every gradient, also where ZeRO wants a reduce-scatter (XLA:GPU has a pass
that rewrites all-reduce + slice into a reduce-scatter; XLA:CPU has none), and the tied
embedding's two gradient contributions (lookup and output head) are all-reduced separately.

Here the loss and gradients of a step run inside `jax.shard_map`, manual over the batch axes
(data, fsdp; `tensor` stays with XLA, and `tensor_parallel`'s own shard_maps nest inside), each
device on its own rows, and the sync is the ZeRO paper's, stage by stage (`mesh.zero_stage`):

- 0: all-reduce every gradient over data × fsdp (one all-reduce over both axes), once per
  step, after accumulation.
- 1: accumulate the full local gradients over the step's microbatches, then reduce-scatter them
  over fsdp (each device keeps the slice its AdamW moments cover) and all-reduce the slice over
  data. XLA all-gathers the updated parameters after the sharded AdamW update.
- 2: reduce-scatter each microbatch's gradients over fsdp as soon as they exist (only a 1/fsdp
  accumulator lives); all-reduce the slices over data at the end.
- 3: parameters arrive split over fsdp and `sharding.use_weight` all-gathers each where it is
  used; the transpose of that all-gather is the reduce-scatter of its gradient (per layer, per
  microbatch). All-reduce over data at the end.

Every collective over the batch axes runs on each device's `tensor` block
(`sharding.tensor_local`, a shard_map nested over `tensor`): left to XLA 0.10's partitioner, a
manual fsdp all-gather or reduce-scatter of a tensor-split buffer ran on the whole buffer and
all-gathered it over tensor first (measured: 2.4× the closed-form bytes on fsdp=4 × tensor=2).

Parameters that no rule splits over fsdp (biases and norms without an `embed` axis) are
all-reduced over fsdp instead. Gradients are summed in the autodiff graph before any collective,
so the tied embedding is synced once. Each device's loss is the mean over its own rows, so the
global loss and gradients are the sums over the batch axes divided by data × fsdp.

With dropout, each device folds its index over the batch axes into the step's key: the masks
differ from a one-device run's (as they would on any other number of devices).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys import sharding as shd
from jaxsys.config import Config

Batch = dict[str, jax.Array]
GradFn = Callable[[Any, Batch, Any], tuple[jax.Array, Any]]


def uses_explicit_sync(cfg: Config, mesh: Mesh) -> bool:
    """Does the train step sync gradients here (rather than leave it to XLA)?"""
    sizes = dict(mesh.shape)
    return (cfg.mesh.grad_sync == "explicit" and sizes["pipe"] == 1
            and sizes["data"] * sizes["fsdp"] > 1)


def _fsdp_dim(logical: P, rules: shd.Rules) -> int | None:
    """The dimension that `rules` split over fsdp for a parameter with these logical axes."""
    dims = shd.dims_over(tuple(logical), rules, "fsdp")
    return dims[0] if dims else None


def _spec(ndim: int, dim: int | None) -> P:
    return P(*[("fsdp" if d == dim else None) for d in range(ndim)])


def make_loss_and_grads(cfg: Config, mesh: Mesh, logical_specs: Any,
                        accumulate: Callable[..., tuple[jax.Array, Any]],
                        grad_fn: GradFn) -> Callable[[Any, Batch, Any], tuple[jax.Array, Any]]:
    """`(params, batch, key) -> (mean loss, grads)` with explicit ZeRO collectives.

    `accumulate(grad_fn, params, batch, key, per_micro)` sums `grad_fn` over the step's
    microbatches (see `train_step.accumulate`); `logical_specs` is the parameters' tree of logical
    `PartitionSpec`s. The returned grads are split over fsdp for stages 1–3 (the layout of the
    AdamW moments) and whole for stage 0; call it inside `jax.jit`."""
    stage = cfg.mesh.zero_stage
    sizes = dict(mesh.shape)
    ways = sizes["data"] * sizes["fsdp"]

    def psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        """One all-reduce over those of `axes` with size > 1: XLA 0.10 gave a collective over a
        size-1 manual axis the replica groups of `tensor` (measured: an "fsdp" all-gather at
        fsdp=1 gathered over tensor)."""
        live = tuple(a for a in axes if sizes[a] > 1)
        return jax.lax.psum(x, live) if live else x

    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(logical_specs, is_leaf=is_spec)
    # Where each parameter arrives split (stage 3) and where its gradient leaves split (1–3).
    split = sizes["fsdp"] > 1
    stored = [_fsdp_dim(lg, shd.param_rules(cfg.mesh)) if split else None for lg in leaves]
    out = [_fsdp_dim(lg, shd.PARAM_RULES) if stage >= 1 and split else None for lg in leaves]
    per_micro_scatter = [o is not None and s is None and stage == 2 for s, o in zip(stored, out)]

    def reduce_scatter(g: jax.Array, dim: int, logical: P) -> jax.Array:
        return shd.tensor_local(
            lambda x: jax.lax.psum_scatter(x, "fsdp", scatter_dimension=dim, tiled=True), g, tuple(logical))

    def scatter_early(grads: Any) -> Any:
        """ZeRO-2: reduce-scatter each microbatch's gradients over fsdp as they are made."""
        flat = treedef.flatten_up_to(grads)
        return treedef.unflatten([reduce_scatter(g, o, lg) if early else g
                                  for g, lg, o, early in zip(flat, leaves, out, per_micro_scatter)])

    def finish(grads: Any) -> Any:
        """Reduce what is not reduced yet, then divide by data × fsdp (the mean over devices)."""
        flat = treedef.flatten_up_to(grads)
        result = []
        for g, lg, s, o, early in zip(flat, leaves, stored, out, per_micro_scatter):
            if s is not None or early:  # reduced over fsdp already (a transpose, or per microbatch)
                axes: tuple[str, ...] = ("data",)
            elif o is not None:  # ZeRO-1: reduce-scatter over fsdp now
                g, axes = reduce_scatter(g, o, lg), ("data",)
            else:  # not split over fsdp: one all-reduce over data × fsdp
                axes = shd.DATA_AXES
            result.append(shd.tensor_local(lambda x, a=axes: psum(x, a) / ways, g, tuple(lg)))
        return treedef.unflatten(result)

    def local(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
        if key is not None:  # different dropout masks per device
            key = jax.random.fold_in(key, jax.lax.axis_index(shd.DATA_AXES))
        with shd.manual_fsdp(shd.param_rules(cfg.mesh)):
            loss, grads = accumulate(grad_fn, params, batch, key, scatter_early)
        return psum(loss, shd.DATA_AXES) / ways, finish(grads)

    in_params = treedef.unflatten([_spec(len(lg), s) for lg, s in zip(leaves, stored)])
    out_grads = treedef.unflatten([_spec(len(lg), o) for lg, o in zip(leaves, out)])
    batch_spec = P(shd.DATA_AXES)

    def loss_and_grads(params: Any, batch: Batch, key: Any) -> tuple[jax.Array, Any]:
        if key is None:
            fn = lambda p, b: local(p, b, None)  # noqa: E731
            args, in_specs = (params, batch), (in_params, {k: batch_spec for k in batch})
        else:
            fn, args = local, (params, batch, key)
            in_specs = (in_params, {k: batch_spec for k in batch}, P())
        # check_vma=False: with it on, JAX's AD would psum the gradient of every parameter that
        # enters replicated (the transpose of its implicit broadcast to the per-device rows), an
        # all-reduce per use; the sync below is the only one.
        return shd.shard_map(fn, mesh, shd.DATA_AXES, in_specs=in_specs,
                             out_specs=(P(), out_grads), check_vma=False)(*args)

    return loss_and_grads
