"""Vocabulary-tiled cross-entropy (`model.loss_vocab_tiles`): the loss and every gradient equal
the untiled ones, with a loss mask, on one device and under tensor + sequence parallelism
(each device tiles its vocabulary shard), while the compiled program no longer holds
[B, T, V] float32 logits.

Reference for the loss: float64 numpy cross-entropy of the untiled model's logits.
"""

import jax
import numpy as np
import pytest

from jaxsys.config import ConfigError, apply_overrides, validate
from jaxsys.model.loss import loss
from jaxsys.model.transformer import Transformer, init_params
from tests.helpers import host_batch, layout, loss_and_grads, max_abs_diff, one_device_reference, tiny_cfg

TILES = "model.loss_vocab_tiles=4"  # V = 256: tiles of 64 (32 per device at tensor=2)


def _masked_batch(cfg):
    batch = {k: np.asarray(v) for k, v in host_batch(cfg).items()}
    rng = np.random.default_rng(0)
    batch["loss_mask"] = (rng.random(batch["targets"].shape) < 0.6).astype(np.int32)
    return batch


def _compiled(model, params, batch):
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss(model, p, b, None)))
    return fn.lower(params, batch).compile()


def _float64_loss(model, params, batch):
    logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    return float((ce * mask).sum() / mask.sum())


def test_tiled_loss_and_grads_equal_untiled_with_loss_mask():
    cfg = tiny_cfg("model.vocab_size=2048")  # logits [16, 16, V] outweigh the tiny activations
    params = init_params(cfg.model, jax.random.key(0))
    batch = _masked_batch(cfg)
    plain, tiled = Transformer(cfg.model), Transformer(apply_overrides(cfg, [TILES]).model)
    c_plain, c_tiled = _compiled(plain, params, batch), _compiled(tiled, params, batch)
    (l0, g0), (l1, g1) = c_plain(params, batch), c_tiled(params, batch)

    ref = _float64_loss(plain, params, batch)
    unmasked = _float64_loss(plain, params, {**batch, "loss_mask": np.ones_like(batch["loss_mask"])})
    assert abs(ref - unmasked) > 1e-3  # the mask really changes the loss
    assert abs(float(l1) - ref) < 2e-6 and abs(float(l0) - ref) < 2e-6
    assert max_abs_diff(g0, g1) < 1e-6
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g0)) > 1e-3

    # The tiled program holds one [B, T, V/4] tile, not [B, T, V] logits and their gradient.
    B, T = batch["inputs"].shape
    whole_logits = B * T * cfg.model.vocab_size * 4
    saved = c_plain.memory_analysis().temp_size_in_bytes - c_tiled.memory_analysis().temp_size_in_bytes
    assert saved >= whole_logits, (saved, whole_logits)


def test_tiled_loss_under_tensor_and_sequence_parallel():
    params, batch, ref_loss, ref_grads = one_device_reference()
    s = layout(tiny_cfg("mesh.data=2", "mesh.tensor=2", "mesh.sequence_parallel=true", TILES))
    loss_, grads = loss_and_grads(s, params, batch)
    assert abs(loss_ - ref_loss) < 2e-6
    assert max_abs_diff(grads, ref_grads) < 1e-6


@pytest.mark.parametrize("overrides, needle", [
    (["model.loss_vocab_tiles=3"], "divide the 256 vocabulary entries"),
    (["model.loss_vocab_tiles=-4"], "must be 0"),
    (["model.loss_vocab_tiles=128", "mesh.tensor=4", "model.num_heads=8"], "mesh.tensor=4"),
])
def test_bad_loss_vocab_tiles_is_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(tiny_cfg(*overrides))


@pytest.mark.slow
def test_tiled_loss_in_the_last_pipeline_stage():
    """The pipeline's last stage (`loss.head_loss`) tiles too: gpipe over 2 stages with tiles
    equals the untiled one-device model (loss and every gradient, 2e-6 as test_pipeline)."""
    from tests.equivalence.test_pipeline import check_equal_to_one_device
    check_equal_to_one_device("gpipe", 2, 4, "mesh.data=1", TILES)
