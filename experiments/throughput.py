"""Compile time and training throughput of a preset on this machine.

For each preset named on the command line, builds the train step, compiles it ahead of time
(reported apart), runs `--warmup` untimed steps and then `--steps` timed ones, and prints one
table: parameters, tokens per step, compile seconds, median step milliseconds, tokens/s, and
model FLOP/s (6N + attention per token, PaLM appendix B).

    python experiments/throughput.py shakespeare
    python experiments/throughput.py gpt2-small --steps 3 train.batch_size=4
    python experiments/throughput.py shakespeare --devices 2      # one simulated device per core

Overrides (key=value) apply to every preset. Times are wall clock on whatever backend JAX
finds; on CPU the numbers depend on the core count and on other load.
"""

from __future__ import annotations

import argparse
import statistics
import time

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+", help="preset names, then optional key=value overrides")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0: real devices)")
    args = ap.parse_intermixed_args()
    simulate_cpu_devices(args.devices or None)  # 0: the real devices

    import jax

    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.data import batches, corpus as corpus_lib
    from jaxsys.model.flops import flops_per_token
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import state as ts, step as train_step

    names = [p for p in args.presets if "=" not in p]
    overrides = [p for p in args.presets if "=" in p]
    print(f"jax {jax.__version__} | {len(jax.devices())} × {jax.devices()[0].device_kind} | "
          f"overrides: {' '.join(overrides) or '-'}")
    header = f"{'preset':<12} {'params':>8} {'tok/step':>8} {'compile s':>9} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>8}"
    rows = []
    for name in names:
        cfg = apply_overrides(get_preset(name), overrides)
        s = ts.setup(cfg, make_mesh(cfg.mesh))
        state = ts.init_state(s, 0)
        t0 = time.perf_counter()
        step = train_step.compile_train_step(s)
        compile_s = time.perf_counter() - t0
        corpus = corpus_lib.load_corpus(cfg.data)
        B, T = cfg.train.batch_size, cfg.model.seq_len
        times = []
        for k in range(args.warmup + args.steps):
            batch = batches.global_batch(corpus.train, 0, k, "train", B, T, s.batch_sharding)
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            if k >= args.warmup:
                times.append(time.perf_counter() - t0)
        n = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        med = statistics.median(times)
        tok_s = B * T / med
        rows.append(f"{name:<12} {n / 1e6:>7.2f}M {B * T:>8} {compile_s:>9.1f} {med * 1e3:>9.1f} "
                    f"{tok_s:>10,.0f} {flops_per_token(cfg.model, n) * tok_s / 1e9:>8.1f}")
    print(header)
    print("-" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
