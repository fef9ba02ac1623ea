"""Experiment trackers: a missing optional package is one ConfigError, before anything is built.
(Their offline files are checked on a real run in tests/cli/test_run_outputs.py.)"""

import importlib.util

import pytest

from jaxsys.config import ConfigError, apply_overrides
from jaxsys.config.presets import tiny
from jaxsys.train import trackers
from jaxsys.train.loop import train


@pytest.mark.parametrize("name", ["wandb", "swanlab"])
def test_a_missing_tracker_package_names_its_extra_before_anything_runs(name, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    cfg = apply_overrides(tiny(), [f"logging.trackers={name}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf'the {name} package is not installed: pip install -e "\.\[{name}\]"'):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sinks_write_every_row_to_every_sink():
    class Sink:
        def __init__(self):
            self.rows, self.closed = [], False

        def write(self, step, values):
            self.rows.append((step, values))

        def close(self):
            self.closed = True

    a, b = Sink(), Sink()
    sinks = trackers.Sinks([a, b])
    sinks.write(3, {"loss": 1.5})
    sinks.close()
    assert a.rows == b.rows == [(3, {"loss": 1.5})] and a.closed and b.closed
