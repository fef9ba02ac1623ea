"""Every parallel layout of a gpt2-small-shaped model on 8 simulated devices, measured beside
its closed form: DP, ZeRO-1/2/3, tensor parallel, TP + sequence parallel, and mixes.

For each layout:
- memory columns come from `jaxsys.tools.planner.plan` (the train step compiled ahead of time at the
  real model shapes, `--plan` overrides; default batch 8 × 1024 tokens): parameters + gradients
  + AdamW moments per device beside the ZeRO formula (4Ψ + 4Ψ + 8Ψ bytes with the stage's and
  tensor's divisions), XLA temporaries beside the Korthikanti activation formula;
- communication columns: wire bytes per device per step (ring algorithms) of every collective
  in the optimized HLO, by kind, and their total beside the Megatron/ZeRO closed-form minimum;
- step ms: measured wall time of the compiled step on this CPU at a reduced size (`--time`
  overrides; default gpt2-small width with 2 layers, vocabulary 8192, batch 8 × 64 tokens;
  `--steps` timed steps after one warm-up): the full model takes ~40 s a step here, and data
  parallel would hold 8 replicas of its 2 GB training state in this machine's memory. The 8
  "devices" share the machine's cores, so this shows partitioning overheads, not speed-ups.

The bar (issue 3): wire bytes within 5% and state memory within 10% of the closed form.

    python experiments/parallel_layouts.py                 # ~10 minutes on 2 cores
    python experiments/parallel_layouts.py --no-timing     # compile-only columns
"""

from __future__ import annotations

import argparse
import os
import time

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax

LAYOUTS = [
    ("DP data=8", ["mesh.data=8"]),
    ("ZeRO-1 fsdp=8", ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1"]),
    ("ZeRO-2 fsdp=8", ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=2"]),
    ("ZeRO-3 fsdp=8", ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3"]),
    # The same two layouts with the gradient collectives left to XLA (mesh.grad_sync=xla).
    ("DP data=8, XLA sync", ["mesh.data=8", "mesh.grad_sync=xla"]),
    ("ZeRO-3 fsdp=8, XLA sync", ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3", "mesh.grad_sync=xla"]),
    ("TP=4 × data=2", ["mesh.data=2", "mesh.tensor=4"]),
    ("TP=4 + SP × data=2", ["mesh.data=2", "mesh.tensor=4", "mesh.sequence_parallel=true"]),
    ("TP=2 × ZeRO-3 fsdp=4", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=3"]),
    ("TP=2 + SP × ZeRO-1 fsdp=2 × data=2",
     ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.zero_stage=1", "mesh.sequence_parallel=true"]),
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--plan", nargs="*", default=["train.batch_size=8"],
                    help="overrides for the compiled (memory/communication) columns")
    ap.add_argument("--time", nargs="*", default=["train.batch_size=8", "model.seq_len=64",
                                                  "model.num_layers=2", "model.vocab_size=8192"],
                    help="overrides for the measured step time")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per layout (after 1 warm-up)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--accelerator", default="h100")
    return ap.parse_args()


def time_step(cfg, steps: int) -> float:
    """Mean seconds per compiled step call (after one warm-up call)."""
    import jax
    from jaxsys.data import batches as batches_lib, corpus as corpus_lib
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import state as ts, step as train_step
    s = ts.setup(cfg, make_mesh(cfg.mesh))
    state = ts.init_state(s, seed=0)
    step = train_step.compile_train_step(s)
    corpus = corpus_lib.load_corpus(cfg.data)
    batches = [batches_lib.global_batch(corpus.train, 0, k, "train", cfg.train.batch_size,
                                        cfg.model.seq_len, s.batch_sharding) for k in range(steps + 1)]
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches[1:]:
        state, m = step(state, b)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    args = parse_args()
    simulate_cpu_devices(8)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.tools import planner

    MiB = 2.0 ** 20
    header = ("| layout | state MiB/dev | formula | Δ | temp MiB/dev | activations formula | "
              "all-reduce MiB | all-gather MiB | reduce-scatter MiB | wire total MiB | formula | Δ | "
              "step ms (CPU) | roofline ms |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    t_start = time.perf_counter()
    for name, layout in LAYOUTS:
        cfg = apply_overrides(get_preset(args.preset), ["data.source=shakespeare", *layout, *args.plan])
        p = planner.plan(cfg, jax.devices(), args.accelerator)
        wire = sum(p.comm_bytes.values())
        wire_f = sum(p.comm_formula.values())
        d_state = p.state_bytes / p.state_formula - 1
        d_wire = wire / wire_f - 1
        step_ms = "—"
        if not args.no_timing:
            tcfg = apply_overrides(get_preset(args.preset), [*layout, *args.time])
            step_ms = f"{time_step(tcfg, args.steps) * 1e3:.0f}"
        c = p.comm_bytes
        rows.append(
            f"| {name} | {p.state_bytes / MiB:.1f} | {p.state_formula / MiB:.1f} | {d_state:+.1%} | "
            f"{p.memory['temp'] / MiB:.0f} | {p.memory_formula['activations'] / MiB:.0f} | "
            f"{c['all-reduce'] / MiB:.1f} | {c['all-gather'] / MiB:.1f} | {c['reduce-scatter'] / MiB:.1f} | "
            f"{wire / MiB:.1f} | {wire_f / MiB:.1f} | {d_wire:+.1%} | {step_ms} | "
            f"{p.roofline['step_s'] * 1e3:.2f} |")
        print(rows[-1], flush=True)
    print()
    print("\n".join(rows))
    print(f"\n({time.perf_counter() - t_start:.0f} s; plan: {' '.join(args.plan)}; time: "
          f"{' '.join(args.time)}; {args.steps} timed steps)")


if __name__ == "__main__":
    main()
