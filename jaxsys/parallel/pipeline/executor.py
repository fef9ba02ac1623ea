"""Pipeline parallelism on the `pipe` mesh axis: one executor for any schedule table.

Shapes (`jaxsys.model.axes`): M pipeline microbatches, b rows per microbatch on one device,
T sequence, D embed, L layers, P stages (`pipe`; `p` its size), C chunks per stage (virtual
stages; `v` their count), Lc = L / (P·C) layers per chunk, Z stash slots, N ticks.

A table from `schedules` becomes static per-tick integer arrays ([N, P]: op, microbatch, chunk,
stash slots; `program.Program`). The executor runs inside `jax.shard_map`, manual over `pipe`
and the batch axes (data, fsdp, expert: each device runs its own rows and the gradients are psum'd over
them at the end; `tensor` stays with XLA's partitioner, so it composes with all three), as ONE
`lax.scan` over ticks (compile time flat in M). Each tick, each stage runs its op through
`lax.switch` over the module-level op functions below (`_idle`, `_forward`, `_backward`,
`_weights`), each in three roles (inner, first virtual stage, last virtual stage):

- F: the chunk's layers on the microbatch (the first virtual stage embeds the tokens first; the
  last computes head + loss). Each LAYER'S INPUT is kept, in a stash slot [Lc, b, T, D]:
  layer-boundary checkpoints, like Megatron's full recompute.
- B: back through the layers from the top, recomputing one layer at a time from its stashed
  input with `jax.vjp`, and send the input cotangent to the previous stage.
- W: the same pass with the weight gradients too (ZB-H1 schedules W separately; in the other
  schedules a backward fills 2 ticks, run as B then W, so every tick of every table is executed
  as written and the bubble can be counted from what ran).

After the op, activations move to the next stage and cotangents to the previous one with
`ppermute` (a ring, so interleaved chunks wrap from stage P−1 to stage 0). The workspace of one
op is one layer's recompute, whatever Lc is. The stages run the model's own code: its `embed`
and `head` methods and `block_fn` (`jaxsys.model.transformer`), with the plain hooks.

Parameters keep the model's tree: stacked layers are split over `pipe` on the layers axis; the
embedding, final norm and head are replicated over `pipe`, used on the first/last stage, and
their gradients are summed over `pipe` at the end.

Mixture of experts (a uniform stack, `moe_layers`: every layer MoE; `jaxsys.config.checks`
refuses other layouts under `pipe`): each layer is `moe_block_fn`, fed its slice of the
loss-free bias (`moe_bias`, split over `pipe` like the layers). A layer's balancing term,
`moe.penalty` / (MoE layers · M), is a second output of its recompute, given cotangent 1 in B
and W, so the gradients are those of `jaxsys.model.loss.objective`; F's sown statistics are
summed per layer over microbatches and returned as their mean over microbatches and devices.
With `mesh.expert` > 1 the experts' weights enter split over `expert` and the stages use the
expert-parallel `experts` hook (`jaxsys.parallel.expert`): its all-to-all runs over the
region's manual `expert` axis, and those weights' gradients are summed over the other batch
axes only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys.config import Config, ConfigError
from jaxsys.data.batches import split_microbatches
from jaxsys.model import hooks, moe
from jaxsys.model.loss import head_loss
from jaxsys.model.transformer import Transformer, abstract_params, block_fn, moe_block_fn
from jaxsys.parallel import expert as expert_lib
from jaxsys.parallel.manual import psum_live
from jaxsys.parallel.mesh import DATA_AXES, batch_ways
from jaxsys.parallel.rules import ACTIVATION_RULES, PARAM_RULES, dims_over
from jaxsys.parallel.pipeline.program import FWD, IDLE, Program

_MID, _FIRST, _LAST = 0, 1, 2  # role of a virtual stage: inner, embeds the tokens, computes the loss
_TABLES = ("op", "mb", "chunk", "x_slot", "g_slot", "recv_x", "recv_g")


@dataclass(frozen=True)
class _Stage:
    """What every op of one stage needs that is fixed at trace time."""

    model: Transformer
    block: Callable[..., tuple[jax.Array, Any, jax.Array]]  # one layer: (y, stats, its balancing term)
    act: jax.ShapeDtypeStruct  # one microbatch's activation [b, T, D]
    microbatches: int  # M: the loss is the mean over them
    stats: Any = None  # one chunk's MoE statistics, [Lc, ...] ShapeDtypeStructs ({} when dense)

    def zero_x(self) -> jax.Array:
        return jnp.zeros(self.act.shape, self.act.dtype)

    def zero_stats(self) -> Any:
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), self.stats)


def _zeros(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _stage_block(mc: Any, microbatches: int) -> Callable[..., tuple[jax.Array, Any, jax.Array]]:
    """One layer as the stages run it: `(layer, x_bTD, positions, segment_ids) -> (y_bTD, stats,
    term)`, `layer` = {"params": ..., and for the loss-free bias "moe_bias": ...}. An MoE
    layer's `term` is its balancing penalty (`moe.penalty`) / (MoE layers · M): its share of the
    objective the one-device step differentiates (the mean over layers and microbatches)."""
    if not mc.moe.num_experts:
        dense = block_fn(mc)
        return lambda layer, x, pos, seg: (dense(layer["params"], x, pos, seg), {}, jnp.zeros((), jnp.float32))
    sparse = moe_block_fn(mc)
    share = 1.0 / (sum(moe.is_moe_layer(mc.moe, i) for i in range(mc.num_layers)) * microbatches)

    def block(layer, x, pos, seg):
        y, stats = sparse(layer["params"], layer.get(moe.BIAS), x, pos, seg)
        return y, stats, moe.penalty(stats, mc.moe).astype(jnp.float32) * share
    return block


# A microbatch as the ops see it: this device's [b, T] "inputs", "targets", "positions", and
# for packed documents "segment_ids" and "loss_weights" (`jaxsys.model.loss.Batch`).
Micro = dict[str, jax.Array]


def _embed(st: _Stage, sp: Any, mb: Micro) -> jax.Array:
    return st.model.apply({"params": sp}, mb["inputs"], positions_BT=mb["positions"], method="embed")


def _loss(st: _Stage, sp: Any, y_bTD: jax.Array, mb: Micro) -> jax.Array:
    return head_loss(st.model, {"params": sp}, y_bTD, mb["targets"], mb.get("loss_weights"))


def _layer(st: _Stage, layer: Any, x_bTD: jax.Array, mb: Micro) -> tuple[jax.Array, Any, jax.Array]:
    return st.block(layer, x_bTD, mb["positions"], mb.get("segment_ids"))


def _forward_layers(st: _Stage, lp: Any, x_bTD: jax.Array, mb: Micro) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """The chunk's Lc layers: (output [b, T, D], (each layer's input [Lc, b, T, D], each
    layer's MoE statistics [Lc, ...]))."""
    def step(x, layer):
        y, stats, _ = _layer(st, layer, x, mb)
        return y, (x, stats)
    return jax.lax.scan(step, x_bTD, lp)


def _backward_layers(st: _Stage, lp: Any, inputs_LbTD: jax.Array, g_bTD: jax.Array, mb: Micro,
                     weights: bool) -> tuple[jax.Array, Any]:
    """Cotangent at the chunk's output -> cotangent at its input (and the layer parameters'
    gradients, stacked like `lp["params"]`, when `weights`), recomputing one layer at a time
    from its stashed input. Each layer's balancing term enters with cotangent 1 (it is already
    scaled to its share of the objective)."""
    def step(g, xs):
        layer, x = xs
        one = jnp.ones((), jnp.float32)
        def f(p_, x_):  # ((output, term), stats)
            y, stats, term = _layer(st, {**layer, "params": p_}, x_, mb)
            return (y, term), stats
        if weights:
            dlayer, dx = jax.vjp(f, layer["params"], x, has_aux=True)[1]((g, one))
            return dx, dlayer
        return jax.vjp(lambda x_: f(layer["params"], x_), x, has_aux=True)[1]((g, one))[0], None
    return jax.lax.scan(step, g_bTD, (lp, inputs_LbTD), reverse=True)


def _top_cotangent(st: _Stage, lp: Any, sp: Any, inputs_LbTD: jax.Array, mb: Micro) -> tuple[jax.Array, Any]:
    """The last virtual stage: d(loss / M) at its output (its last layer recomputed), and the
    final norm's and head's gradients."""
    y_bTD = _layer(st, jax.tree_util.tree_map(lambda a: a[-1], lp), inputs_LbTD[-1], mb)[0]
    _, vjp = jax.vjp(lambda y, sp_: _loss(st, sp_, y, mb), y_bTD, sp)
    return vjp(jnp.asarray(1.0 / st.microbatches, jnp.float32))  # the loss is the mean over microbatches


# Each op: (stage, role, lp, sp, stash entry [Lc, b, T, D], cotangent in, microbatch) ->
# (activation out, cotangent out, stash entry out, layer grads, shared grads, loss, MoE stats
# [Lc, ...] of the chunk's layers (F only; zeros otherwise)).


def _idle(st, role, lp, sp, entry, g, mb):
    return (st.zero_x(), st.zero_x(), entry, _zeros(lp["params"]), _zeros(sp), jnp.zeros((), jnp.float32),
            st.zero_stats())


def _forward(st, role, lp, sp, entry, g, mb):
    x = _embed(st, sp, mb) if role == _FIRST else entry[0]
    y, (inputs, stats) = _forward_layers(st, lp, x, mb)  # the stash keeps every layer's input
    if role == _LAST:
        loss = _loss(st, sp, y, mb).astype(jnp.float32)
        return st.zero_x(), st.zero_x(), inputs, _zeros(lp["params"]), _zeros(sp), loss, stats
    return y, st.zero_x(), inputs, _zeros(lp["params"]), _zeros(sp), jnp.zeros((), jnp.float32), stats


def _backward(st, role, lp, sp, entry, g, mb):
    if role == _FIRST:  # tokens have no cotangent: all of its work is in W
        return _idle(st, role, lp, sp, entry, g, mb)
    g_top = _top_cotangent(st, lp, sp, entry, mb)[0] if role == _LAST else g
    dx, _ = _backward_layers(st, lp, entry, g_top, mb, weights=False)
    return (st.zero_x(), dx, entry, _zeros(lp["params"]), _zeros(sp), jnp.zeros((), jnp.float32),
            st.zero_stats())


def _weights(st, role, lp, sp, entry, g, mb):
    g_top, dsp = _top_cotangent(st, lp, sp, entry, mb) if role == _LAST else (g, _zeros(sp))
    dx, dlp = _backward_layers(st, lp, entry, g_top, mb, weights=True)
    if role == _FIRST:  # the embedding's gradient, from the cotangent at layer 0
        dsp = jax.vjp(lambda sp_: _embed(st, sp_, mb), sp)[1](dx)[0]
    return st.zero_x(), st.zero_x(), entry, dlp, dsp, jnp.zeros((), jnp.float32), st.zero_stats()


def _branches(st: _Stage) -> list[Callable]:
    """`lax.switch` branches: idle, then F, B, W (op codes 1-3) × roles (inner, first, last)."""
    def bind(op, role):
        return lambda *args: op(st, role, *args)
    return [bind(_idle, _MID)] + [bind(op, r) for op in (_forward, _backward, _weights)
                                  for r in (_MID, _FIRST, _LAST)]


def _run_stage(st: _Stage, prog: Program, layers: Any, shared: Any,
               micro_M: Micro) -> tuple[jax.Array, Any, Any, Any, jax.Array]:
    """One stage's whole schedule (inside the shard_map): (loss sum, layer grads [v, Lc, ...],
    shared grads, MoE statistics summed over microbatches [v, Lc, ...], executed ops [N]), all
    in float32 and unreduced over devices. `layers`: {"params": ..., "moe_bias": ...} stacked."""
    p, v = prog.schedule.stages, prog.schedule.chunks
    last_vs = p * v - 1
    s = jax.lax.axis_index("pipe")
    layers = jax.tree_util.tree_map(lambda a: a.reshape(v, -1, *a.shape[1:]), layers)
    f32 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731
    at = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
    stats = jax.eval_shape(lambda lp, mb: _forward_layers(st, lp, st.zero_x(), mb)[1][1],
                           at(layers, 0), at(micro_M, 0))
    st = dataclasses.replace(st, stats=stats)
    branches = _branches(st)

    def tick(carry, row):
        xbuf, gbuf, x_in, g_in, dlayers, dshared, dstats, loss = carry
        op, mb, c, xs, gs, rx, rg = (a[s] for a in row)
        # An arriving activation is the input of the chunk's first layer.
        xbuf = jax.lax.dynamic_update_slice(xbuf, x_in[None, None], (rx, 0, 0, 0, 0))
        gbuf = jax.lax.dynamic_update_index_in_dim(gbuf, g_in, rg, 0)
        vs = c * p + s
        role = jnp.where(vs == 0, _FIRST, jnp.where(vs == last_vs, _LAST, _MID))
        branch = jnp.where(op == IDLE, 0, 1 + 3 * (op - FWD) + role)
        lp = at(layers, c)
        x_out, g_out, entry, dlp, dsp, dloss, stats_L = jax.lax.switch(
            branch, branches, lp, shared, xbuf[xs], gbuf[gs], {k: a[mb] for k, a in micro_M.items()})
        xbuf = jax.lax.dynamic_update_index_in_dim(xbuf, entry, xs, 0)  # F wrote its layers' inputs
        dlayers = jax.tree_util.tree_map(lambda a, d: a.at[c].add(d.astype(jnp.float32)), dlayers, dlp)
        dshared = jax.tree_util.tree_map(lambda a, d: a + d.astype(jnp.float32), dshared, dsp)
        dstats = jax.tree_util.tree_map(lambda a, d: a.at[c].add(d), dstats, stats_L)  # F's only
        x_next = jax.lax.ppermute(x_out, "pipe", [(i, (i + 1) % p) for i in range(p)])
        g_prev = jax.lax.ppermute(g_out, "pipe", [(i, (i - 1) % p) for i in range(p)])
        return (xbuf, gbuf, x_next, g_prev, dlayers, dshared, dstats, loss + dloss), op

    Lc = jax.tree_util.tree_leaves(layers)[0].shape[1]  # layers per chunk
    carry = (jnp.zeros((prog.x_slots + 1, Lc, *st.act.shape), st.act.dtype),
             jnp.zeros((prog.g_slots + 1, *st.act.shape), st.act.dtype), st.zero_x(), st.zero_x(),
             f32(layers["params"]), f32(shared), jax.tree_util.tree_map(lambda a: jnp.zeros((v, *a.shape), a.dtype),
                                                                         st.zero_stats()),
             jnp.zeros((), jnp.float32))
    tables = tuple(jnp.asarray(getattr(prog, k)) for k in _TABLES)
    (_, _, _, _, dlayers, dshared, dstats, loss), ops_N = jax.lax.scan(tick, carry, tables)
    return loss, dlayers, dshared, dstats, ops_N


def _layers_to_stages(a: jax.Array, p: int, v: int) -> jax.Array:
    """[L, ...] natural order -> order where stage s's rows are its chunks c·p+s, c < v."""
    return a.reshape(v, p, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def _stages_to_layers(a: jax.Array, p: int, v: int) -> jax.Array:
    return a.reshape(p, v, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def stack_name(cfg: Config) -> str:
    """The stacked layers the pipeline splits over `pipe`: `layers`, or an MoE model's uniform
    `moe_layers` (every layer MoE: `jaxsys.config.checks` refuses other MoE layouts)."""
    return "moe_layers" if cfg.model.moe.num_experts else "layers"


def _expert_dims(cfg: Config, key: str, split: bool) -> Any:
    """Per stacked layer parameter (a tree like `params[key]`): the dimension that enters the
    region split over `expert` (the experts' own weights under expert parallelism), else -1."""
    logical = abstract_params(cfg.model)[1][key]
    return jax.tree_util.tree_map(lambda spec: (dims_over(tuple(spec), PARAM_RULES, "expert") or [-1])[0]
                                  if split else -1, logical, is_leaf=lambda x: isinstance(x, P))


def _stage_hooks(c: int, split_experts: bool, mesh: Mesh) -> hooks.Hooks:
    """The hooks the stages trace with: the plain ones, but for context-parallel attention and
    expert-parallel experts (whose weights arrive as this device's X / expert experts)."""
    h = hooks.Hooks(attention=hooks.current().attention) if c > 1 else hooks.Hooks()
    if not split_experts:
        return h
    n = dict(mesh.shape)["expert"]
    return dataclasses.replace(
        h, experts=expert_lib.experts_hook(mesh, ACTIVATION_RULES, h.experts),
        stored_shape=lambda shape, axes: tuple(d // n if a == "expert" else d for d, a in zip(shape, axes)))


def _stage_layers(cfg: Config, params: Any, model_state: dict[str, Any] | None, p: int, v: int,
                  split_experts: bool) -> tuple[str, Any, Any, Any]:
    """(the stack's name, its layers in stage order as {"params": ..., "moe_bias": ...} (the
    bias when the model state has one), their specs in the region (split over `pipe`, the
    experts' weights over `expert` too when `split_experts`), `_expert_dims`)."""
    key = stack_name(cfg)
    xdims = _expert_dims(cfg, key, split_experts)
    layers = {"params": params[key]}
    if moe.BIAS in (model_state or {}):
        layers[moe.BIAS] = model_state[moe.BIAS][key]
    layers = jax.tree_util.tree_map(lambda a: _layers_to_stages(a, p, v), layers)
    specs = jax.tree_util.tree_map(
        lambda a, xd: P("pipe", *["expert" if d == xd else None for d in range(1, a.ndim)]), params[key], xdims)
    return key, layers, specs, xdims


def pipeline_grads(cfg: Config, mesh: Mesh, prog: Program, params: Any, batch: dict[str, jax.Array],
                   model_state: dict[str, Any] | None = None) -> tuple[Any, Any, jax.Array]:
    """Mean loss over the batch, gradients (same tree as `params`) and the executed ops.

    `batch` holds int32 [B, T] `inputs` and `targets` (and the other [B, T] keys of
    `jaxsys.model.loss.Batch`); B is split into the schedule's M microbatches. Returns (loss,
    grads, ops_NP) where ops_NP[t, s] is the op code (IDLE/FWD/BWD/WGT) that stage s executed
    at tick t. For an MoE model `model_state` is the train state's ({"moe_bias": ...} or {}),
    the loss is (mean cross-entropy, the `moe_stats` tree averaged over the batch, as
    `jaxsys.model.loss.objective` sows it) and the gradients are those of the objective
    (cross-entropy + the balancing terms). Call inside `jax.jit`; the layout was checked by
    `jaxsys.parallel.layout.check_layout`."""
    mc = cfg.model.resolved()
    sched = prog.schedule
    p, v, m = sched.stages, sched.chunks, sched.microbatches
    sizes = dict(mesh.shape)
    if sizes["pipe"] != p:
        raise ConfigError(f"The schedule has {p} stages but mesh.pipe={sizes['pipe']}.")
    split_experts = bool(mc.moe.num_experts) and expert_lib.used(mesh)
    key, layers, layer_specs, xdims = _stage_layers(cfg, params, model_state, p, v, split_experts)
    shared = {k: x for k, x in params.items() if k != key}
    B, T = batch["inputs"].shape
    batch = dict(batch)
    batch.setdefault("positions", jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    micro_M = {k: split_microbatches(x, m) for k, x in batch.items()}  # each [M, B/M, T]
    c = sizes["context"]
    ways = batch_ways(sizes) * c  # devices that each hold a share of the tokens
    b, t = B // m // (ways // c), T // c  # per device per microbatch
    batch_axes = (*DATA_AXES, "context")

    def local(layers, shared, micro_M):
        st = _Stage(model=Transformer(mc), block=_stage_block(mc, m),
                    act=jax.ShapeDtypeStruct((b, t, mc.embed_dim), jnp.dtype(mc.compute_dtype)),
                    microbatches=m)
        loss, dlayers, dshared, dstats, ops_N = _run_stage(st, prog, layers, shared, micro_M)
        # Each data replica (and context share) holds the gradients of its own tokens' mean
        # loss: average them. The MoE statistics are means over rows: the same average.
        flat = lambda tree: jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), tree)  # noqa: E731
        # An expert weight's gradient is already summed over `expert` (each device owns others).
        dlayers = jax.tree_util.tree_map(
            lambda g, xd: psum_live(g, tuple(a for a in batch_axes if xd < 0 or a != "expert"), sizes),
            flat(dlayers), xdims)
        dstats = psum_live(flat(dstats), batch_axes, sizes)
        dshared = psum_live(dshared, ("pipe", *batch_axes), sizes)
        scale = lambda tree, k=1: jax.tree_util.tree_map(lambda a: a / (ways * k), tree)  # noqa: E731
        loss = psum_live(loss, ("pipe", *batch_axes), sizes) / (m * ways)
        return loss, scale(dlayers), scale(dshared), scale(dstats, m), ops_N[:, None]

    # Manual over pipe AND the batch axes (and context, which splits each row's positions);
    # only `tensor` is left to XLA's partitioner. With the batch axes automatic too, XLA 0.10's
    # SPMD partitioner aborted the process (a CHECK in spmd_partitioner_util) on data × pipe ×
    # tensor. Parameters enter whole over data × fsdp × expert (ZeRO-3 shards are gathered on entry, once
    # per train.grad_accum microbatch) and the gradient sum over the batch axes is an explicit
    # psum. The stages trace with the plain hooks, but for context-parallel attention and, with
    # mesh.expert > 1, the expert-parallel experts: each device gets its X / expert experts
    # (the all-to-all runs over the region's manual `expert` axis).
    in_layers = {k: (layer_specs if k == "params" else P("pipe")) for k in layers}
    with hooks.installed(_stage_hooks(c, split_experts, mesh)):
        run = jax.shard_map(local, mesh=mesh, axis_names={"pipe", *batch_axes}, check_vma=False,
                            in_specs=(in_layers, P(), {k: P(None, DATA_AXES, "context") for k in micro_M}),
                            out_specs=(P(), layer_specs, P(), P("pipe"), P(None, "pipe")))
        loss, dlayers, dshared, stats, ops_NP = run(layers, shared, micro_M)
    grads = dict(dshared)
    grads[key] = jax.tree_util.tree_map(lambda a: _stages_to_layers(a, p, v), dlayers)
    grads = jax.tree_util.tree_map(lambda g, x: g.astype(x.dtype), grads, dict(params))
    if mc.moe.num_experts:
        loss = (loss, {key: jax.tree_util.tree_map(lambda a: _stages_to_layers(a, p, v), stats)})
    return loss, grads, ops_NP
