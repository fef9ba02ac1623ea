"""Checkpoints: resume equals an uninterrupted run; restore onto other meshes; clear errors."""

import json

import jax
import numpy as np
import pytest

from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import ConfigError, apply_overrides
from jaxsys.parallel.rules import with_shardings
from jaxsys.train.loop import TrainingError, train
from jaxsys.train.state import abstract_state, init_state
from tests.helpers import layout, max_abs_diff, tiny_cfg

QUIET = ("logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0")


def run_cfg(run_dir, steps, *extra):
    # decay_steps is fixed so the 10-step run follows the same schedule as the 20-step run.
    return tiny_cfg("mesh.data=1", f"train.steps={steps}", "checkpoint.every=5", "train.eval_every=10",
                    "lr_schedule.kind=cosine", "lr_schedule.warmup_steps=3", "lr_schedule.decay_steps=20",
                    "checkpoint.async_save=true", f"run_dir={run_dir}", *QUIET, *extra)


def test_resume_equals_uninterrupted_run(tmp_path):
    devices = jax.devices()[:1]
    full = train(run_cfg(tmp_path / "full", 20), devices)
    first = train(run_cfg(tmp_path / "split", 10), devices)
    second = train(run_cfg(tmp_path / "split", 20), devices)
    assert (first.start_step, second.start_step) == (0, 10)
    # Bitwise on CPU: the same program, the same batches (a function of step) and restored state.
    assert first.losses + second.losses == full.losses
    assert len(full.losses) == 20 and full.losses[0] != full.losses[-1]
    assert max_abs_diff(jax.device_get(second.state.params), jax.device_get(full.state.params)) == 0.0
    assert second.val_loss == full.val_loss
    # checkpoint.keep=2 (tiny preset): of the saves at 5, 10, 15, 20 only the last two remain.
    assert sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()) == [15, 20]


def test_resume_with_a_different_model_is_refused(tmp_path):
    devices = jax.devices()[:1]
    train(run_cfg(tmp_path, 2), devices)
    with pytest.raises(ConfigError, match="model.embed_dim=32, but this run has model.embed_dim=64"):
        train(run_cfg(tmp_path, 4, "model.embed_dim=64"), devices)


@pytest.mark.parametrize("target", [("mesh.data=2", "mesh.fsdp=4"), ("mesh.data=1",)])
def test_checkpoint_from_fsdp8_restores_on_other_meshes(tmp_path, target):
    src = layout(tiny_cfg("mesh.data=1", "mesh.fsdp=8"))
    state = init_state(src, seed=3)
    manager = ckpt.make_manager(tmp_path, src.cfg.checkpoint)
    ckpt.save(manager, 7, state)
    manager.wait_until_finished()

    dst = layout(tiny_cfg(*target))
    step, restored = ckpt.restore(manager, with_shardings(abstract_state(dst), dst.state_sharding))
    assert step == 7
    wq = restored.params["layers"]["attn"]["wq"]
    assert wq.sharding == dst.state_sharding.params["layers"]["attn"]["wq"]
    assert wq.sharding != state.params["layers"]["attn"]["wq"].sharding
    assert max_abs_diff(jax.device_get(restored), jax.device_get(state)) == 0.0


def test_partial_save_is_never_restored(tmp_path):
    s = layout(tiny_cfg("mesh.data=1"))
    state = init_state(s, seed=0)
    manager = ckpt.make_manager(tmp_path, s.cfg.checkpoint)
    ckpt.save(manager, 4, state)
    manager.wait_until_finished()
    # What a save killed midway leaves behind: Orbax's temporary directory for step 8.
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234").mkdir()
    fresh = ckpt.make_manager(tmp_path, s.cfg.checkpoint)
    assert fresh.latest_step() == 4
    step, _ = ckpt.restore(fresh, with_shardings(abstract_state(s), s.state_sharding))
    assert step == 4


def test_restore_without_checkpoint_raises(tmp_path):
    cfg = apply_overrides(tiny_cfg("mesh.data=1"), [])
    manager = ckpt.make_manager(tmp_path, cfg.checkpoint)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        ckpt.restore(manager, None)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    # A learning rate of 1e30 blows the weights up within a few steps; then every step is skipped.
    cfg = run_cfg(tmp_path, 40, "optimizer.lr=1e30", "lr_schedule.kind=constant", "lr_schedule.warmup_steps=0",
                  "optimizer.grad_clip=0", "checkpoint.every=1", "train.max_consecutive_skips=3")
    with pytest.raises(TrainingError, match=r"3 steps in a row up to step \d+ had a non-finite loss"):
        train(cfg, jax.devices()[:1])
    assert any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_a_poisoned_step_is_skipped_and_counted(tmp_path):
    devices = jax.devices()[:1]
    clean = train(run_cfg(tmp_path / "a", 4, "checkpoint.every=100"), devices)
    poisoned = train(run_cfg(tmp_path / "b", 4, "checkpoint.every=100", "faults.nan_steps=3"), devices)
    assert np.isnan(poisoned.losses[2]) and poisoned.losses[:2] == clean.losses[:2]
    # Step 3 changed nothing, so step 4 sees step 2's parameters: it differs from the clean run.
    assert np.isfinite(poisoned.losses[3]) and poisoned.losses[3] != clean.losses[3]
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in rows if "skipped" in r}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert [r["skipped_total"] for r in rows if "skipped_total" in r][-1] == 1.0
    with pytest.raises(TrainingError, match="2 steps in a row up to step 3"):
        train(run_cfg(tmp_path / "c", 6, "faults.nan_steps=2,3", "train.max_consecutive_skips=2"), devices)


def test_resume_false_never_touches_existing_checkpoints(tmp_path):
    devices = jax.devices()[:1]
    train(run_cfg(tmp_path, 2), devices)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds checkpoints and checkpoint.resume=false"):
        train(run_cfg(tmp_path, 2, "checkpoint.resume=false", "model.embed_dim=64"), devices)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
