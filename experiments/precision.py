"""Mixed precision on the CPU: final losses of float32, bfloat16 and float16 (loss-scaled) training.

Every row is one `jaxsys.train.loop.train` run of a preset (default `tiny`; `--preset
shakespeare` for the real model) on one CPU device, same data, seed and schedule; only the
precision overrides differ. Printed: final train loss (mean of the last 10 steps), val loss,
skipped steps (of which loss-scale overflows), the final loss scale, wall time. `--plot FILE`
draws the loss curves.

    python experiments/precision.py                          # tiny, 200 steps, ~3 min on 2 cores
    python experiments/precision.py --preset shakespeare --steps 300 --plot docs/precision_shakespeare.png

To add a precision (e.g. fp8 matmuls), append one (name, overrides) entry to PRECISIONS.
CPU step times say nothing about accelerators (XLA:CPU emulates bfloat16 and float16 matmuls
in float32 and adds converts): read the loss columns.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

PRECISIONS: list[tuple[str, list[str]]] = [
    ("float32", []),
    ("bfloat16 compute", ["model.compute_dtype=bfloat16"]),
    ("float16, dynamic loss scale", ["model.compute_dtype=float16"]),  # train.loss_scale=auto
    ("float16, no loss scale", ["model.compute_dtype=float16", "train.loss_scale=none"]),
    ("bf16 params, no master", ["model.compute_dtype=bfloat16", "model.param_dtype=bfloat16"]),
    ("bf16 params + fp32 master", ["model.compute_dtype=bfloat16", "model.param_dtype=bfloat16",
                                   "optimizer.master_dtype=float32"]),
]
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0",
         "logging.quiet=true", "checkpoint.every=0"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--plot", default=None, help="PNG of the train-loss curves")
    ap.add_argument("--only", nargs="*", default=None, help="names (prefixes) of PRECISIONS to run")
    ap.add_argument("overrides", nargs="*", help="config overrides for every row")
    return ap.parse_args()


def run(preset: str, steps: int, overrides: list[str]) -> dict:
    """One training run in a fresh run directory: its result and metrics rows."""
    import jax

    from jaxsys.config import apply_overrides, presets
    from jaxsys.train.loop import train

    run_dir = Path(tempfile.mkdtemp(prefix="precision-"))
    cfg = apply_overrides(getattr(presets, preset.replace("-", "_"))(),
                          [*QUIET, f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
                           "mesh.data=1", f"run_dir={run_dir}", *overrides])
    t0 = time.perf_counter()
    result = train(cfg, jax.devices()[:1])
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "loss" in r and "step" in r]
    finite = [r["loss"] for r in steps_ if not r.get("skipped") and math.isfinite(r["loss"])]
    return {"rows": steps_, "val": result.val_loss,
            "train": sum(finite[-10:]) / max(1, len(finite[-10:])),
            "skipped": int(sum(r.get("skipped", 0) for r in steps_)),
            "overflows": int(sum(r.get("overflow", 0) for r in steps_)),
            "scale": steps_[-1].get("loss_scale") if steps_ else None, "wall": wall}


def main() -> None:
    args = parse_args()
    chosen = [(n, o) for n, o in PRECISIONS if not args.only or any(n.startswith(p) for p in args.only)]
    results = {}
    print(f"{args.preset}, {args.steps} steps, one CPU device")
    print(f"{'precision':<30} {'train loss':>10} {'val loss':>9} {'skipped':>8} {'overflows':>9} "
          f"{'final scale':>11} {'wall s':>7}")
    for name, overrides in chosen:
        r = results[name] = run(args.preset, args.steps, [*overrides, *args.overrides])
        scale = "-" if r["scale"] is None else f"{r['scale']:.0f}"
        print(f"{name:<30} {r['train']:>10.4f} {r['val']:>9.4f} {r['skipped']:>8} {r['overflows']:>9} "
              f"{scale:>11} {r['wall']:>7.1f}", flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results.items():
            pts = [(x["step"], x["loss"]) for x in r["rows"] if math.isfinite(x["loss"])]
            ax.plot(*zip(*pts), label=name, lw=1)
        ax.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{args.preset}: precision")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
