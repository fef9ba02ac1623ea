"""Bad files, bad numbers, bad disks, and kill -9: errors that name the problem, and fallbacks."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import chaos_resume
from jaxsys.checkpoint import integrity
from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import ConfigError
from jaxsys.parallel.rules import with_shardings
from jaxsys.train import rollback
from jaxsys.train.loop import TrainingError, train
from jaxsys.train.state import abstract_state, init_state
from tests.helpers import layout, max_abs_diff, tiny_cfg

QUIET = ("logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0")


def saved_steps(tmp_path, steps=(2, 4), *overrides):
    """Checkpoints of distinct states at `steps` in tmp_path, with manifests; returns the setup
    and the states by step."""
    s = layout(tiny_cfg("mesh.data=1", *overrides))
    manager = ckpt.make_manager(tmp_path, s.cfg.checkpoint)
    states, base = {}, init_state(s, seed=0)
    for step in steps:
        states[step] = jax.tree_util.tree_map(  # distinct floats, one compile; dtypes kept
            lambda x: x + step if np.issubdtype(x.dtype, np.floating) else x, base)
        ckpt.save(manager, step, states[step])
    manager.wait_until_finished()
    assert ckpt.write_missing_manifests(tmp_path) == list(steps)
    manager.close()
    return s, states


def biggest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "default").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [(_truncate, "truncated"), (_flip_bit, "corrupted data")])
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage, message):
    s, states = saved_steps(tmp_path)
    victim = biggest_data_file(tmp_path / "checkpoints" / "4")
    damage(victim)
    logged = []
    step, reports = ckpt.select_resume_step(tmp_path, logged.append)
    assert step == 2 and reports == logged and len(reports) == 1
    assert f"Checkpoint step 4 ({tmp_path / 'checkpoints' / '4'}) is unusable: file {victim}" in reports[0]
    assert message in reports[0] and "trying the previous checkpoint" in reports[0]
    # Set aside (never deleted), with the reason; Orbax no longer sees it.
    assert (tmp_path / "rejected_checkpoints" / "4").is_dir()
    assert "unusable" in (tmp_path / "rejected_checkpoints" / "4.reason.txt").read_text()
    manager = ckpt.make_manager(tmp_path, s.cfg.checkpoint)
    assert manager.latest_step() == 2
    _, restored = ckpt.restore(manager, with_shardings(abstract_state(s), s.state_sharding), step)
    assert max_abs_diff(jax.device_get(restored), jax.device_get(states[2])) == 0.0
    assert max_abs_diff(jax.device_get(states[2].params), jax.device_get(states[4].params)) > 0


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    saved_steps(tmp_path)
    (tmp_path / "checkpoints" / "4" / integrity.MANIFEST).unlink()  # killed before the manifest
    step, reports = ckpt.select_resume_step(tmp_path, lambda _: None)
    assert step == 2 and "no jaxsys_manifest.json: the save did not finish" in reports[0]


def test_training_resumes_from_the_previous_good_checkpoint(tmp_path, capsys):
    cfg = tiny_cfg("mesh.data=1", "train.steps=4", "checkpoint.every=2", "train.eval_every=0",
                   f"run_dir={tmp_path}", *QUIET)
    train(cfg, jax.devices()[:1])
    _flip_bit(biggest_data_file(tmp_path / "checkpoints" / "4"))
    capsys.readouterr()
    again = train(tiny_cfg("mesh.data=1", "train.steps=4", "checkpoint.every=2", "train.eval_every=0",
                           f"run_dir={tmp_path}", *QUIET), jax.devices()[:1])
    out = capsys.readouterr().out
    assert "Checkpoint step 4" in out and "corrupted data" in out
    assert "Resumed from checkpoint step 2" in out and again.start_step == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 3, 4]
    assert losses[2:4] == losses[4:6]  # the steps re-run from step 2 give the same losses
    assert integrity.has_manifest(tmp_path / "checkpoints" / "4")  # the re-saved step is whole


def test_checkpoint_of_another_model_shape_names_the_parameter(tmp_path):
    saved_steps(tmp_path, (2,))
    other = layout(tiny_cfg("mesh.data=1", "model.embed_dim=64"))
    manager = ckpt.make_manager(tmp_path, other.cfg.checkpoint)
    with pytest.raises(ConfigError, match=r"parameter 'params.embed' has shape \(256, 32\) in the "
                                          r"checkpoint but \(256, 64\) in this model"):
        ckpt.check_compatible(manager, 2, abstract_state(other))
    deeper = layout(tiny_cfg("mesh.data=1", "model.num_layers=3"))
    with pytest.raises(ConfigError, match=r"'params.layers.attn.bk' has shape \(2, 4, 8\) in the "
                                          r"checkpoint but \(3, 4, 8\)"):
        ckpt.check_compatible(manager, 2, abstract_state(deeper))
    ckpt.check_compatible(manager, 2, abstract_state(layout(tiny_cfg("mesh.data=1"))))  # same: fine


def test_trainer_refuses_another_shape_without_config_json(tmp_path):
    saved_steps(tmp_path, (2,))
    assert not (tmp_path / "config.json").exists()  # only the checkpoint's own metadata can tell
    cfg = tiny_cfg("mesh.data=1", "model.embed_dim=64", "train.steps=4", f"run_dir={tmp_path}", *QUIET)
    with pytest.raises(ConfigError, match=r"'params.embed' has shape \(256, 32\) in the checkpoint "
                                          r"but \(256, 64\)"):
        train(cfg, jax.devices()[:1])


def test_no_free_space_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    cfg = tiny_cfg("mesh.data=1", "train.steps=4", f"run_dir={tmp_path}", *QUIET)
    with pytest.raises(ConfigError, match=r"has 0.0 MiB free, but checkpoints need about \d+\.\d MiB .*"
                                          "checkpoint.keep=2"):
        train(cfg, jax.devices()[:1])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_unwritable_run_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = tiny_cfg("mesh.data=1", f"run_dir={tmp_path / 'file' / 'run'}", *QUIET)
    with pytest.raises(ConfigError, match="is not writable"):
        train(cfg, jax.devices()[:1])


def test_batch_index_moves_past_rolled_back_steps():
    assert [rollback.batch_index([], k) for k in range(3)] == [0, 1, 2]
    log = [{"step": 4, "data_index": 7, "from_step": 7}]
    assert [rollback.batch_index(log, k) for k in range(2, 8)] == [2, 3, 7, 8, 9, 10]
    log.append({"step": 2, "data_index": 20, "from_step": 9})  # a later rollback supersedes
    assert [rollback.batch_index(log, k) for k in range(1, 6)] == [1, 20, 21, 22, 23]


def _curve(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # last value per step


def test_rollback_skips_the_bad_batches_and_resumes_reproducibly(tmp_path, capsys):
    def cfg(run_dir, steps):
        return tiny_cfg("mesh.data=1", f"train.steps={steps}", "checkpoint.every=2", "train.eval_every=0",
                        "train.on_nan=rollback", "faults.nan_batches=5,6", "train.max_consecutive_skips=2",
                        f"run_dir={run_dir}", *QUIET)
    devices = jax.devices()[:1]
    full = train(cfg(tmp_path / "a", 10), devices)
    out = capsys.readouterr().out
    assert "Rolled back from step 7 to checkpoint step 4; continuing with batch 7" in out
    assert int(jax.device_get(full.state.step)) == 10
    assert np.isnan(full.losses[5]) and np.isnan(full.losses[6]) and np.all(np.isfinite(full.losses[7:]))
    assert json.loads((tmp_path / "a" / rollback.LOG).read_text()) == [
        {"step": 4, "data_index": 7, "from_step": 7}]
    # The checkpoint saved at step 6 belongs to the abandoned timeline: set aside, not reused.
    assert (tmp_path / "a" / "rejected_checkpoints" / "6").is_dir()
    curve = _curve(tmp_path / "a")
    assert np.isfinite(curve[5]) and curve[5] != full.losses[4]  # step 5 re-run on batch 7
    # Stopped after the rollback and resumed: the same curve and parameters, bit for bit.
    train(cfg(tmp_path / "b", 8), devices)
    resumed = train(cfg(tmp_path / "b", 10), devices)
    assert resumed.start_step == 8 and _curve(tmp_path / "b") == curve
    assert max_abs_diff(jax.device_get(resumed.state.params), jax.device_get(full.state.params)) == 0.0


@pytest.mark.slow  # two more training runs (~60 s on the shared 2-core VM)
def test_rollbacks_are_bounded_and_stop_is_the_default(tmp_path):
    devices = jax.devices()[:1]
    # nan_steps poisons step numbers, so the replay after a rollback fails again.
    base = ("mesh.data=1", "train.steps=10", "checkpoint.every=2", "train.eval_every=0",
            "faults.nan_steps=5,6", "train.max_consecutive_skips=2", *QUIET)
    with pytest.raises(TrainingError, match=r"already rolled back 1 times \(train.max_rollbacks=1"):
        train(tiny_cfg(*base, "train.on_nan=rollback", "train.max_rollbacks=1", f"run_dir={tmp_path / 'a'}"),
              devices)
    with pytest.raises(TrainingError, match=r"2 steps in a row up to step 6 .* or set train.on_nan=rollback"):
        train(tiny_cfg(*base, f"run_dir={tmp_path / 'b'}"), devices)
    with pytest.raises(ConfigError, match="train.on_nan=rollback needs checkpoints"):
        train(tiny_cfg(*base, "train.on_nan=rollback", "checkpoint.every=0", f"run_dir={tmp_path / 'c'}"),
              devices)


@pytest.mark.slow  # long: the default run stays under its time budget
def test_chaos_three_kill_9_match_the_uninterrupted_run(tmp_path):
    r = chaos_resume.run(kills=3, seed=1, overrides=["train.steps=30"], workdir=str(tmp_path))
    assert r["kills"] == 3 and r["restarts"] == 3
    assert r["corrupt_checkpoints_used"] == 0
    assert r["final_params_max_diff"] == 0.0 and r["loss_curve_max_diff"] == 0.0
    assert r["rerun_loss_max_diff"] == 0.0
