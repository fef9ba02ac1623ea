"""Packed documents on a mesh equal one device: loss and gradients of a batch whose rows hold
several documents (segment ids, positions restarting at each document, the loss mask), across
the tensor, sequence-parallel, ZeRO, Pallas, context (every kind) and pipeline layouts, and
with gradient accumulation, on 8 simulated devices.

The reference is the one-device loss of the same packed batch; `tests/model/test_packing.py`
shows that one-device loss is each document's own. Tolerance as the other equivalence tests
(1e-6 relative on the loss, 2e-6 absolute on gradients).
"""

import jax
import numpy as np
import pytest

from jaxsys.train.state import init_state
from jaxsys.model.loss import normalize_loss_mask
from tests.equivalence.test_data_parallel import explicit_loss_and_grads
from tests.equivalence.test_pipeline import pipe_cfg, run_pipeline
from tests.helpers import host_batch, layout, loss_and_grads, max_abs_diff, tiny_cfg

LLAMA = ("model.family=llama", "model.num_heads=8", "model.num_kv_heads=4")


def packed_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The shipped-data batch of `cfg` with each row cut into 1-4 documents at random places:
    segment ids 0, 1, ..., positions from 0 in each document, loss mask 0 on each document's
    last token."""
    batch = dict(host_batch(cfg))
    B, T = batch["inputs"].shape
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        for cut in rng.choice(np.arange(1, T), size=rng.integers(0, 4), replace=False):
            seg[b, cut:] += 1
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = np.broadcast_to(np.arange(T), (B, T))
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    last = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((B, 1), bool)], axis=1)
    batch.update(segment_ids=seg, positions=(idx - first).astype(np.int32), loss_mask=(~last).astype(np.int32))
    return batch


def _reference(*model):
    one = layout(tiny_cfg("mesh.data=1", *model))
    params = jax.device_get(init_state(one, seed=0).params)
    batch = packed_batch(one.cfg)
    assert batch["segment_ids"].max() > 0 and batch["loss_mask"].min() == 0
    ref_loss, ref_grads = loss_and_grads(one, params, batch)
    unpacked = {k: v for k, v in batch.items() if k in ("inputs", "targets")}
    # Packing changes the gradients far beyond the tolerance: the comparison can fail.
    assert max_abs_diff(loss_and_grads(one, params, unpacked)[1], ref_grads) > 1e-3
    return params, batch, ref_loss, ref_grads


LAYOUTS = [
    ((), ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),
    pytest.param((), ("mesh.tensor=4", "mesh.data=2", "mesh.sequence_parallel=true"), marks=pytest.mark.slow),
    pytest.param((), ("mesh.data=2", "mesh.tensor=4", "model.attention=pallas"),  # the kernel under shard_map
                 marks=pytest.mark.slow),
    (LLAMA, ("mesh.fsdp=4", "mesh.data=2", "train.grad_accum=2")),  # weights across microbatches
    (LLAMA, ("mesh.context=4", "mesh.data=2", "context_parallel.kind=ring")),
    pytest.param((), ("mesh.context=2", "mesh.tensor=4", "context_parallel.kind=all-gather"),
                 marks=pytest.mark.slow),
    pytest.param(LLAMA, ("mesh.context=2", "mesh.fsdp=4", "context_parallel.kind=ulysses"), marks=pytest.mark.slow),
    pytest.param(LLAMA, ("mesh.context=4", "mesh.tensor=2", "context_parallel.kind=ring",
                         "model.attention=pallas"), marks=pytest.mark.slow),
    pytest.param((), ("mesh.context=8", "context_parallel.kind=ring", "context_parallel.load_balance=false"),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model,mesh", LAYOUTS)
def test_packed_loss_and_grads_equal_one_device(model, mesh):
    params, batch, ref_loss, ref_grads = _reference(*model)
    s = layout(tiny_cfg("mesh.data=1", *model, *mesh))
    assert s.mesh.devices.size == 8
    if s.cfg.train.grad_accum > 1:  # the step's accumulation and explicit sync, on its batch
        loss, grads = explicit_loss_and_grads(s, params, _weighted(batch))
    else:
        loss, grads = loss_and_grads(s, params, batch)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
    assert max_abs_diff(grads, ref_grads) < 2e-6


@pytest.mark.parametrize("mesh", [
    pytest.param(("mesh.data=2",), marks=pytest.mark.slow),
    ("mesh.data=2", "mesh.context=2", "context_parallel.kind=all-gather")])
def test_packed_pipeline_equals_one_device(mesh):
    """Per-microbatch positions and segment ids reach every stage (1F1B, 2 stages)."""
    cfg = pipe_cfg("1f1b", 2, 4, *mesh)
    one = layout(pipe_cfg("1f1b", 2, 4, "mesh.data=1", "mesh.pipe=1"))
    params = jax.device_get(init_state(one, seed=0).params)
    batch = packed_batch(one.cfg)
    ref_loss, ref_grads = loss_and_grads(one, params, batch)
    loss, grads, _, _ = run_pipeline(cfg, params, _weighted(batch))
    assert abs(loss - ref_loss) < 2e-6, (loss, ref_loss)
    assert max_abs_diff(grads, ref_grads) < 2e-6


def _weighted(batch):
    """The batch as the train step hands it on: the loss mask normalized over the whole batch."""
    return jax.device_get(normalize_loss_mask(batch))
