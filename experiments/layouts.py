"""What each parallel layout costs: the same training run on 1 device and on N simulated CPU devices.

For each layout (1 device; data=N; fsdp=N; data=2 × fsdp=N/2; data=N/2 × fsdp=2) this trains
`--steps` steps from the same seed on the same batches and prints one table:

- final loss     : the train loss (nats/token) returned by the last step.
- step ms        : mean wall time of one compiled step call plus `jax.block_until_ready`, in
                   milliseconds, over steps 2..steps (the first call and the compile are
                   excluded; building the host batch is not timed).
- compile s      : seconds to lower and compile the train step ahead of time.
- state/dev      : per-device bytes of the compiled step's arguments minus the batch shard,
                   i.e. parameters + AdamW moments + int32 step counters, from
                   `compiled.memory_analysis()` (argument_size_in_bytes − batch bytes).
- temp/dev       : per-device scratch bytes of the compiled step (temp_size_in_bytes):
                   activations, gradients, gathered weights.
- shards/dev     : the same train state summed over the actual shards held by each device
                   after training (largest device); it should equal state/dev.

Byte columns are in MiB (2^20 bytes). A last line compares every layout's final loss with the
1-device one (max absolute difference against `--atol`).

The N "devices" are XLA host-platform devices sharing this machine's CPU cores, so step times
show the overhead of partitioning and collectives in emulation, not real multi-device speed-ups;
the memory columns, which come from the compiled per-device programs, are what the layouts
would need on real hardware.

Run (defaults: --steps 30 --preset shakespeare --devices 8; the shakespeare preset is shrunk
to model.seq_len=64 train.batch_size=32 unless overridden):

    python experiments/layouts.py
    python experiments/layouts.py --steps 50 model.num_layers=2 train.batch_size=64
"""

from __future__ import annotations

import argparse
import os
import time

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax

# Applied before the caller's overrides so that the default run fits in a few CPU minutes.
PRESET_DEFAULTS = {"shakespeare": ["model.seq_len=64", "train.batch_size=32"]}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="train steps per layout (≥ 2)")
    ap.add_argument("--preset", default="shakespeare")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (even, ≥ 4)")
    ap.add_argument("--atol", type=float, default=1e-4,
                    help="largest |final loss − 1-device final loss| still called agreement")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_layers=2")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be ≥ 2 (the first step is excluded from the timing)")
    if args.devices < 4 or args.devices % 2:
        ap.error("--devices must be even and ≥ 4 (the layouts include data=2 × fsdp=N/2)")
    return args


def simulate_devices(n: int) -> None:
    """Ask XLA for `n` host devices; must run before jax is imported."""
    simulate_cpu_devices(n)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def layouts(n: int) -> list[tuple[str, int, int]]:
    """(name, data, fsdp), each once; the 1-device layout is first and is the reference.
    (With n=4, data=2 × fsdp=n/2 and data=n/2 × fsdp=2 are the same layout.)"""
    out = []
    for name, d, f in [("1 device", 1, 1), (f"data={n}", n, 1), (f"fsdp={n}", 1, n),
                       (f"data=2 × fsdp={n // 2}", 2, n // 2), (f"data={n // 2} × fsdp=2", n // 2, 2)]:
        if (d, f) not in [(d2, f2) for _, d2, f2 in out]:
            out.append((name, d, f))
    return out


def main() -> None:
    args = parse_args()
    simulate_devices(args.devices)

    import jax  # only now that XLA_FLAGS is set: the backend reads it once
    import numpy as np

    from jaxsys import config as config_lib
    from jaxsys.config.presets import get_preset
    from jaxsys.data import batches, corpus as corpus_lib
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import state as ts, step as train_step

    if len(jax.devices()) != args.devices:
        raise SystemExit(f"Asked for {args.devices} devices but jax has {len(jax.devices())} "
                         f"({jax.devices()[0].platform}); was XLA_FLAGS or JAX_PLATFORMS set elsewhere?")
    base = config_lib.apply_overrides(get_preset(args.preset),
                                      PRESET_DEFAULTS.get(args.preset, []) + args.overrides)
    corpus = corpus_lib.load_corpus(base.data)
    MiB = 2**20

    def run(name: str, data_ways: int, fsdp_ways: int) -> dict:
        cfg = config_lib.apply_overrides(
            base, [f"mesh.data={data_ways}", f"mesh.fsdp={fsdp_ways}", "mesh.tensor=1", "mesh.pipe=1"])
        config_lib.validate(cfg)
        devices = jax.devices()[:data_ways * fsdp_ways]
        mesh = make_mesh(cfg.mesh, devices)
        s = ts.setup(cfg, mesh)
        state = ts.init_state(s, cfg.train.seed)

        t0 = time.perf_counter()
        compiled = train_step.compile_train_step(s)
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        B, T = cfg.train.batch_size, cfg.model.seq_len
        batch_bytes = 2 * np.prod(s.batch_sharding.shard_shape((B, T))) * np.dtype(np.int32).itemsize

        losses, step_s = [], []
        for step in range(args.steps):
            batch = batches.global_batch(corpus.train, cfg.train.seed, step, "train", B, T,
                                         s.batch_sharding)
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            step_s.append(time.perf_counter() - t0)
            losses.append(metrics["loss"])

        per_device = {d: 0 for d in devices}
        for leaf in jax.tree_util.tree_leaves(state):
            for shard in leaf.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
        return {
            "layout": name,
            "losses": np.array([float(x) for x in losses]),
            "step_ms": 1e3 * float(np.mean(step_s[1:])),
            "compile_s": compile_s,
            "state_mib": (mem.argument_size_in_bytes - batch_bytes) / MiB,
            "temp_mib": mem.temp_size_in_bytes / MiB,
            "shards_mib": max(per_device.values()) / MiB,
        }

    m = base.model
    print(f"jax {jax.__version__} | {args.devices} × {jax.devices()[0].platform} | preset "
          f"{args.preset}: {m.family} L={m.num_layers} D={m.embed_dim} H={m.num_heads} | "
          f"batch {base.train.batch_size}×{m.seq_len} | {args.steps} steps | overrides "
          f"{' '.join(PRESET_DEFAULTS.get(args.preset, []) + args.overrides) or '-'}", flush=True)
    rows = [run(*layout) for layout in layouts(args.devices)]

    header = (f"{'layout':<20} {'final loss':>10} {'step ms':>8} {'compile s':>9} "
              f"{'state/dev MiB':>13} {'temp/dev MiB':>12} {'shards/dev MiB':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:<20} {r['losses'][-1]:>10.6f} {r['step_ms']:>8.1f} {r['compile_s']:>9.2f} "
              f"{r['state_mib']:>13.3f} {r['temp_mib']:>12.3f} {r['shards_mib']:>14.3f}")

    ref = rows[0]["losses"]
    final_diff = max(abs(r["losses"][-1] - ref[-1]) for r in rows[1:])
    curve_diff = max(float(np.max(np.abs(r["losses"] - ref))) for r in rows[1:])
    verdict = "agree" if final_diff <= args.atol else "DISAGREE"
    print(f"final losses {verdict} with 1 device: max |diff| = {final_diff:.2e} (atol {args.atol:.0e}); "
          f"over all {args.steps} steps max |diff| = {curve_diff:.2e}")


if __name__ == "__main__":
    main()
