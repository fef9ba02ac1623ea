"""Remat measured: per-device compiled memory and CPU step time of every `model.remat` policy.

For a gpt2-small-shaped model (the `gpt2-small` preset: 12 layers, 768 wide, 12 heads, context
1024, vocabulary 50304), each policy's train step is compiled ahead of time and its
`memory_analysis()` read as `jaxsys plan` reads it (temporaries; peak = arguments + outputs −
aliased + temporaries, `jaxsys.train.remat_auto.peak_bytes`), then `--warmup` untimed and
`--steps` timed steps are run (median). The first step's loss is printed too: every policy
computes the same function, so it must agree to float rounding. GFLOP: `cost_analysis()` of
the compiled step, the recompute included; with `model.scan_layers=true` (the preset's) XLA
counts the layer loop's body once, so compare policies with `model.scan_layers=false`.

    python experiments/remat.py                                # batch 1, the preset's shape
    python experiments/remat.py --layers 4 --seq 256 --batch 4  # minutes on a 2-core CPU
    python experiments/remat.py --policies none,full --json
    python experiments/remat.py --layers 4 --steps 0 --warmup 0 model.scan_layers=false  # bytes, FLOPs

`offload_dots_no_batch` is left out by default: it needs a GPU or TPU (host memory kinds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax

POLICIES = ("none", "dots_no_batch", "dots", "full")


def measure(overrides: list[str], policy: str, warmup: int, steps: int) -> dict:
    """One policy: compiled bytes, compile seconds, median step seconds, first loss."""
    import jax

    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.data import batches, corpus as corpus_lib
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import remat_auto, state as ts, step as train_step

    cfg = apply_overrides(get_preset("gpt2-small"), [*overrides, f"model.remat={policy}"])
    s = ts.setup(cfg, make_mesh(cfg.mesh))
    t0 = time.perf_counter()
    step = train_step.compile_train_step(s)
    compile_s = time.perf_counter() - t0
    ma = step.memory_analysis()
    cost = step.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    state = ts.init_state(s, 0) if warmup + steps else None
    corpus = corpus_lib.load_corpus(cfg.data)
    times, first_loss = [], None
    for k in range(warmup + steps):
        batch = batches.global_batch(corpus.train, 0, k, "train", cfg.train.batch_size, cfg.model.seq_len,
                                     s.batch_sharding)
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
        if first_loss is None:
            first_loss = float(metrics["loss"])
    return {"policy": policy, "temp_bytes": int(ma.temp_size_in_bytes),
            "peak_bytes": remat_auto.peak_bytes(step), "argument_bytes": int(ma.argument_size_in_bytes),
            "compile_s": compile_s, "step_s": statistics.median(times) if times else float("nan"),
            "first_loss": first_loss if first_loss is not None else float("nan"), "flops": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="model.num_layers (0: the preset's 12)")
    ap.add_argument("--seq", type=int, default=0, help="model.seq_len (0: the preset's 1024)")
    ap.add_argument("--batch", type=int, default=1, help="train.batch_size, global")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0: real devices)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated model.remat values")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args()
    simulate_cpu_devices(args.devices or None)
    import jax

    overrides = [f"train.batch_size={args.batch}", *args.overrides]
    overrides += [f"model.num_layers={args.layers}"] * bool(args.layers) + [f"model.seq_len={args.seq}"] * bool(args.seq)
    rows = [measure(overrides, p, args.warmup, args.steps) for p in args.policies.split(",")]
    if args.json:
        print(json.dumps({"overrides": overrides, "devices": len(jax.devices()), "rows": rows}, indent=1))
        return
    print(f"gpt2-small | jax {jax.__version__} | {len(jax.devices())} × {jax.devices()[0].device_kind} | "
          f"{' '.join(overrides)}")
    base = rows[0]
    header = (f"{'model.remat':<15} {'temp MiB':>10} {'peak MiB':>10} {'temp ×':>7} {'compile s':>9} "
              f"{'step ms':>9} {'step ×':>7} {'GFLOP':>8} {'FLOP ×':>7} {'first loss':>11}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['policy']:<15} {r['temp_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / 2**20:>10.1f} "
              f"{r['temp_bytes'] / base['temp_bytes']:>7.2f} {r['compile_s']:>9.1f} {r['step_s'] * 1e3:>9.1f} "
              f"{r['step_s'] / base['step_s']:>7.2f} {r['flops'] / 1e9:>8.2f} {r['flops'] / base['flops']:>7.3f} "
              f"{r['first_loss']:>11.6f}")


if __name__ == "__main__":
    main()
