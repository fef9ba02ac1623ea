"""Collectives read from a compiled program's optimized HLO (`compiled.as_text()`).

Each collective instruction (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute, and their async `-start` forms) becomes a `Collective`: its kind, the mesh
axes its replica groups span (groups of logical device ids mapped back to mesh coordinates),
its per-device payload and how many times it runs per step. An instruction inside a `while`
body (a `scan` over layers or microbatches) runs once per iteration: its count is multiplied by
the loop's `known_trip_count` (1, flagged `trip_count_known=False`, if XLA did not record one).
XLA's combiner merges independent collectives into one tuple-shaped instruction; such an
instruction is split back into one `Collective` per tuple element (`combined` > 1), so that
counts and bytes are per logical tensor.

Bytes: `payload_bytes` is the full buffer one device holds before or after the op (all-reduce:
the buffer; all-gather: the gathered result; reduce-scatter: the unreduced input; all-to-all
and collective-permute: the buffer sent). `wire_bytes` is what each device sends with a ring
algorithm over a group of n: 2(n−1)/n × payload for all-reduce, (n−1)/n × payload for
all-gather, reduce-scatter and all-to-all, payload for collective-permute. An all-reduce equals
a reduce-scatter plus an all-gather in wire bytes (the identity sequence parallelism uses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from jax.sharding import Mesh

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclass(frozen=True)
class Collective:
    """One logical collective of the compiled step, per device."""

    kind: str  # one of KINDS
    axes: tuple[str, ...]  # mesh axes spanned by its groups, in mesh order; () = none
    group_size: int
    shape: str  # e.g. "f32[8,16,32]"
    payload_bytes: int
    count: int  # executions per step
    name: str  # the HLO instruction
    op_name: str  # the JAX operation it came from (HLO metadata), may be ""
    combined: int = 1  # tensors sharing the HLO instruction (XLA's collective combiner)
    trip_count_known: bool = True

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with a ring algorithm."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2.0 * (n - 1) / n * self.payload_bytes
        if self.kind == "collective-permute":
            return float(self.payload_bytes)
        return (n - 1) / n * self.payload_bytes


def _arrays(shape_text: str) -> list[tuple[str, int]]:
    """[(shape string, bytes)] of every array in an HLO shape (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append((f"{dtype}[{dims}]", n * _DTYPE_BYTES[dtype]))
    return out


def _balanced(text: str, start: int, open_ch: str = "{", close_ch: str = "}") -> str:
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == open_ch
        depth -= text[i] == close_ch
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return ids.reshape(-1)


def _groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Replica groups as lists of logical device ids, from any of XLA's three spellings."""
    i = attrs.find("replica_groups=")
    if i < 0:
        return [list(range(num_devices))]
    text = attrs[i + len("replica_groups="):]
    if text.startswith("{"):  # explicit: {{0,1},{2,3}}; {} means every device
        body = _balanced(text, 0)
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        return [g for g in groups if g] or [list(range(num_devices))]
    m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:  # iota: [G,S]<=[dims]T(perm)
        return _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?(?:\s*\{([^}]*)\})?", text)
    if m:  # mesh form: mesh['a'=2,'b'=4], device_ids=([..]T(..)) {'a'}: groups span the named axes
        names = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        sizes = [int(s) for _, s in names]
        ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(int(np.prod(sizes)))
        ids = ids.reshape(sizes)
        reduced = re.findall(r"'([^']+)'", m.group(4) or "") or [n for n, _ in names]
        axis_idx = [k for k, (n, _) in enumerate(names) if n in reduced]
        keep = [k for k in range(len(names)) if k not in axis_idx]
        size = int(np.prod([sizes[k] for k in axis_idx]))
        return ids.transpose(keep + axis_idx).reshape(-1, size).tolist()
    raise ValueError(f"Unrecognised replica_groups in HLO: {text[:80]!r}")


def mesh_axes_of(groups: Sequence[Sequence[int]], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the devices of each group differ (partition id = position in
    the flattened mesh, the device order `jit` compiles for)."""
    shape = mesh.devices.shape
    varying: set[int] = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.asarray(g), shape))  # [ndim, len(g)]
        varying |= {d for d in range(len(shape)) if len(set(coords[d])) > 1}
    return tuple(mesh.axis_names[d] for d in sorted(varying))


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], set[str]]:
    """How many times each computation runs per call of the entry; and the computations under
    a loop whose trip count XLA did not record."""
    mult: dict[str, int] = {entry: 1}
    unknown: set[str] = set()
    stack = [entry]
    while stack:
        comp = stack.pop()
        for line in comps.get(comp, ()):
            callees: list[tuple[str, int, bool]] = []
            m = re.search(r"body=%?([\w.\-]+)", line)
            if m and " while(" in line:
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trip.group(1)) if trip else 1
                callees.append((m.group(1), n, trip is not None))
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                if cond:
                    callees.append((cond.group(1), n + 1, trip is not None))
            for key in ("calls", "true_computation", "false_computation"):
                for c in re.findall(rf"\b{key}=%?([\w.\-]+)", line):
                    callees.append((c, 1, True))
            m = re.search(r"to_apply=%?([\w.\-]+)", line)
            if m and " call(" in line:  # unoptimized HLO (`Lowered.as_text("hlo")`): shard_map bodies
                callees.append((m.group(1), 1, True))
            b = re.search(r"branch_computations=\{([^}]*)\}", line)
            if b:  # one branch runs per execution; counting each once is an upper bound
                callees += [(c.strip().lstrip("%"), 1, True) for c in b.group(1).split(",")]
            for callee, n, known in callees:
                if callee not in comps:
                    continue
                mult[callee] = mult.get(callee, 0) + mult[comp] * n
                if not known or comp in unknown:
                    unknown.add(callee)
                stack.append(callee)
    return mult, unknown


def collectives(hlo: str, mesh: Mesh) -> list[Collective]:
    """Every collective in `hlo` (optimized HLO text of a program compiled for `mesh`, or the
    program as JAX lowered it, `Lowered.as_text("hlo")`: what it asks for before the backend's
    passes, e.g. XLA:CPU's promotion of 16-bit reductions to float32)."""
    comps, entry = _computations(hlo)
    mult, unknown = _multipliers(comps, entry)
    n_dev = mesh.devices.size
    out = []
    for comp, lines in comps.items():
        if comp not in mult:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape_text, opcode, rest = m.groups()
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            op = re.search(r'op_name="([^"]*)"', rest)
            if kind == "collective-permute":
                pairs = re.findall(r"\{(\d+),(\d+)\}", rest[rest.find("source_target_pairs="):])
                groups = [[int(a), int(b)] for a, b in pairs] or [[0]]
                size = 2
            else:
                groups = _groups(rest, n_dev)
                size = len(groups[0])
            axes = mesh_axes_of(groups, mesh)
            arrays = _arrays(shape_text)
            if opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
                arrays = arrays[len(arrays) // 2:len(arrays) // 2 + 1] if kind == "all-gather" else arrays[:1]
            for shape, nbytes in arrays:
                payload = nbytes * size if kind == "reduce-scatter" else nbytes
                out.append(Collective(kind, axes, size, shape, payload, mult[comp], name,
                                      op.group(1) if op else "", len(arrays), comp not in unknown))
    return out


def summarize(colls: Iterable[Collective]) -> dict[tuple[str, tuple[str, ...]], dict[str, float]]:
    """Per (kind, axes): tensors per step, payload bytes per step, wire bytes per step."""
    table: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
    for c in colls:
        row = table.setdefault((c.kind, c.axes), {"count": 0, "payload_bytes": 0.0, "wire_bytes": 0.0})
        row["count"] += c.count
        row["payload_bytes"] += c.payload_bytes * c.count
        row["wire_bytes"] += c.wire_bytes * c.count
    return dict(sorted(table.items()))
