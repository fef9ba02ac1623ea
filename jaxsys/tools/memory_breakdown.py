"""Where a compiled step's temporaries go: the buffers XLA keeps live at its memory peak, by kind.

`memory_analysis().temp_size_in_bytes` is one number. XLA's buffer assignment knows more: its
live-range dump (`*-live-range.txt`, written when a compile is asked for `dump_options(dir)`)
lists every buffer live at the peak of the heap simulation with its size; the optimized HLO
(`compiled.as_text()`) gives each buffer's shape and the `op_name` JAX's name stack left on it
(`jvp(Transformer)/.../layer_3/attn/div`, `transpose(jvp(...))` for the backward). `breakdown`
sorts the live buffers into the kinds the planner's formula names:

    arguments        the step's inputs (parameters, optimizer state, batch): not temporaries
    logits           [b, T, V/t] float32 logits and their gradient (any buffer with a vocabulary
                     axis and no embedding axis): what the tiled loss (`model.loss_vocab_tiles`) cuts
    attention        [b, H/t, T, T]-shaped: saved scores / probabilities
    attention other  q, k, v and attention outputs
    mlp              MLP hidden activations [b, T, F/t]
    gathered weights the outputs of all-gathers of weights (ZeRO-3 / fsdp `use_weight`)
    weight-shaped    buffers of a parameter's (local) size outside the forward pass:
                     gradients, the optimizer's update
    other forward    the rest of the forward (residual stream, norms, embeddings)
    other backward   the rest of the backward (`transpose(...)` in the name stack)
    other            anything else (loss, optimizer scalars, fusion outputs without a name)

Sizes are bytes per device. The live buffers' sum exceeds `temp_size_in_bytes` by the
arguments (which the live range counts) and falls short of it by the heap's fragmentation.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any

KINDS = ("logits", "attention", "attention other", "mlp", "gathered weights", "weight-shaped",
         "other forward", "other backward", "other")

_LIVE = re.compile(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\([^=]*\)|\S+) (\S+?)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_DIMS = re.compile(r"\[([\d,]*)\]")


def dump_options(directory: str, module: str = "jit_train_step") -> dict[str, Any]:
    """XLA compiler options that write `module`'s optimized HLO and buffer live ranges under
    `directory` (pass to `Lowered.compile(compiler_options=...)`)."""
    return {"xla_dump_to": directory, "xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": module}


def read_live_range(directory: str, module: str = "jit_train_step") -> str:
    """The live-range dump of `module`'s optimized program under `directory`."""
    paths = sorted(glob.glob(os.path.join(directory, f"*{module}*after_optimizations-live-range.txt")))
    if not paths:
        raise FileNotFoundError(f"no live-range dump of {module} under {directory}")
    with open(paths[-1]) as f:
        return f.read()


def peak_buffers(live_range: str) -> list[tuple[str, int]]:
    """(instruction name, bytes) of every buffer live at the peak, from the live-range dump."""
    out, inside = [], False
    for line in live_range.splitlines():
        if "(peak):" in line:
            inside = True
            continue
        if inside:
            m = _LIVE.match(line)
            if not m:
                break
            out.append((m.group(1), int(m.group(2))))
    return out


def instructions(hlo_text: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (dims of its (first) shape, opcode, op_name) for every instruction of the HLO."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        dm = _DIMS.search(m.group(2))
        dims = tuple(int(d) for d in dm.group(1).split(",") if d) if dm else ()
        om = _OPNAME.search(line)
        out[m.group(1)] = (dims, m.group(3), om.group(1) if om else "")
    return out


def _entry_params(hlo_text: str) -> tuple[set[str], set[tuple[int, ...]]]:
    """Names of the entry computation's parameters, and the shapes of the float ones."""
    names, shapes = set(), set()
    entry = next((line for line in hlo_text.splitlines() if line.startswith("ENTRY")), "")
    for name, dt, dims in re.findall(r"(\S+?): (\w+)\[([\d,]*)\]", entry.split("->")[0]):
        names.add(name.lstrip("(%"))
        if dt.startswith(("f", "bf")) and dims:
            shapes.add(tuple(int(d) for d in dims.split(",")))
    return names, shapes


def classify(dims: tuple[int, ...], op_name: str, sizes: dict[str, int],
             weight_shapes: set[tuple[int, ...]], opcode: str = "") -> str:
    """The kind (`KINDS`) of one live buffer; `sizes`: this device's "vocab" (V/t), "embed" (D),
    "seq" (T/c) and "kv_seq" (T) extents."""
    T, S = sizes["seq"], sizes["kv_seq"]
    gathered = "all_gather" in op_name or opcode.startswith("all-gather")
    if gathered and "transpose(" not in op_name and not (len(dims) >= 3 and S in dims):
        return "gathered weights"  # ([b, T, D]-shaped gathers are sequence parallelism's activations)
    if sizes["vocab"] in dims and sizes["embed"] not in dims and len(dims) >= 2:
        return "logits"
    if "/attn/" in op_name and len(dims) >= 3 and dims[-1] == S and dims[-2] in (T, S):
        return "attention"
    forward = "jvp(" in op_name and "transpose(" not in op_name
    if len(dims) >= 2 and not forward and math.prod(dims) in {math.prod(w) for w in weight_shapes}:
        return "weight-shaped"  # (by element count: the tiled loss writes the table's gradient as tiles)
    if "/attn/" in op_name:
        return "attention other"
    if "/mlp/" in op_name:
        return "mlp"
    if "transpose(" in op_name:
        return "other backward"
    if "jvp(" in op_name:
        return "other forward"
    return "other"


def breakdown(live_range: str, hlo_text: str, sizes: dict[str, int]) -> dict[str, float]:
    """Bytes per device live at the peak, by kind (`KINDS`, plus "arguments" and "total
    temporaries", their sum without the arguments). See the module docstring."""
    params, weight_shapes = _entry_params(hlo_text)
    instr = instructions(hlo_text)
    out = {k: 0.0 for k in ("arguments",) + KINDS}
    for name, nbytes in peak_buffers(live_range):
        if name in params:
            out["arguments"] += nbytes
            continue
        dims, opcode, op_name = instr.get(name, ((), "", ""))
        out[classify(dims, op_name, sizes, weight_shapes, opcode)] += nbytes
    out["total temporaries"] = sum(out[k] for k in KINDS)
    return out


def format_breakdown(b: dict[str, float], formula: dict[str, float] | None = None) -> list[str]:
    """Report lines (MiB) of `breakdown`, beside the formula's terms of the same names if given."""
    lines = ["temporaries live at the peak (MiB)   compiled    formula"]
    for k in KINDS + ("total temporaries",):
        f = "" if formula is None or k not in formula else f"{formula[k] / 2**20:>10.3f}"
        if b.get(k) or f:
            lines.append(f"  {k:<33} {b.get(k, 0.0) / 2**20:>10.3f} {f}")
    return lines
