"""Context parallelism measured: per-device memory against sequence length, the longest
sequence a per-device budget allows, causal work balance with and without zigzag, and the CPU
step time of each kind.

1. Memory (compile only, nothing runs): the train step of one sequence of T tokens is compiled
   for context = 1, 2, 4, 8 (one device per context rank, data = 1) with each kind, and XLA's
   `memory_analysis()` gives the per-device temporaries (activations and workspace) and peak
   (+ parameters, gradients, AdamW moments). The longest T (of the powers of two tried) whose
   peak fits `--budget-mib` per device, per layout.
2. Work balance: (query, key) pairs each device attends over under the causal mask
   (`jaxsys.parallel.context.attention_work`, exact counts from the layout), as max / mean.
3. Step time: the compiled step on 8 simulated CPU devices (they share this machine's cores,
   so this shows the kinds' overheads against each other, not speed-ups).

    python experiments/context_parallel.py                   # ~10 minutes on 2 cores
    python experiments/context_parallel.py --no-timing       # memory and balance only
"""

from __future__ import annotations

import argparse
import time

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax

MODEL = ["model.family=llama", "model.num_layers=2", "model.embed_dim=128", "model.num_heads=8",
         "model.num_kv_heads=8", "model.vocab_size=256", "train.batch_size=1", "train.grad_accum=1"]
KINDS = ("ring", "all-gather", "ulysses")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--contexts", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--budget-mib", type=float, default=512.0, help="per-device memory budget")
    ap.add_argument("--time-seq", type=int, default=1024, help="sequence length of the timed steps")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout (after 1 warm-up)")
    ap.add_argument("--no-timing", action="store_true")
    return ap.parse_args()


def memory_table(args: argparse.Namespace) -> None:
    import jax
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import tiny
    from jaxsys.tools import planner

    layouts = [("context=1", 1, "ring")] + [(f"context={c} {k}", c, k) for c in args.contexts if c > 1
                                             for k in KINDS]
    peaks: dict[str, dict[int, float]] = {}
    print(f"\n## Per-device memory (MiB) against sequence length, one sequence, {MODEL}\n")
    print("| layout | " + " | ".join(f"T={T} temp / peak" for T in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for name, c, kind in layouts:
        cells, peaks[name] = [], {}
        for T in args.lengths:
            cfg = apply_overrides(tiny(), MODEL + [f"model.seq_len={T}", "mesh.data=1", f"mesh.context={c}",
                                                   f"context_parallel.kind={kind}"])
            p = planner.plan(cfg, jax.devices()[:c])
            peaks[name][T] = p.memory["peak"]
            cells.append(f"{p.memory['temp'] / 2**20:.1f} / {p.memory['peak'] / 2**20:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    budget = args.budget_mib * 2**20
    print(f"\n## Longest sequence (of those tried) whose peak fits {args.budget_mib:.0f} MiB per device\n")
    print("| layout | longest T | × context=1 |")
    print("|---|---|---|")
    base = max([T for T, b in peaks["context=1"].items() if b <= budget], default=0)
    for name, by_T in peaks.items():
        fits = max([T for T, b in by_T.items() if b <= budget], default=0)
        more = f">= {fits}" if fits == max(args.lengths) else str(fits)
        print(f"| {name} | {more} | {fits / base if base else float('nan'):.0f}× |")


def balance_table(T: int = 4096) -> None:
    from jaxsys.parallel.context import attention_work
    print(f"\n## Causal attention work per device, T={T}: max / mean over the context devices\n")
    print("| context | contiguous | zigzag |")
    print("|---|---|---|")
    for c in (2, 4, 8):
        row = [attention_work(T, c, z) for z in (False, True)]
        print(f"| {c} | " + " | ".join(f"{w.max() / w.mean():.3f}" for w in row) + " |")


def time_table(args: argparse.Namespace) -> None:
    import jax
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import tiny
    from jaxsys.data import batches as batches_lib, corpus as corpus_lib
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import state as ts, step as train_step

    layouts = [("data=8 (whole sequence per device)", ["mesh.data=8", "train.batch_size=8"])]
    layouts += [(f"data=2 × context=4 {k}", ["mesh.data=2", "mesh.context=4", "train.batch_size=8",
                                            f"context_parallel.kind={k}"]) for k in KINDS]
    layouts += [(f"context=8 {k}", ["mesh.data=1", "mesh.context=8", "train.batch_size=8",
                                   f"context_parallel.kind={k}"]) for k in KINDS]
    print(f"\n## CPU step time, 8 simulated devices, batch 8 × {args.time_seq} tokens\n")
    print("| layout | compile s | step ms |")
    print("|---|---|---|")
    for name, overrides in layouts:
        cfg = apply_overrides(tiny(), MODEL + [f"model.seq_len={args.time_seq}"] + overrides)
        s = ts.setup(cfg, make_mesh(cfg.mesh))
        state = ts.init_state(s, seed=0)
        t0 = time.perf_counter()
        step = train_step.compile_train_step(s)
        compile_s = time.perf_counter() - t0
        corpus = corpus_lib.load_corpus(cfg.data)
        batches = [batches_lib.global_batch(corpus.train, 0, k, "train", cfg.train.batch_size,
                                            cfg.model.seq_len, s.batch_sharding) for k in range(args.steps + 1)]
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[1:]:
            state, m = step(state, b)
        jax.block_until_ready(m)
        print(f"| {name} | {compile_s:.1f} | {(time.perf_counter() - t0) / args.steps * 1e3:.0f} |", flush=True)


def main() -> None:
    args = parse_args()
    simulate_cpu_devices(8)
    balance_table()
    memory_table(args)
    if not args.no_timing:
        time_table(args)


if __name__ == "__main__":
    main()
