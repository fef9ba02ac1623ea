"""Pipeline parallelism on the `pipe` mesh axis: one executor for any schedule table.

Shapes: M pipeline microbatches, b rows per microbatch, T sequence, D embed, L layers,
p stages (`pipe`), v chunks per stage (virtual stages), Lc = L / (p·v) layers per chunk,
S stash slots, K ticks.

A table from `pipeline_schedules` becomes static per-tick integer arrays ([K, p]: op, microbatch,
chunk, stash slots; see `Program`). The executor runs inside `jax.shard_map`, manual over `pipe`
and the batch axes (data, fsdp: each device runs its own rows and the gradients are psum'd over
them at the end; `tensor` stays with XLA's partitioner, so it composes with all three), as ONE `lax.scan`
over ticks (compile time flat in M). Each tick, each stage runs its op through `lax.switch`:

- F: the chunk's layers on the microbatch (the first virtual stage embeds the tokens first; the
  last computes head + loss). Each LAYER'S INPUT is kept, in a stash slot [Lc, b, T, D]
  (Lc layers per chunk): layer-boundary checkpoints, like Megatron's full recompute.
- B: back through the layers from the top, recomputing one layer at a time from its stashed
  input with `jax.vjp`, and send the input cotangent to the previous stage.
- W: the same pass with the weight gradients too (ZB-H1 schedules W separately; in the other
  schedules a backward fills 2 ticks, run as B then W, so every tick of every table is executed
  as written and the bubble can be counted from what ran).

After the op, activations move to the next stage and cotangents to the previous one with
`ppermute` (a ring, so interleaved chunks wrap from stage p−1 to stage 0). Arrivals are written
to stash slots chosen statically by interval colouring of each (chunk, microbatch) live range,
from arrival (the first virtual stage: from its F) to its W: 1F1B needs about p slots whatever
M is; GPipe needs M. The workspace of one op is one layer's recompute, whatever Lc is.

Parameters keep the model's tree: stacked layers are split over `pipe` on the layers axis; the
embedding, final norm and head are replicated over `pipe`, used on the first/last stage, and
their gradients are summed over `pipe` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys import model as model_lib
from jaxsys import pipeline_schedules as ps
from jaxsys import sharding as shd
from jaxsys.config import Config, ConfigError

IDLE, FWD, BWD, WGT = 0, 1, 2, 3  # executed op codes, as returned per tick and stage
OP_NAMES = {IDLE: "idle", FWD: "F", BWD: "B", WGT: "W"}
_MID, _FIRST, _LAST = 0, 1, 2  # role of a virtual stage: inner, embeds the tokens, computes the loss


@dataclass(frozen=True)
class Program:
    """A schedule as static integer arrays, each [K ticks, p stages]."""

    schedule: ps.Schedule
    op: np.ndarray  # IDLE / FWD / BWD / WGT
    mb: np.ndarray  # microbatch of the op
    chunk: np.ndarray  # chunk (virtual stage c·p + s) of the op
    x_slot: np.ndarray  # stash slot holding the op's input activation
    g_slot: np.ndarray  # stash slot holding the op's output cotangent
    recv_x: np.ndarray  # slot to write the activation arriving at the start of the tick
    recv_g: np.ndarray  # slot to write the cotangent arriving at the start of the tick
    x_slots: int  # S for activations (slot index S is a write-only trash slot)
    g_slots: int  # S for cotangents

    @property
    def ticks(self) -> int:
        return self.op.shape[0]


def _colour(intervals: list[tuple[int, int, Any]]) -> tuple[dict[Any, int], int]:
    """Greedy interval colouring: slot per key, live [start, end] inclusive; and the slot count."""
    free_at: list[int] = []  # per slot, the first tick it may be written again
    slots = {}
    for start, end, key in sorted(intervals, key=lambda x: x[:2]):
        slot = next((i for i, f in enumerate(free_at) if f <= start), len(free_at))
        if slot == len(free_at):
            free_at.append(0)
        free_at[slot] = end + 1
        slots[key] = slot
    return slots, len(free_at)


def compile_schedule(sched: ps.Schedule) -> Program:
    """Static per-tick arrays for `sched` (validated with `pipeline_schedules.check`)."""
    ps.check(sched)
    p, v, table = sched.stages, sched.chunks, sched.table
    K, last = len(table), p * v - 1
    arr = {k: np.zeros((K, p), np.int32) for k in ("op", "mb", "chunk")}
    w_tick: dict[tuple[int, int, int], int] = {}  # (stage, chunk, mb) -> tick of its W
    x_live, g_live = [[] for _ in range(p)], [[] for _ in range(p)]  # arrivals: (tick, chunk, mb)
    x_first = [[] for _ in range(p)]  # the first virtual stage's F: a slot from F, no arrival
    for t, row in enumerate(table):
        for s, op in enumerate(row):
            if op is None:
                continue
            kind = {"F": FWD, "B": BWD, "W": WGT}[op.kind]
            if op.kind == "B" and not sched.split_backward and t > 0 and table[t - 1][s] == op:
                kind = WGT  # second tick of a 2-tick backward: its weight-gradient half
            arr["op"][t, s], arr["mb"][t, s], arr["chunk"][t, s] = kind, op.mb, op.chunk
            vs = op.chunk * p + s
            if kind == WGT:
                w_tick[(s, op.chunk, op.mb)] = t
            if kind == FWD and vs == 0:  # embeds its tokens: its layer inputs live from here
                x_first[s].append((t, op.chunk, op.mb))
            if kind == FWD and vs < last:  # output arrives at virtual stage vs+1 next tick
                x_live[(vs + 1) % p].append((t + 1, (vs + 1) // p, op.mb))
            if kind == BWD and vs > 0:  # input cotangent arrives at virtual stage vs−1
                g_live[(vs - 1) % p].append((t + 1, (vs - 1) // p, op.mb))
    slots = []
    for live in ([a + f for a, f in zip(x_live, x_first)], g_live):
        per_stage = [_colour([(t, w_tick[(s, c, i)], (c, i)) for t, c, i in live[s]]) for s in range(p)]
        slots.append(([sl for sl, _ in per_stage], max([n for _, n in per_stage] + [1])))
    (x_of, nx), (g_of, ng) = slots
    prog = {k: np.zeros((K, p), np.int32) for k in ("x_slot", "g_slot")}
    prog["recv_x"], prog["recv_g"] = np.full((K, p), nx, np.int32), np.full((K, p), ng, np.int32)
    for s in range(p):
        for t, c, i in x_live[s]:
            prog["recv_x"][t, s] = x_of[s][(c, i)]
        for t, c, i in g_live[s]:
            prog["recv_g"][t, s] = g_of[s][(c, i)]
        for t in range(K):
            if arr["op"][t, s] != IDLE:
                key = (int(arr["chunk"][t, s]), int(arr["mb"][t, s]))
                prog["x_slot"][t, s] = x_of[s].get(key, 0)
                prog["g_slot"][t, s] = g_of[s].get(key, 0)
    return Program(sched, **arr, **prog, x_slots=nx, g_slots=ng)


def make_schedule(cfg: Config, p: int) -> ps.Schedule:
    """The configured schedule table for p stages."""
    pl = cfg.pipeline
    m = pl.microbatches or p
    try:
        if pl.schedule == "interleaved-1f1b":
            return ps.interleaved_1f1b(p, m, pl.virtual_stages)
        return ps.SCHEDULES[pl.schedule](p, m)
    except ps.ScheduleError as e:
        raise ConfigError(f"pipeline.schedule={pl.schedule}: {e}") from None


def check_config(cfg: Config, mesh: Mesh) -> None:
    """Raise `ConfigError` for a pipeline that cannot run on `mesh` (before any compile)."""
    sizes = dict(mesh.shape)
    p = sizes["pipe"]
    m = cfg.pipeline.microbatches or p
    rows = cfg.train.batch_size // cfg.train.microbatches // m
    ways = sizes["data"] * sizes["fsdp"]
    if rows % ways:
        raise ConfigError(
            f"A pipeline microbatch of {rows} sequences (train.batch_size={cfg.train.batch_size} / "
            f"train.microbatches={cfg.train.microbatches} / pipeline.microbatches={m}) is not divisible "
            f"by data × fsdp = {ways}; use a train.batch_size that is a multiple of "
            f"{ways * m * cfg.train.microbatches}.")
    make_schedule(cfg, p)


def _layers_to_stages(a: jax.Array, p: int, v: int) -> jax.Array:
    """[L, ...] natural order -> order where stage s's rows are its chunks c·p+s, c < v."""
    return a.reshape(v, p, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def _stages_to_layers(a: jax.Array, p: int, v: int) -> jax.Array:
    return a.reshape(p, v, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def split_microbatches(x_BT: jax.Array, m: int) -> jax.Array:
    """[B, T] -> [M, B/M, T], microbatch i = rows i, i+M, ... (each keeps its data sharding)."""
    return x_BT.reshape(x_BT.shape[0] // m, m, *x_BT.shape[1:]).swapaxes(0, 1)


def loss_and_grads(cfg: Config, mesh: Mesh, prog: Program, params: Any,
                   batch: dict[str, jax.Array]) -> tuple[jax.Array, Any, jax.Array]:
    """Mean loss over the batch, gradients (same tree as `params`) and the executed ops.

    `batch` holds int32 [B, T] `inputs` and `targets`; B is split into the schedule's M
    microbatches. Returns (loss, grads, ops_KS) where ops_KS[t, s] is the op code
    (IDLE/FWD/BWD/WGT) that stage s executed at tick t. Call inside `jax.jit`."""
    check_config(cfg, mesh)
    mc = cfg.model
    sched = prog.schedule
    p, v, m = sched.stages, sched.chunks, sched.microbatches
    if dict(mesh.shape)["pipe"] != p:
        raise ConfigError(f"The schedule has {p} stages but mesh.pipe={dict(mesh.shape)['pipe']}.")
    last_vs = p * v - 1
    layers = jax.tree_util.tree_map(lambda a: _layers_to_stages(a, p, v), params["layers"])
    shared = {k: x for k, x in params.items() if k != "layers"}
    tokens_MbT = split_microbatches(batch["inputs"], m)
    targets_MbT = split_microbatches(batch["targets"], m)
    ways = dict(mesh.shape)["data"] * dict(mesh.shape)["fsdp"]
    b, T = tokens_MbT.shape[1] // ways, tokens_MbT.shape[2]  # rows per device per microbatch
    act = jax.ShapeDtypeStruct((b, T, mc.embed_dim), jnp.dtype(mc.compute_dtype))
    Lc = mc.num_layers // (p * v)  # layers per chunk (virtual stage)
    tables = tuple(jnp.asarray(getattr(prog, k)) for k in
                   ("op", "mb", "chunk", "x_slot", "g_slot", "recv_x", "recv_g"))
    positions_bT = jnp.broadcast_to(jnp.arange(T), (b, T))
    f32_zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
    zero_x = lambda: jnp.zeros(act.shape, act.dtype)  # noqa: E731

    def block(layer: Any, x_bTD: jax.Array) -> jax.Array:
        """One transformer block of the model, with its remat policy: [b, T, D] -> [b, T, D]."""
        return model_lib.Block(mc).apply({"params": layer}, x_bTD, positions_bT)[0]

    if mc.remat != "none":
        block = jax.checkpoint(block, policy=model_lib.REMAT_POLICIES[mc.remat])

    def forward_layers(lp: Any, x_bTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The chunk's Lc layers: (output [b, T, D], each layer's input [Lc, b, T, D])."""
        return jax.lax.scan(lambda x, layer: (block(layer, x), x), x_bTD, lp)

    def backward_layers(lp: Any, inputs_LbTD: jax.Array, g_bTD: jax.Array,
                        weights: bool) -> tuple[jax.Array, Any]:
        """Cotangent at the chunk's output -> cotangent at its input (and the layer gradients,
        stacked like `lp`, when `weights`), recomputing one layer at a time from its stashed
        input."""
        def step(g, xs):
            layer, x = xs
            if weights:
                dlayer, dx = jax.vjp(block, layer, x)[1](g)
                return dx, dlayer
            return jax.vjp(lambda x_: block(layer, x_), x)[1](g)[0], None
        g_bTD, dlp = jax.lax.scan(step, g_bTD, (lp, inputs_LbTD), reverse=True)
        return g_bTD, dlp

    def loss_of(sp: Any, y_bTD: jax.Array, tgt_bT: jax.Array) -> jax.Array:
        from jaxsys.train_step import cross_entropy  # train_step imports this module
        return cross_entropy(model_lib.head(mc, sp, y_bTD), tgt_bT)

    def top_cotangent(lp: Any, sp: Any, inputs_LbTD: jax.Array, tgt_bT: jax.Array) -> tuple[jax.Array, Any]:
        """The last virtual stage: d(loss / m) at its output (its last layer recomputed), and the
        final norm's and head's gradients."""
        y_bTD = block(jax.tree_util.tree_map(lambda a: a[-1], lp), inputs_LbTD[-1])
        _, vjp = jax.vjp(lambda y, sp_: loss_of(sp_, y, tgt_bT), y_bTD, sp)
        return vjp(jnp.asarray(1.0 / m, jnp.float32))  # the loss is the mean over microbatches

    def branches(lp0: Any, sp0: Any) -> list:
        """Per op and role: (lp, sp, stash entry [Lc, b, T, D], cotangent in, tokens, targets) ->
        (activation out, cotangent out, stash entry out, layer grads, shared grads, loss)."""
        zeros_lp = lambda: jax.tree_util.tree_map(jnp.zeros_like, lp0)  # noqa: E731
        zeros_sp = lambda: jax.tree_util.tree_map(jnp.zeros_like, sp0)  # noqa: E731

        def idle(lp, sp, entry, g, tok, tgt):
            return zero_x(), zero_x(), entry, zeros_lp(), zeros_sp(), f32_zero()

        def fwd(role):
            def run(lp, sp, entry, g, tok, tgt):
                x = model_lib.embed(mc, sp, tok) if role == _FIRST else entry[0]
                y, inputs = forward_layers(lp, x)  # the stash keeps every layer's input
                if role == _LAST:
                    return zero_x(), zero_x(), inputs, zeros_lp(), zeros_sp(), loss_of(sp, y, tgt).astype(jnp.float32)
                return y, zero_x(), inputs, zeros_lp(), zeros_sp(), f32_zero()
            return run

        def bwd(role):
            def run(lp, sp, entry, g, tok, tgt):
                if role == _FIRST:  # tokens have no cotangent: all of its work is in W
                    return zero_x(), zero_x(), entry, zeros_lp(), zeros_sp(), f32_zero()
                g_top = top_cotangent(lp, sp, entry, tgt)[0] if role == _LAST else g
                dx, _ = backward_layers(lp, entry, g_top, weights=False)
                return zero_x(), dx, entry, zeros_lp(), zeros_sp(), f32_zero()
            return run

        def wgt(role):
            def run(lp, sp, entry, g, tok, tgt):
                g_top, dsp = top_cotangent(lp, sp, entry, tgt) if role == _LAST else (g, zeros_sp())
                dx, dlp = backward_layers(lp, entry, g_top, weights=True)
                if role == _FIRST:  # the embedding's gradient, from the cotangent at layer 0
                    dsp = jax.vjp(lambda sp_: model_lib.embed(mc, sp_, tok), sp)[1](dx)[0]
                return zero_x(), zero_x(), entry, dlp, dsp, f32_zero()
            return run

        return [idle] + [make(r) for make in (fwd, bwd, wgt) for r in (_MID, _FIRST, _LAST)]

    def local(layers, shared, tokens_MbT, targets_MbT):
        s = jax.lax.axis_index("pipe")
        layers = jax.tree_util.tree_map(lambda a: a.reshape(v, -1, *a.shape[1:]), layers)
        f32 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731

        def tick(carry, row):
            xbuf, gbuf, x_in, g_in, dlayers, dshared, loss = carry
            op, mb, c, xs, gs, rx, rg = (a[s] for a in row)
            # An arriving activation is the input of the chunk's first layer.
            xbuf = jax.lax.dynamic_update_slice(xbuf, x_in[None, None], (rx, 0, 0, 0, 0))
            gbuf = jax.lax.dynamic_update_index_in_dim(gbuf, g_in, rg, 0)
            vs = c * p + s
            role = jnp.where(vs == 0, _FIRST, jnp.where(vs == last_vs, _LAST, _MID))
            branch = jnp.where(op == IDLE, 0, 1 + 3 * (op - 1) + role)
            lp = jax.tree_util.tree_map(lambda a: a[c], layers)
            x_out, g_out, entry, dlp, dsp, dloss = jax.lax.switch(
                branch, branches(lp, shared), lp, shared, xbuf[xs], gbuf[gs], tokens_MbT[mb],
                targets_MbT[mb])
            xbuf = jax.lax.dynamic_update_index_in_dim(xbuf, entry, xs, 0)  # F wrote its layers' inputs
            dlayers = jax.tree_util.tree_map(lambda a, d: a.at[c].add(d.astype(jnp.float32)), dlayers, dlp)
            dshared = jax.tree_util.tree_map(lambda a, d: a + d.astype(jnp.float32), dshared, dsp)
            x_next = jax.lax.ppermute(x_out, "pipe", [(i, (i + 1) % p) for i in range(p)])
            g_prev = jax.lax.ppermute(g_out, "pipe", [(i, (i - 1) % p) for i in range(p)])
            return (xbuf, gbuf, x_next, g_prev, dlayers, dshared, loss + dloss), op

        carry = (jnp.zeros((prog.x_slots + 1, Lc, *act.shape), act.dtype),
                 jnp.zeros((prog.g_slots + 1, *act.shape), act.dtype), zero_x(), zero_x(),
                 f32(layers), f32(shared), jnp.zeros((), jnp.float32))
        (_, _, _, _, dlayers, dshared, loss), ops_K = jax.lax.scan(tick, carry, tables)
        # Each data replica holds the gradients of its own rows' mean loss: average them. (Only
        # over axes of size > 1, as in jaxsys.data_parallel.)
        def psum(x, axes):
            live = tuple(a for a in axes if dict(mesh.shape)[a] > 1)
            return jax.lax.psum(x, live) if live else x

        dlayers = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), dlayers)
        dlayers = psum(dlayers, shd.DATA_AXES)
        dshared = psum(dshared, ("pipe", *shd.DATA_AXES))
        scale = lambda tree: jax.tree_util.tree_map(lambda a: a / ways, tree)  # noqa: E731
        loss = psum(loss, ("pipe", *shd.DATA_AXES)) / (m * ways)
        return loss, scale(dlayers), scale(dshared), ops_K[:, None]

    # Manual over pipe AND the batch axes; only `tensor` is left to XLA's partitioner. With the
    # batch axes automatic too, XLA 0.10's SPMD partitioner aborted the process (a CHECK in
    # spmd_partitioner_util) on data × pipe × tensor. Parameters enter whole over data × fsdp
    # (ZeRO-3 shards are gathered on entry, once per train.microbatches microbatch) and the
    # gradient sum over the batch axes is an explicit psum.
    with shd.activation_sharding_off():
        run = jax.shard_map(local, mesh=mesh, axis_names={"pipe", *shd.DATA_AXES}, check_vma=False,
                            in_specs=(P("pipe"), P(), P(None, shd.DATA_AXES), P(None, shd.DATA_AXES)),
                            out_specs=(P(), P("pipe"), P(), P(None, "pipe")))
        loss, dlayers, dshared, ops_KS = run(layers, shared, tokens_MbT, targets_MbT)
    grads = dict(dshared)
    grads["layers"] = jax.tree_util.tree_map(lambda a: _stages_to_layers(a, p, v), dlayers)
    grads = jax.tree_util.tree_map(lambda g, x: g.astype(x.dtype), grads, dict(params))
    return loss, grads, ops_KS


def executed_bubble(ops_KS: np.ndarray) -> float:
    """Idle stage-ticks over all stage-ticks of an executed op table."""
    ops_KS = np.asarray(ops_KS)
    return float(np.mean(ops_KS == IDLE))
