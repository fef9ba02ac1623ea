"""fp8 matmuls (`model.fp8=current`) against bf16 and fp32: loss curves on the CPU.

Every row is one `jaxsys.train.loop.train` run on one CPU device, from the same seed (same
initial parameters, same batches), for `--steps` steps of each preset:

    fp32          model.compute_dtype=float32
    bf16          model.compute_dtype=bfloat16
    fp8 (bf16)    model.compute_dtype=bfloat16 model.fp8=current   (the usual fp8 recipe)
    fp8 (fp32)    model.compute_dtype=float32  model.fp8=current   (fp8 rounding alone)

The table gives the training loss at a few steps (the mean of the 10 steps ending there: one
batch's loss is noisy), the largest gap to bf16 of that smoothed curve, and the final val loss.
Numerics only: on the CPU an fp8 matmul is a float matmul of fp8-rounded values, slower than
plain (the quantize ops are extra work); only a Hopper-class GPU runs it as an fp8 gemm.

    python experiments/fp8.py                          # tiny + shakespeare, 300 steps
    python experiments/fp8.py --presets tiny --steps 100 --plot /tmp/fp8.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": ["model.compute_dtype=float32"],
    "bf16": ["model.compute_dtype=bfloat16"],
    "fp8 (bf16)": ["model.compute_dtype=bfloat16", "model.fp8=current"],
    "fp8 (fp32)": ["model.compute_dtype=float32", "model.fp8=current"],
}
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0",
         "logging.quiet=true", "checkpoint.every=0", "train.eval_every=0", "train.log_every=1", "mesh.data=1"]
SMOOTH = 10


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--presets", nargs="*", default=["tiny", "shakespeare"], choices=["tiny", "shakespeare"])
    ap.add_argument("--plot", default=str(ROOT / "docs" / "fp8_loss_curves.png"), help="'' for none")
    return ap.parse_args()


def run(preset: str, name: str, overrides: list[str], steps: int) -> dict:
    """Train one variant in a fresh run directory; its result and per-step losses."""
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.train.loop import train

    run_dir = Path(tempfile.mkdtemp(prefix=f"fp8-{preset}-"))
    cfg = apply_overrides(get_preset(preset), [*QUIET, f"train.steps={steps}", f"run_dir={run_dir}", *overrides])
    result = train(cfg)
    return {"name": name, "result": result, "losses": list(result.losses)}


def smoothed(losses: list[float]) -> list[float]:
    """The mean of the `SMOOTH` losses ending at each step (fewer at the start)."""
    return [sum(losses[max(0, i - SMOOTH + 1):i + 1]) / (i + 1 - max(0, i - SMOOTH + 1)) for i in range(len(losses))]


def table(preset: str, runs: dict[str, dict], steps: int) -> None:
    marks = sorted({min(s, steps) for s in (10, steps // 4, steps // 2, steps)})
    print(f"\n## {preset}, {steps} steps (train loss: mean of the {SMOOTH} steps ending at each step)\n")
    print("| variant | " + " | ".join(f"step {m}" for m in marks) + " | max gap to bf16 | final val loss | step ms |")
    print("|---|" + "---:|" * (len(marks) + 3))
    ref = smoothed(runs["bf16"]["losses"])
    for name, r in runs.items():
        curve = smoothed(r["losses"])
        gap = max(abs(a - b) for a, b in zip(curve, ref))
        res = r["result"]
        ms = 1000 * res.train_seconds / max(res.final_step - res.start_step, 1)
        print(f"| {name} | " + " | ".join(f"{curve[m - 1]:.4f}" for m in marks)
              + f" | {gap:.4f} | {res.val_loss:.5f} | {ms:.1f} |")


def plot(path: str, all_runs: dict[str, dict[str, dict]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(all_runs), figsize=(6 * len(all_runs), 4), squeeze=False)
    for ax, (preset, runs) in zip(axes[0], all_runs.items()):
        for name, r in runs.items():
            ax.plot(range(1, len(r["losses"]) + 1), smoothed(r["losses"]), label=name, lw=1)
        ax.set(xlabel="step", ylabel=f"train loss (mean of {SMOOTH} steps)", title=preset)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main() -> None:
    args = parse_args()
    print("# fp8 matmuls (current scaling) vs bf16 vs fp32, one CPU device: numerics only")
    all_runs = {}
    for preset in args.presets:
        all_runs[preset] = {name: run(preset, name, ov, args.steps) for name, ov in VARIANTS.items()}
        table(preset, all_runs[preset], args.steps)
    if args.plot:
        plot(args.plot, all_runs)


if __name__ == "__main__":
    main()
