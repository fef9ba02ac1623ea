"""A tiny MoE model through the real train step and loop: the loss-free bias and parameters are
the same with gradient accumulation, the moe_* metrics reach metrics.jsonl, and a checkpoint
brings the bias back exactly."""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxsys.checkpoint import manager as ckpt
from jaxsys.model import moe
from jaxsys.train.loop import train
from jaxsys.train.state import init_state
from tests.helpers import host_batch, layout, max_abs_diff, tiny_cfg

MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.bias_update_rate=0.01",
       "model.moe.z_loss_coef=0.001", "model.moe.dispatch=capacity", "mesh.data=1", "model.num_layers=1")
QUIET = ("logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0")


def _two_steps(*overrides):
    from jaxsys.train.step import compile_train_step
    # optimizer.eps=1e-4 as in tests/equivalence/test_pipeline.py: AdamW turns the rounding noise of
    # gradients that are zero in exact arithmetic (the key bias) into whole lr-sized steps.
    s = layout(tiny_cfg(*MOE, "train.batch_size=8", "optimizer.eps=1e-4", *overrides))
    state, step = init_state(s, seed=0), compile_train_step(s)
    for i in range(2):
        batch = jax.device_put(host_batch(s.cfg, i), s.batch_sharding)
        state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics)


def test_grad_accum_gives_the_same_bias_update_and_parameters():
    one, m1 = _two_steps("train.grad_accum=1")
    two, m2 = _two_steps("train.grad_accum=2")
    bias = jax.tree_util.tree_leaves(one.model_state)
    assert bias and min(float(np.abs(b).max()) for b in bias) > 0.005  # every layer's bias moved
    for b in bias:
        np.testing.assert_allclose(b.sum(-1), 0.0, atol=1e-7)  # zero mean
    assert max_abs_diff(one.model_state, two.model_state) == 0.0  # the same signs of the same loads
    assert max_abs_diff(one.params, two.params) < 1e-6
    for key in ("moe_load_imbalance", "moe_dropped_fraction"):
        assert abs(m1[key] - m2[key]) < 1e-6, key


def test_training_logs_moe_metrics_and_resume_restores_the_bias(tmp_path):
    cfg = tiny_cfg(*MOE, *QUIET, "train.steps=4", "checkpoint.every=2", "checkpoint.async_save=false",
                   f"run_dir={tmp_path}")
    result = train(cfg, jax.devices()[:1])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_imbalance", "moe_dropped_fraction"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert all(r["moe_load_imbalance"] >= 1.0 and 0.0 <= r["moe_dropped_fraction"] < 1.0 for r in steps)
    assert any("val_loss" in r for r in rows) and not any("moe_aux_loss" in r for r in rows if "val_loss" in r)

    s = layout(cfg)
    manager = ckpt.make_manager(tmp_path, cfg.checkpoint, read_only=True)
    from jaxsys.parallel.rules import with_shardings
    from jaxsys.train.state import abstract_state
    step, restored = ckpt.restore(manager, with_shardings(abstract_state(s), s.state_sharding), 4)
    manager.close()
    assert step == 4
    final = jax.device_get(result.state.model_state)
    assert max(float(np.abs(b).max()) for b in jax.tree_util.tree_leaves(final)) > 0.005
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(jax.device_get(restored.model_state))
    assert max_abs_diff(jax.device_get(restored.model_state), final) == 0.0
    assert moe.BIAS in final
