"""A scaling-law sweep on the shipped Shakespeare: model sizes × token budgets, each one
`jaxsys.train.loop.train` run, then L(N, D) = E + A/N^α + B/D^β fitted as Chinchilla's third
approach does (`jaxsys.tools.scaling.fit_scaling_law`) and the compute-optimal frontier.

Every run is the `shakespeare` preset's pipeline (byte tokens, context 64, batch 16 = 1,024
tokens a step, AdamW lr 5e-3, one CPU device) with the model's depth and width changed, and
its own cosine schedule as long as its token budget (Chinchilla's point: a schedule longer
than the run overestimates the loss of the short runs). Validation loss: the mean over the
same 20 held-out batches for every run. N = non-embedding parameters.

    python experiments/scaling_laws.py            # 3 sizes × 4 budgets: 21 min on the loaded 2-core CPU
    python experiments/scaling_laws.py --quick    # 3 × 2 tiny runs: the plumbing only
    python experiments/scaling_laws.py --from-results docs/scaling_laws.json   # refit, replot

Caveats (printed at the end too): 1 MB of text, byte tokens, models of 10^4-10^6 parameters,
hyper-parameters fixed across sizes, 12 points for 5 parameters; the exponents describe this
toy, not language models at scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_STEP = 16 * 64  # the shakespeare preset's batch × context
# (layers, width, heads) per model size; steps per token budget.
# 3 sizes, not 4: on the loaded 2-core machine each run costs ~80 s of compile and set-up
# (measured 2026-12-02, load ~12), so 12 runs is what fits near the 15-minute budget.
FULL = {"sizes": [(2, 32, 2), (2, 64, 4), (3, 128, 4)], "steps": [50, 100, 200, 400]}
QUICK = {"sizes": [(1, 16, 2), (2, 32, 2), (2, 48, 3)], "steps": [15, 30]}
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0",
         "logging.quiet=true", "checkpoint.every=0", "train.eval_every=0", "train.eval_batches=20"]
CAVEATS = """Caveats of a tiny-data sweep:
- 1 MB of Shakespeare, byte-level tokens (256-symbol vocabulary): the loss floor E and the
  exponents belong to this corpus and tokenizer, not to web text with a 32k+ vocabulary.
- Token budgets stay under one epoch (the largest, 410k tokens, is ~0.4 of the ~1M training
  bytes), so no run repeats data; a sweep to larger budgets here would (Muennighoff et al.
  2023: repeated tokens are worth less, which bends the D term).
- Small N (10^4-10^6 non-embedding parameters) and short runs (50-400 steps): the warm-up and
  the early, fast part of the curve weigh a lot; Chinchilla's runs were 70M-16B parameters.
- Hyper-parameters (lr 5e-3, batch 16 × 64, AdamW, warm-up) are the same for every size and
  budget (untuned): the best learning rate depends on width (and on the budget), so the N and D
  terms carry that mis-tuning, in a direction this sweep does not measure.
- 12 points for 5 parameters: the fit is identifiable but loose (E trades off against A and
  B, alpha against A); no error bars (one seed, no bootstrap).
- N counts non-embedding parameters; the paper counts all of them (the embedding is a large
  share of these small models), which changes alpha.
- One seed per point, CPU timings on a loaded shared machine."""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 3 × 2 grid of tiny runs (the plumbing)")
    ap.add_argument("--plot", default=None, help="PNG path (default docs/scaling_laws.png; "
                                                  "/tmp/scaling_laws_quick.png with --quick)")
    ap.add_argument("--results", default=None, help="write the runs as JSON here "
                                                    "(default docs/scaling_laws.json; none with --quick)")
    ap.add_argument("--from-results", default=None, help="skip training: refit and replot these runs")
    return ap.parse_args()


def size_overrides(layers: int, width: int, heads: int) -> list[str]:
    return [f"model.num_layers={layers}", f"model.embed_dim={width}", f"model.num_heads={heads}"]


def run_one(layers: int, width: int, heads: int, steps: int) -> dict:
    """Train one size for `steps` steps with a cosine schedule of that length; its row."""
    from jaxsys.config import apply_overrides, presets
    from jaxsys.tools.scaling import non_embedding_params
    from jaxsys.train.loop import train

    run_dir = Path(tempfile.mkdtemp(prefix=f"scaling-L{layers}-D{width}-s{steps}-"))
    cfg = apply_overrides(presets.shakespeare(), [*QUIET, *size_overrides(layers, width, heads),
                                                 f"train.steps={steps}", f"run_dir={run_dir}",
                                                 f"lr_schedule.warmup_steps={max(1, min(30, steps // 10))}"])
    start = time.perf_counter()
    result = train(cfg)
    return {"layers": layers, "width": width, "N": non_embedding_params(cfg.model), "total_params": result.num_params,
            "steps": steps, "D": steps * cfg.train.batch_size * cfg.model.seq_len, "val_loss": result.val_loss,
            "seconds": time.perf_counter() - start, "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds}


def sweep(grid: dict) -> list[dict]:
    """Every size × budget, smallest first, with progress and an ETA after each run."""
    jobs = [(size, steps) for size in grid["sizes"] for steps in grid["steps"]]
    rows: list[dict] = []
    step_s: dict[tuple, float] = {}  # measured seconds per training step, per size
    t0 = time.perf_counter()
    for i, (size, steps) in enumerate(jobs):
        row = run_one(*size, steps)
        rows.append(row)
        step_s[size] = row["train_seconds"] / steps
        overhead = sum(r["seconds"] - r["train_seconds"] for r in rows) / len(rows)  # compile, data, eval
        known = max(step_s, key=lambda s: s[0] * s[1] ** 2)
        # An unseen size: scale the largest measured one by layers × width² (its FLOPs).
        est = {s: step_s.get(s, step_s[known] * s[0] * s[1] ** 2 / (known[0] * known[1] ** 2)) for s, _ in jobs}
        eta = sum(overhead + est[s] * n for s, n in jobs[i + 1:])
        print(f"[{i + 1}/{len(jobs)}] layers {size[0]} width {size[1]} (N {row['N']:,}) {steps} steps: "
              f"val {row['val_loss']:.4f} in {row['seconds']:.1f}s; elapsed {time.perf_counter() - t0:.0f}s, "
              f"ETA {eta:.0f}s", flush=True)
    return rows


def plot(rows: list[dict], fit, out: str) -> None:
    """Iso-loss contours of the fit over (N, D) with the runs and the frontier; loss against D
    per size; N_opt(C) and D_opt(C)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    N = np.array([r["N"] for r in rows], float)
    D = np.array([r["D"] for r in rows], float)
    L = np.array([r["val_loss"] for r in rows], float)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    n_grid = np.logspace(np.log10(N.min()) - 0.5, np.log10(N.max()) + 0.5, 200)
    d_grid = np.logspace(np.log10(D.min()) - 0.5, np.log10(D.max()) + 0.5, 200)
    NN, DD = np.meshgrid(n_grid, d_grid)
    cs = ax1.contour(NN, DD, fit.predict(NN, DD), levels=12, cmap="viridis", linewidths=0.8)
    ax1.clabel(cs, fmt="%.2f", fontsize=7)
    sc = ax1.scatter(N, D, c=L, cmap="viridis", edgecolor="k", zorder=3)
    fig.colorbar(sc, ax=ax1, label="val loss (nats/byte)")
    C = np.logspace(np.log10(6 * n_grid[0] * d_grid[0]), np.log10(6 * n_grid[-1] * d_grid[-1]), 100)
    n_opt, d_opt = fit.compute_optimal(C)
    inside = (n_opt >= n_grid[0]) & (n_opt <= n_grid[-1]) & (d_opt >= d_grid[0]) & (d_opt <= d_grid[-1])
    ax1.plot(n_opt[inside], d_opt[inside], "r-", lw=2, label="compute-optimal (C = 6ND)")
    for c in np.logspace(np.log10((6 * N * D).min()), np.log10((6 * N * D).max()), 4):
        ax1.plot(n_grid, c / (6 * n_grid), "k:", lw=0.6)
    ax1.set(xscale="log", yscale="log", xlim=(n_grid[0], n_grid[-1]), ylim=(d_grid[0], d_grid[-1]),
            xlabel="N (non-embedding parameters)", ylabel="D (training tokens)",
            title="fitted iso-loss contours, runs, frontier (dotted: iso-FLOP)")
    ax1.legend(fontsize=8, loc="upper right")
    for n in sorted(set(N)):
        sel = N == n
        line, = ax2.plot(D[sel], L[sel], "o", label=f"N = {int(n):,}")
        ax2.plot(d_grid, fit.predict(n, d_grid), "-", color=line.get_color(), lw=0.8)
    ax2.set(xscale="log", xlabel="D (training tokens)", ylabel="val loss (nats/byte)",
            title=f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax2.legend(fontsize=8)
    ax3.plot(C, n_opt, label=f"N_opt ∝ C^{fit.a:.2f}")
    ax3.plot(C, d_opt, label=f"D_opt ∝ C^{fit.b:.2f}")
    ax3.scatter(6 * N * D, N, s=8, c="C0", alpha=0.5)
    ax3.scatter(6 * N * D, D, s=8, c="C1", alpha=0.5)
    ax3.set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)", ylabel="N or D",
            title="compute-optimal frontier (dots: the runs)")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nplot: {out}")


def report(rows: list[dict]):
    """Print the runs table and the fit against the paper's; returns the fit."""
    from jaxsys.tools.scaling import CHINCHILLA, fit_scaling_law

    print("\n| layers | width | N (non-embedding) | params (total) | steps | D (tokens) | val loss | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['width']} | {r['N']:,} | {r['total_params']:,} | {r['steps']} | "
              f"{r['D']:,} | {r['val_loss']:.4f} | {r['seconds']:.1f} |")
    t = time.perf_counter()
    fit = fit_scaling_law([r["N"] for r in rows], [r["D"] for r in rows], [r["val_loss"] for r in rows])
    print(f"\nfit ({fit.starts} L-BFGS starts, Huber δ=1e-3 on log residuals, {time.perf_counter() - t:.1f}s; "
          f"objective {fit.objective:.3g}):\n")
    ref = CHINCHILLA
    ref_a, ref_b = ref["beta"] / (ref["alpha"] + ref["beta"]), ref["alpha"] / (ref["alpha"] + ref["beta"])
    print("| | E | A | B | α | β | a = β/(α+β) | b = α/(α+β) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| this sweep | {fit.E:.3f} | {fit.A:.4g} | {fit.B:.4g} | {fit.alpha:.3f} | {fit.beta:.3f} | "
          f"{fit.a:.3f} | {fit.b:.3f} |")
    print(f"| Chinchilla (approach 3) | {ref['E']} | {ref['A']} | {ref['B']} | {ref['alpha']} | {ref['beta']} | "
          f"{ref_a:.3f} | {ref_b:.3f} |")
    worst = max(abs(fit.predict(r["N"], r["D"]) - r["val_loss"]) for r in rows)
    print(f"\nlargest |fit - measured| over the runs: {worst:.4f} nats")
    return fit


def main() -> None:
    args = parse_args()
    import jax
    # The runs of one size share their init and eval programs (only the train step's schedule
    # differs): JAX's persistent cache compiles those once per size.
    jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "jaxsys-scaling-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.from_results:
        rows = json.loads(Path(args.from_results).read_text())
    else:
        grid = QUICK if args.quick else FULL
        n = len(grid["sizes"]) * len(grid["steps"])
        print(f"# Scaling-law sweep on Shakespeare: {len(grid['sizes'])} sizes × {len(grid['steps'])} budgets "
              f"= {n} runs, 1 CPU device", flush=True)
        rows = sweep(grid)
        results = args.results or (None if args.quick else str(ROOT / "docs" / "scaling_laws.json"))
        if results:
            Path(results).write_text(json.dumps(rows, indent=1) + "\n")
            print(f"runs: {results}")
    fit = report(rows)
    default_plot = "/tmp/scaling_laws_quick.png" if args.quick else str(ROOT / "docs" / "scaling_laws.png")
    plot(rows, fit, args.plot or default_plot)
    print("\n" + CAVEATS)


if __name__ == "__main__":
    main()
