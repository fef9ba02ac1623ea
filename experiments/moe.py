"""Mixture of experts on the shipped Shakespeare, CPU: what sparsity buys and what it costs.

Three tables and one plot, every row one `jaxsys.train.loop.train` run of the `shakespeare`
preset (3 layers, D=128, context 64, batch 16) for `--steps` steps, on one CPU device:

1. Dense vs MoE at equal *active* parameters: the dense MLP (hidden 4·D = 512) against 8 experts
   of hidden 256 with top-2 routing (2 × 256 = 512 active per token) — val loss, tokens/s, total
   and active parameters.
2. Capacity factor 1.0 / 1.25 / 2.0 against dropless: the mean fraction of routed assignments
   dropped, val loss, step time.
3. Load balance over training with DeepSeek-V3's sigmoid router, dropless: max / mean expert
   load (the worst layer) with the Switch auxiliary loss, with the auxiliary-loss-free bias, and
   with neither (the plot: `--plot`, default docs/moe_load_balance.png).

    python experiments/moe.py                       # ~15 minutes on 2 cores
    python experiments/moe.py --steps 200 --plot /tmp/load.png
    python experiments/moe.py --sections balance    # the load-balance table and plot only

The numbers are a tiny model on 1 MB of text: the MoE rows show the mechanics (drops, balance,
the cost of routing on a CPU), not what sparsity gives at scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_dim=256"]
CAPACITY = ["model.moe.dispatch=capacity"]
BIAS_RATE = 1e-2  # DeepSeek-V3 used 1e-3 over far more steps; 300 steps need a faster bias
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0",
         "logging.quiet=true", "checkpoint.every=0"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "moe_load_balance.png"))
    ap.add_argument("--sections", nargs="*", default=["dense", "capacity", "balance"],
                    choices=["dense", "capacity", "balance"], help="which tables to measure")
    return ap.parse_args()


def run(name: str, overrides: list[str], steps: int) -> dict:
    """Train one configuration in a fresh run directory; its result and metrics.jsonl rows."""
    from jaxsys.config import apply_overrides, presets
    from jaxsys.model.flops import active_params
    from jaxsys.model.params import count_params
    from jaxsys.model.transformer import abstract_params
    from jaxsys.train.loop import train

    run_dir = Path(tempfile.mkdtemp(prefix=f"moe-{name}-"))
    cfg = apply_overrides(presets.shakespeare(), [*QUIET, f"train.steps={steps}", "train.eval_every=0",
                                                 f"lr_schedule.warmup_steps={min(30, steps // 4)}", f"run_dir={run_dir}",
                                                 *overrides])
    result = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shapes, specs = abstract_params(cfg.model)
    return {"name": name, "result": result, "rows": rows, "total": count_params(shapes),
            "active": active_params(cfg.model, shapes, specs)}


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


def step_ms(res) -> float:
    return 1000 * res.train_seconds / max(res.final_step - res.start_step, 1)


def main() -> None:
    args = parse_args()
    print(f"# Mixture of experts on Shakespeare, {args.steps} steps of the shakespeare preset, 1 CPU device\n")

    if "dense" in args.sections or "capacity" in args.sections:
        moe = run("moe-dropless", MOE, args.steps)
    if "dense" in args.sections:
        dense = run("dense", [], args.steps)
        print("## Dense vs MoE at equal active parameters\n")
        print("| model | params (total) | params (active / token) | val loss | tokens/s | step ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, r in (("dense MLP 512", dense), ("MoE 8 × 256, top-2, dropless", moe)):
            res = r["result"]
            print(f"| {label} | {r['total']:,} | {r['active']:,} | {res.val_loss:.4f} | "
                  f"{res.tokens_per_sec:,.0f} | {step_ms(res):.1f} |")
    if "capacity" in args.sections:
        print("\n## Capacity factor (softmax router, auxiliary loss 0.01)\n")
        print("| dispatch | tokens dropped (mean over steps) | val loss | step ms |")
        print("|---|---:|---:|---:|")
        for cf in (1.0, 1.25, 2.0):
            r = run(f"cap{cf}", [*MOE, *CAPACITY, f"model.moe.capacity_factor={cf}"], args.steps)
            res = r["result"]
            print(f"| capacity {cf} | {mean_of(r['rows'], 'moe_dropped_fraction'):.2%} | {res.val_loss:.4f} | "
                  f"{step_ms(res):.1f} |")
        res = moe["result"]
        print(f"| dropless | {mean_of(moe['rows'], 'moe_dropped_fraction'):.2%} | {res.val_loss:.4f} | "
              f"{step_ms(res):.1f} |")
    if "balance" not in args.sections:
        return

    print("\n## Load balance, sigmoid router (DeepSeek-V3's), dropless (max / mean expert load of the worst layer)\n")
    balanced = [*MOE, "model.moe.router=sigmoid", "model.moe.aux_loss_coef=0"]
    variants = {
        "auxiliary loss 0.01": run("aux", [*MOE, "model.moe.router=sigmoid"], args.steps),
        f"loss-free bias {BIAS_RATE:g}": run("bias", [*balanced, f"model.moe.bias_update_rate={BIAS_RATE}"], args.steps),
        "neither": run("neither", balanced, args.steps),
    }
    print("| balancing | imbalance, first 10% of steps | last 10% | val loss |")
    print("|---|---:|---:|---:|")
    for label, r in variants.items():
        rows = [x for x in r["rows"] if "moe_load_imbalance" in x]
        k = max(len(rows) // 10, 1)
        print(f"| {label} | {mean_of(rows[:k], 'moe_load_imbalance'):.2f} | "
              f"{mean_of(rows[-k:], 'moe_load_imbalance'):.2f} | {r['result'].val_loss:.4f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in variants.items():
        rows = [x for x in r["rows"] if "moe_load_imbalance" in x]
        ax.plot([x["step"] for x in rows], [x["moe_load_imbalance"] for x in rows], label=label)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="max / mean expert load", yscale="log",
           title="Expert load over training (8 experts, top-2, sigmoid router, Shakespeare)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
