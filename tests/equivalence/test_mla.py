"""Multi-head latent attention (`model.attention_kind=mla`) laid out over `tensor` (heads split,
latents whole on every device), with and without sequence parallelism, equals one device; and
a tiny MLA model trains.

Tolerances as tests/equivalence/test_tensor_parallel.py: loss 1e-6 relative, gradients 2e-6
absolute (float32, partial sums over heads added in another order), and per leaf 2e-6 of the
leaf's largest gradient.
"""

import jax
import numpy as np
import pytest

from tests.helpers import (layout, loss_and_grads, losses_and_params_after_steps, max_abs_diff,
                           one_device_reference, tiny_cfg)

# tiny (D = 32, T = 16, 2 layers) as a DeepSeek-style llama: 8 heads (tensor=8 divides them),
# query latent 12, K/V latent 16, no-RoPE 4 + RoPE 4 per query/key head, values of 6.
MLA = ("model.family=llama", "model.num_heads=8", "model.attention_kind=mla", "model.q_lora_rank=12",
       "model.kv_lora_rank=16", "model.qk_nope_dim=4", "model.qk_rope_dim=4", "model.v_head_dim=6")
LAYOUTS = {
    "tensor=2": ("mesh.data=1", "mesh.tensor=2"),
    "data=2,tensor=4": ("mesh.data=2", "mesh.tensor=4"),
    "fsdp=2,tensor=2,data=2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
}
CASES = [("data=2,tensor=4", True),
         pytest.param("tensor=2", False, marks=pytest.mark.slow),
         pytest.param("data=2,tensor=4", False, marks=pytest.mark.slow),
         pytest.param("fsdp=2,tensor=2,data=2", True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,sp", CASES)
def test_mla_loss_and_grads_equal_one_device(name, sp):
    params, batch, ref_loss, ref_grads = one_device_reference(*MLA)
    s = layout(tiny_cfg(*LAYOUTS[name], *MLA, f"mesh.sequence_parallel={sp}"))
    loss, grads = loss_and_grads(s, params, batch)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
    assert max_abs_diff(grads, ref_grads) < 2e-6
    # The query path's gradients are small at init (near-uniform attention: wq_a's ~8e-5,
    # q_norm's ~5e-6), so each leaf is also held to 2e-6 of its own size (measured ≤ 6.3e-7).
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert np.abs(g - r).max() <= 2e-6 * np.abs(r).max()
    attn = grads["layers"]["attn"]
    assert set(attn) == {"wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo"}
    assert min(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(attn)) > 1e-6  # each one trains


def test_tiny_mla_model_trains():
    losses, _ = losses_and_params_after_steps(*MLA, steps=4)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
