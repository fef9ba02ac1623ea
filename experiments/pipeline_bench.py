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

and writes one timeline PNG per schedule (last m; one row per stage, one column per tick;
F blue, B orange, W green, idle white) to the printed directory.

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


def write_png(path: str, ops_KS, cell: int = 10) -> None:
    """A timeline image of an executed op table [ticks, stages]: stages as rows (no matplotlib)."""
    K, S = ops_KS.shape
    rows = []
    for s in range(S):
        line = b"".join(bytes(COLOURS[int(ops_KS[t, s])]) * (cell - 1) + b"\x00\x00\x00" for t in range(K))
        rows += [b"\x00" + line] * (cell - 1) + [b"\x00" + b"\x00" * 3 * cell * K]
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", cell * K, cell * S, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
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
        write_png(path, ops)
        print(f"  timeline: {path}", file=sys.stderr)
    print(f"timelines written to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
