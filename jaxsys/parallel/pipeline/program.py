"""A pipeline schedule table compiled to static per-tick integer arrays for the executor.

`compile_schedule` turns a `schedules.Schedule` into a `Program`: per tick and stage, the op
code (idle / F / B / W), its microbatch and chunk, and the stash slots of its input activation
and output cotangent. Slots are chosen by interval colouring of each (chunk, microbatch) live
range, from arrival (the first virtual stage: from its F) to its W: 1F1B needs about P slots
whatever M is; GPipe needs M.

Shapes (`jaxsys.model.axes`): N ticks, P stages, Z stash slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxsys.config import Config, ConfigError
from jaxsys.parallel.pipeline import schedules as ps

IDLE, FWD, BWD, WGT = 0, 1, 2, 3  # executed op codes, as returned per tick and stage
OP_NAMES = {IDLE: "idle", FWD: "F", BWD: "B", WGT: "W"}
_MID, _FIRST, _LAST = 0, 1, 2  # role of a virtual stage: inner, embeds the tokens, computes the loss


@dataclass(frozen=True)
class Program:
    """A schedule as static integer arrays, each [N ticks, P stages]."""

    schedule: ps.Schedule
    op: np.ndarray  # IDLE / FWD / BWD / WGT
    mb: np.ndarray  # microbatch of the op
    chunk: np.ndarray  # chunk (virtual stage c·p + s) of the op
    x_slot: np.ndarray  # stash slot holding the op's input activation
    g_slot: np.ndarray  # stash slot holding the op's output cotangent
    recv_x: np.ndarray  # slot to write the activation arriving at the start of the tick
    recv_g: np.ndarray  # slot to write the cotangent arriving at the start of the tick
    x_slots: int  # Z for activations (slot index Z is a write-only trash slot)
    g_slots: int  # Z for cotangents

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
    """Static per-tick arrays for `sched` (validated with `schedules.check`)."""
    ps.check(sched)
    p, v, table = sched.stages, sched.chunks, sched.table
    N, last = len(table), p * v - 1
    arr = {k: np.zeros((N, p), np.int32) for k in ("op", "mb", "chunk")}
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
    prog = {k: np.zeros((N, p), np.int32) for k in ("x_slot", "g_slot")}
    prog["recv_x"], prog["recv_g"] = np.full((N, p), nx, np.int32), np.full((N, p), ng, np.int32)
    for s in range(p):
        for t, c, i in x_live[s]:
            prog["recv_x"][t, s] = x_of[s][(c, i)]
        for t, c, i in g_live[s]:
            prog["recv_g"][t, s] = g_of[s][(c, i)]
        for t in range(N):
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


def executed_bubble(ops_NP: np.ndarray) -> float:
    """Idle stage-ticks over all stage-ticks of an executed op table."""
    ops_NP = np.asarray(ops_NP)
    return float(np.mean(ops_NP == IDLE))
