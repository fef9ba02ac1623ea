"""Pipeline schedules side by side: bubble, stash memory and step time, p stages × m microbatches.

For each schedule (gpipe, 1f1b, interleaved-1f1b with v=2, zb-h1) and each m, this compiles the
pipelined loss-and-gradients of a small gpt2 (layers = p·v, one train step's batch of m
microbatches of `--rows` sequences) on a data=1 × pipe=p mesh and prints one table:

- bubble formula : (p−1)/(m+p−1), or (p−1)/(v·m+p−1) interleaved; ZB-H1 has none in closed form.
- bubble counted : idle stage-ticks / all stage-ticks of the table the executor returned as it ran.
- slots          : activation stash slots the program holds per stage (interval colouring).
- stash KiB      : slots × one microbatch activation [rows, T, D] in bytes / 1024.
- temp KiB       : per-device temp_size_in_bytes of the compiled program (memory_analysis).
- step ms        : mean wall time of the compiled call over `--steps` calls after one warm-up.

and writes one timeline PNG per schedule (last m; one labelled row per stage, one column per
tick, numbered below; F blue, B orange, W green, idle white, with a legend) to the printed
directory.

CPU caveat: the p "devices" are XLA host devices sharing this machine's cores (and other users'
processes), so step times are noisy and say little about real overlap; the memory and bubble
columns come from the compiled program and the executed table, and do not depend on the host.

    python experiments/pipeline_bench.py --p 4 --m 4 8 16 32
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import zlib

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax

COLOURS = {0: (255, 255, 255), 1: (70, 120, 200), 2: (240, 150, 40), 3: (90, 170, 90)}
LEGEND = ((1, "F forward"), (2, "B backward (input grad)"), (3, "W weight grad"), (0, "idle"))

# A 3×5 pixel font (capitals, digits, a little punctuation), so the timelines need no matplotlib.
_FONT = {c: rows.split() for c, rows in {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### #.# #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ### .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###", "0": "### #.# #.# #.# ###",
    "1": ".#. ##. .#. .#. ###", "2": "##. ..# .#. #.. ###", "3": "##. ..# .#. ..# ##.",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ##. ..# ##.", "6": ".## #.. ### #.# ###",
    "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ##.",
    " ": "... ... ... ... ...", "-": "... ... ### ... ...", "=": "... ### ... ### ...",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", ">": "#.. .#. ..# .#. #..",
    ":": "... .#. ... .#. ...", "/": "..# ..# .#. #.. #..", ".": "... ... ... ... .#.",
    ",": "... ... ... .#. #..",
}.items()}
_SCALE, _ADVANCE, _HEIGHT = 2, 8, 10  # pixels per font pixel, per character, per line


def _text_width(text: str) -> int:
    return len(text) * _ADVANCE


def _draw_text(img, x: int, y: int, text: str) -> None:
    """Black `text` (upper-cased) with its top-left corner at (x, y) of an RGB array."""
    for i, ch in enumerate(text.upper()):
        for r, row in enumerate(_FONT.get(ch, _FONT[" "])):
            for c, bit in enumerate(row):
                if bit == "#":
                    x0, y0 = x + i * _ADVANCE + c * _SCALE, y + r * _SCALE
                    img[y0:y0 + _SCALE, x0:x0 + _SCALE] = 0


def write_png(path: str, ops_KS, cell: int = 10, title: str = "") -> None:
    """A timeline image of an executed op table [ticks, stages]: one row per stage (labelled),
    one column per tick (numbered every 10 below the axis), a title and a colour legend. Drawn
    into an RGB array and encoded with zlib: no matplotlib needed."""
    import numpy as np

    K, S = ops_KS.shape
    pad = 8
    left = pad + _text_width(f"stage {S - 1}") + pad
    top = pad + (_HEIGHT + pad if title else 0)
    grid_w, grid_h = cell * K, cell * S
    axis_y = top + grid_h + 4
    legend_y = axis_y + 2 * (_HEIGHT + 4) + pad
    legend_w = sum(cell + 4 + _text_width(name) + 3 * pad for _, name in LEGEND)
    width = max(left + grid_w + pad, pad + legend_w, pad + _text_width(title) + pad)
    height = legend_y + max(cell, _HEIGHT) + pad
    img = np.full((height, width, 3), 255, np.uint8)
    if title:
        _draw_text(img, pad, pad, title)
    img[top - 1:top + grid_h + 1, left - 1:left + grid_w + 1] = 0  # frame; grid lines stay black
    for s in range(S):
        _draw_text(img, pad, top + s * cell + (cell - _HEIGHT) // 2, f"stage {s}")
        for t in range(K):
            y, x = top + s * cell, left + t * cell
            img[y:y + cell - 1, x:x + cell - 1] = COLOURS[int(ops_KS[t, s])]
    for t in range(0, K + 1, 10):  # tick numbers under the axis
        label = str(t)
        x = min(left + t * cell - _text_width(label) // 2, width - _text_width(label))
        _draw_text(img, max(x, left - _text_width(label)), axis_y, label)
    axis = "tick (time) ->"
    _draw_text(img, left + max(0, (grid_w - _text_width(axis)) // 2), axis_y + _HEIGHT + 4, axis)
    x = pad
    for op, name in LEGEND:
        img[legend_y:legend_y + cell, x:x + cell] = 0
        img[legend_y + 1:legend_y + cell - 1, x + 1:x + cell - 1] = COLOURS[op]
        _draw_text(img, x + cell + 4, legend_y + (cell - _HEIGHT) // 2, name)
        x += cell + 4 + _text_width(name) + 3 * pad
    rows = b"".join(b"\x00" + img[y].tobytes() for y in range(height))  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rows", type=int, default=8, help="sequences per microbatch")
    ap.add_argument("--layers-per-stage", type=int, default=4,
                    help="layers per virtual stage (the model has p × v × this many)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"])
    ap.add_argument("--out", default="runs/pipeline_bench")
    ap.add_argument("overrides", nargs="*", help="config overrides for the model, e.g. model.vocab_size=64")
    args = ap.parse_args()
    simulate_cpu_devices(args.p)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsys.config import apply_overrides, presets
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.parallel.pipeline import executor, program
    from jaxsys.train import state as ts

    p = args.p
    os.makedirs(args.out, exist_ok=True)
    print(f"p={p}, {args.rows} sequences per microbatch, jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'schedule':<18}{'m':>4}{'bubble formula':>16}{'bubble counted':>16}{'slots':>7}"
          f"{'stash KiB':>11}{'temp KiB':>10}{'step ms':>9}")
    for name in args.schedules:
        v = 2 if name == "interleaved-1f1b" else 1
        for m in args.m:
            cfg = apply_overrides(presets.tiny(), [
                f"model.num_layers={p * v * args.layers_per_stage}", f"mesh.pipe={p}", "mesh.data=1", f"pipeline.schedule={name}",
                f"pipeline.microbatches={m}", f"pipeline.virtual_stages={v}",
                f"train.batch_size={args.rows * m}", *args.overrides])
            s = ts.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:p]))
            prog = program.compile_schedule(program.make_schedule(cfg, p))
            params = ts.init_state(s, seed=0).params
            tok = jnp.zeros((cfg.train.batch_size, cfg.model.seq_len), jnp.int32)
            batch = jax.device_put({"inputs": tok, "targets": tok}, s.batch_sharding)
            fn = jax.jit(lambda pa, b: executor.pipeline_grads(cfg, s.mesh, prog, pa, b))
            compiled = fn.lower(params, batch).compile()
            out = jax.block_until_ready(compiled(params, batch))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = jax.block_until_ready(compiled(params, batch))
            step_ms = (time.perf_counter() - t0) / args.steps * 1e3
            ops = np.asarray(out[2])
            formula = "—" if name == "zb-h1" else f"{(p - 1) / (v * m + p - 1):.4f}"
            slot_bytes = args.layers_per_stage * args.rows * cfg.model.seq_len * cfg.model.embed_dim * 4
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(f"{name:<18}{m:>4}{formula:>16}{program.executed_bubble(ops):>16.4f}{prog.x_slots:>7}"
                  f"{prog.x_slots * slot_bytes / 1024:>11.0f}{temp / 1024:>10.0f}{step_ms:>9.1f}", flush=True)
        path = os.path.join(args.out, f"timeline_{name}_p{p}_m{m}.png")
        write_png(path, ops, title=f"{name}: p={p} stages, m={m} microbatches")
        print(f"  timeline: {path}", file=sys.stderr)
    print(f"timelines written to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
