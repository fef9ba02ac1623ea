"""ZeRO stages 0–3 on the fsdp axis: the same numbers as one device, and each stage shards
exactly what it says (moments from 1, gradients from 2, parameters at 3).

Tolerances as tests/equivalence/test_parallel.py: 2e-6 on loss/gradients, 2e-5 on parameters
after 3 AdamW steps (Adam's division by sqrt(v) amplifies float32 reordering slightly).
"""

import jax
import numpy as np
import pytest

from jaxsys.train.state import init_state
from tests.helpers import (host_batch, layout, loss_and_grads, losses_and_params_after_steps,
                           max_abs_diff, tiny_cfg)

_REF: dict = {}


def reference():
    if not _REF:
        s = layout(tiny_cfg("mesh.data=1"))
        params = jax.device_get(init_state(s, seed=0).params)
        batch = host_batch(s.cfg)
        _REF["one"] = (params, batch, *loss_and_grads(s, params, batch))
    return _REF["one"]


FSDP8, HYBRID = ("mesh.data=1", "mesh.fsdp=8"), ("mesh.data=2", "mesh.fsdp=4")


@pytest.mark.parametrize("stage,mesh", [(0, FSDP8), (1, HYBRID), (2, FSDP8), (3, HYBRID),
                                        pytest.param(2, HYBRID, marks=pytest.mark.slow)])
def test_loss_and_grads_equal_one_device(stage, mesh):
    params, batch, ref_loss, ref_grads = reference()
    s = layout(tiny_cfg(*mesh, f"mesh.zero_stage={stage}"))
    loss, grads = loss_and_grads(s, params, batch)
    assert abs(loss - ref_loss) < 2e-6
    assert max_abs_diff(grads, ref_grads) < 2e-6


@pytest.mark.parametrize("stage,params_split,moments_split,grads_split", [
    (0, False, False, False), (1, False, True, False), (2, False, True, True), (3, True, True, True)])
def test_each_stage_shards_what_it_says(stage, params_split, moments_split, grads_split):
    s = layout(tiny_cfg("mesh.data=1", "mesh.fsdp=8", f"mesh.zero_stage={stage}"))
    shape = s.abstract_params["layers"]["attn"]["wq"].shape  # [layers, embed, heads, head_dim]
    D = s.cfg.model.embed_dim
    moments = s.state_sharding.opt_state.inner_state[1][0]  # apply_if_finite(chain(clip, adamw))
    for sharding, split in ((s.state_sharding.params, params_split), (moments.mu, moments_split),
                            (moments.nu, moments_split), (s.grad_sharding, grads_split)):
        assert sharding["layers"]["attn"]["wq"].shard_shape(shape)[1] == (D // 8 if split else D)


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_params_after_steps_equal_one_device(stage):
    """3 steps with 2 microbatches (the accumulator is constrained to the ZeRO-2 layout)."""
    results = {"one": losses_and_params_after_steps("mesh.data=1", "train.grad_accum=2"),
               "zero": losses_and_params_after_steps("mesh.data=1", "mesh.fsdp=8", f"mesh.zero_stage={stage}",
                                                     "train.grad_accum=2")}
    np.testing.assert_allclose(results["zero"][0], results["one"][0], atol=2e-6)
    assert max_abs_diff(results["zero"][1], results["one"][1]) < 2e-5
    assert results["one"][0][0] != results["one"][0][-1]  # the steps did change the loss
