"""Loss curves from `<run_dir>/metrics.jsonl`: `jaxsys plot` and the end-of-run `curves.png`.

One figure, two panels sharing the step axis: train loss (solid) and val loss (dashed, dots)
above, the learning rate below; one colour per run. Needs matplotlib (the optional ``plot``
extra: ``pip install -e ".[plot]"``), drawn with its Agg backend (no display). Reads only the
JSONL files, so it works on runs from any machine. When a run directory was resumed after a
rollback a step may appear more than once; the last value written wins.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from jaxsys.config import ConfigError

INSTALL = 'pip install -e ".[plot]" (or pip install matplotlib)'


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...] sorted by step} for loss, val_loss and lr of one run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a jaxsys run directory?")
    curves: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}, "lr": {}}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill -9
        for key, points in curves.items():
            if key in row and "step" in row:
                points[int(row["step"])] = float(row[key])
    return {key: sorted(points.items()) for key, points in curves.items()}


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Draw the runs' curves into the PNG `out`; returns its path."""
    if not have_matplotlib():
        raise ConfigError(f"Plotting needs matplotlib: {INSTALL}.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(Path(d), read_curves(d)) for d in run_dirs]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, curves) in enumerate(runs):
        colour, name = colours[i % len(colours)], run_dir.name or str(run_dir)
        for key, style, label in (("loss", {"linestyle": "-"}, "train"),
                                  ("val_loss", {"linestyle": "--", "marker": "o", "markersize": 4}, "val")):
            if curves[key]:
                steps, values = zip(*curves[key])
                ax_loss.plot(steps, values, color=colour, label=f"{name} {label}", **style)
        if curves["lr"]:
            steps, values = zip(*curves["lr"])
            ax_lr.plot(steps, values, color=colour, label=name)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize="small")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    names = ", ".join(d.name or str(d) for d, _ in runs)
    ax_loss.set_title(title or (f"{names}: loss and learning rate" if len(runs) == 1 else f"Runs: {names}"))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
