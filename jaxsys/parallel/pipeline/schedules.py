"""Pipeline schedules as data: tables of which operation each stage runs at each tick.

A schedule for p stages, m microbatches and v chunks per stage (virtual stages) is a table
`ticks × stages` whose entries are `Op`s or None (idle). Chunk c of stage s holds virtual stage
c·p + s (Megatron's interleaving). Durations are in ticks: forward F = 1; a full backward
B = 2; with the backward split (zero-bubble), input-gradient B = 1 and weight-gradient W = 1.
An op of duration d fills d consecutive ticks of its stage.

Schedules are produced by simulating each stage's program order against the dependencies, so
every table is as tight as its order allows; `check` validates any table, hand-written ones
included. These are pure Python: the executor that runs a table on devices is separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple


class Op(NamedTuple):
    kind: str  # "F" forward, "B" backward (input gradient only when split), "W" weight gradient
    mb: int  # microbatch
    chunk: int = 0  # virtual-stage chunk on this stage


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    microbatches: int
    chunks: int
    split_backward: bool
    table: tuple[tuple[Op | None, ...], ...]  # [tick][stage]

    def duration(self, kind: str) -> int:
        return {"F": 1, "B": 1 if self.split_backward else 2, "W": 1}[kind]

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks of the table."""
        idle = sum(op is None for tick in self.table for op in tick)
        return idle / (len(self.table) * self.stages)


class ScheduleError(ValueError):
    """A schedule table that cannot run: the message names the op and the broken rule."""


def _deps(op: Op, stage: int, p: int, v: int, split: bool) -> list[tuple[int, Op]]:
    """(stage, op) pairs that must finish before `op` starts on `stage`."""
    vs = op.chunk * p + stage
    last = p * v - 1
    prev = ((vs - 1) % p, Op(op.kind, op.mb, (vs - 1) // p))
    nxt = ((vs + 1) % p, Op("B", op.mb, (vs + 1) // p))
    if op.kind == "F":
        return [prev] if vs > 0 else []
    if op.kind == "B":
        return [(stage, Op("F", op.mb, op.chunk))] + ([nxt] if vs < last else [])
    return [(stage, Op("B", op.mb, op.chunk))]


def _simulate(name: str, p: int, m: int, v: int, split: bool,
              programs: list[list[Op]]) -> Schedule:
    """Run each stage's ops in program order, each as soon as its dependencies are done."""
    dur = {"F": 1, "B": 1 if split else 2, "W": 1}
    finish: dict[tuple[int, Op], int] = {}
    free_at = [0] * p
    pos = [0] * p
    runs: list[list[tuple[int, Op]]] = [[] for _ in range(p)]
    total = sum(len(prog) for prog in programs)
    while len(finish) < total:
        progressed = False
        for s in range(p):
            if pos[s] == len(programs[s]):
                continue
            op = programs[s][pos[s]]
            deps = _deps(op, s, p, v, split)
            if all(d in finish for d in deps):
                start = max([free_at[s]] + [finish[d] for d in deps])
                finish[(s, op)] = free_at[s] = start + dur[op.kind]
                runs[s].append((start, op))
                pos[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: programs[s][pos[s]] for s in range(p) if pos[s] < len(programs[s])}
            raise ScheduleError(f"{name}: program order deadlocks at {stuck}")
    length = max(free_at)
    table = [[None] * p for _ in range(length)]
    for s, stage_runs in enumerate(runs):
        for start, op in stage_runs:
            for t in range(start, start + dur[op.kind]):
                table[t][s] = op
    return Schedule(name, p, m, v, split, tuple(tuple(row) for row in table))


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (activations of all m microbatches alive at once)."""
    prog = [Op("F", i) for i in range(m)] + [Op("B", i) for i in range(m)]
    return _simulate("gpipe", p, m, 1, False, [list(prog) for _ in range(p)])


def _one_f_one_b_order(fwd: list[Op], bwd: list[Op], warm: int) -> list[Op]:
    """`warm` forwards, then alternate one forward and one backward, then the rest backward."""
    steady = len(fwd) - warm
    prog = fwd[:warm]
    for k in range(steady):
        prog += [fwd[warm + k], bwd[k]]
    return prog + bwd[steady:]


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush): p−s−1 warm-up forwards on stage s, then alternate F and B, so at
    most p−s microbatches' activations are alive on stage s, whatever m is."""
    if m < p:
        raise ScheduleError(f"1F1B needs microbatches ≥ stages, got m={m} < p={p}.")
    fwd, bwd = [Op("F", i) for i in range(m)], [Op("B", i) for i in range(m)]
    programs = [_one_f_one_b_order(fwd, bwd, p - s - 1) for s in range(p)]
    return _simulate("1f1b", p, m, 1, False, programs)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron's interleaved 1F1B: v chunks per stage, microbatches taken in groups of p."""
    if v < 2:
        raise ScheduleError(f"interleaved 1F1B needs v ≥ 2 chunks per stage, got v={v}.")
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs microbatches divisible by stages, got m={m}, p={p}.")
    fwd = [Op("F", g * p + i, c) for g in range(m // p) for c in range(v) for i in range(p)]
    bwd = [Op("B", g * p + i, c) for g in range(m // p) for c in reversed(range(v)) for i in range(p)]
    programs = [_one_f_one_b_order(fwd, bwd, min((p - s - 1) * 2 + (v - 1) * p, m * v))
                for s in range(p)]
    return _simulate("interleaved-1f1b", p, m, v, False, programs)


def zb_h1(p: int, m: int) -> Schedule:
    """Zero-bubble ZB-H1 order: 1F1B with the backward split into B (input gradient, on the
    critical path) and W (weight gradient), each W deferred so it fills what would be idle
    time; activation memory stays at 1F1B's bound of p−s microbatches on stage s."""
    if m < p:
        raise ScheduleError(f"ZB-H1 needs microbatches ≥ stages, got m={m} < p={p}.")
    fwd, bwd = [Op("F", i) for i in range(m)], [Op("B", i) for i in range(m)]
    programs = []
    for s in range(p):
        prog, next_w = [], 0
        for op in _one_f_one_b_order(fwd, bwd, p - s - 1):
            prog.append(op)
            if op.kind == "B" and next_w <= op.mb - s:  # stage s lags its W by s microbatches
                prog.append(Op("W", next_w))
                next_w += 1
        programs.append(prog + [Op("W", i) for i in range(next_w, m)])
    return _simulate("zb-h1", p, m, 1, True, programs)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_1f1b, "zb-h1": zb_h1}


def check(sched: Schedule) -> None:
    """Raise `ScheduleError` unless every op runs exactly once, for its full duration, after
    all of its dependencies have finished."""
    p, m, v, split = sched.stages, sched.microbatches, sched.chunks, sched.split_backward
    kinds = ("F", "B", "W") if split else ("F", "B")
    spans: dict[tuple[int, Op], list[int]] = {}
    for t, row in enumerate(sched.table):
        if len(row) != p:
            raise ScheduleError(f"tick {t} has {len(row)} entries for {p} stages")
        for s, op in enumerate(row):
            if op is not None:
                spans.setdefault((s, op), []).append(t)
    finish = {}
    for (s, op), ticks in spans.items():
        d = sched.duration(op.kind)
        if op.kind not in kinds or not (0 <= op.mb < m and 0 <= op.chunk < v):
            raise ScheduleError(f"stage {s}: unexpected op {op}")
        if len(ticks) != d or ticks != list(range(ticks[0], ticks[0] + d)):
            raise ScheduleError(f"stage {s}: {op} runs at ticks {ticks}, expected {d} consecutive "
                                "ticks once")
        finish[(s, op)] = ticks[-1] + 1
    for s in range(p):
        for kind in kinds:
            for i in range(m):
                for c in range(v):
                    if (s, Op(kind, i, c)) not in spans:
                        raise ScheduleError(f"stage {s}: {Op(kind, i, c)} is missing")
    for (s, op), ticks in spans.items():
        for dep in _deps(op, s, p, v, split):
            if finish[dep] > ticks[0]:
                raise ScheduleError(f"stage {s}: {op} starts at tick {ticks[0]} before {dep[1]} on "
                                    f"stage {dep[0]} finishes at tick {finish[dep]}")


def peak_in_flight(sched: Schedule) -> list[int]:
    """Per stage, the most microbatch-chunks whose forward ran but whose backward (B) has not
    finished: the activations that stage must hold at once."""
    peaks = []
    for s in range(sched.stages):
        alive, peak, seen = 0, 0, set()
        for row in sched.table:
            op = row[s]
            if op is None or op in seen:
                continue
            seen.add(op)
            if op.kind == "F":
                alive += 1
            elif op.kind == "B":
                alive -= 1
            peak = max(peak, alive)
        peaks.append(peak)
    return peaks
