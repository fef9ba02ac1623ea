"""Experiment trackers beside TensorBoard: Weights & Biases and SwanLab (`logging.trackers`).

Each is an optional extra (``pip install -e ".[wandb]"``, ``".[swanlab]"``) behind the same
`write(step, values)` / `close()` as `jaxsys.train.metrics.MetricWriter`, and the loop writes to
all of them. `logging.tracker_mode=offline` (the default) needs no network or account: the run
is written into the run directory (`<run_dir>/wandb/offline-run-*`, `<run_dir>/swanlog/`) and
can be uploaded later (`wandb sync <dir>`, `swanlab sync <dir>`). Only process 0 tracks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from jaxsys import config as config_lib
from jaxsys.config import Config, ConfigError


def check_available(cfg: Config) -> None:
    """A tracker whose package is missing is a `ConfigError` naming the extra (before any compile)."""
    for name in cfg.logging.trackers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.trackers includes {name!r} but the {name} package is not "
                              f"installed: pip install -e \".[{name}]\" (or pip install {name}).")


class WandbTracker:
    """A Weights & Biases run in `<run_dir>/wandb/` (offline: `offline-run-<time>-<id>/`)."""

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb
        g = cfg.logging
        self._run = wandb.init(project=g.tracker_project, name=run_dir.name, dir=str(run_dir),
                               mode="offline" if g.tracker_mode == "offline" else "online",
                               config=config_lib.to_dict(cfg),
                               settings=wandb.Settings(console="off", silent=True))

    def write(self, step: int, values: dict[str, Any]) -> None:
        self._run.log({k: float(v) for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        self._run.finish()


class SwanlabTracker:
    """A SwanLab run logged under `<run_dir>/swanlog/run-<time>-<id>/` (SwanLab ≥ 0.10's API).

    SwanLab prints its notices on stdout, where `logging.format=json` keeps only JSON: they are
    sent to stderr; its copying of the terminal into the run is off."""

    def __init__(self, cfg: Config, run_dir: Path):
        import swanlab
        g = cfg.logging
        with contextlib.redirect_stdout(sys.stderr):
            self._run = swanlab.init(project=g.tracker_project, name=run_dir.name,
                                     log_dir=str(run_dir / "swanlog"),
                                     mode="offline" if g.tracker_mode == "offline" else "online",
                                     config=config_lib.to_dict(cfg),
                                     settings=swanlab.Settings(terminal={"proxy_type": "none"}))

    def write(self, step: int, values: dict[str, Any]) -> None:
        self._run.log({k: float(v) for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self._run.finish()


def make_trackers(cfg: Config, run_dir: Path) -> list[Any]:
    """One tracker per name in `logging.trackers`, in order."""
    kinds = {"wandb": WandbTracker, "swanlab": SwanlabTracker}
    return [kinds[name](cfg, Path(run_dir)) for name in cfg.logging.trackers]


class Sinks:
    """Writes each row of metrics to every sink (the JSONL + TensorBoard writer, then trackers)."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, step: int, values: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
