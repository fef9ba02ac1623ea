"""Context parallelism equals one device: loss and gradients of the whole model, and parameters
after a few train steps, for every kind, zigzag and contiguous layouts, alone and with data,
fsdp and tensor, on 8 simulated devices (asymmetric meshes among them).

The zigzag layout reorders the tokens and targets and gives the model their positions, so
matching the one-device run also shows that the reordered sequence gives the same loss.

Tolerance as tests/equivalence/test_tensor_parallel.py: 1e-6 relative on the loss (a few
float32 ulp at 5.5: the one-device reference itself moves by 2.9e-6 between XLA builds) and
2e-6 absolute on gradients; 2e-5 on parameters after 3 AdamW steps (test_parallel.py).
"""

import jax
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.parallel.context import check_context
from tests.equivalence.test_pipeline import check_equal_to_one_device
from tests.helpers import (layout, loss_and_grads, losses_and_params_after_steps, max_abs_diff,
                           one_device_reference, tiny_cfg)

MODEL = {"gpt2": ("model.num_heads=8",),  # multi-head, learned positions
         "llama": ("model.num_heads=8", "model.family=llama", "model.num_kv_heads=4")}  # GQA, RoPE

# (family, kind, mesh overrides, load_balance); data=1 unless the mesh says otherwise.
CASES = [
    ("gpt2", "ring", ("mesh.context=8",), True),
    ("llama", "ring", ("mesh.context=4", "mesh.tensor=2"), True),
    ("llama", "ring", ("mesh.context=2", "mesh.tensor=4"), True),  # the asymmetric twin
    ("gpt2", "ring", ("mesh.context=2", "mesh.fsdp=4"), True),  # the explicit ZeRO-3 sync around it
    ("gpt2", "all-gather", ("mesh.context=4", "mesh.data=2"), True),
    ("llama", "all-gather", ("mesh.context=8",), False),
    ("llama", "ulysses", ("mesh.context=4", "mesh.data=2"), True),
    ("gpt2", "ulysses", ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2"), True),
    ("gpt2", "ring", ("mesh.context=4", "mesh.fsdp=2"), False),
    ("llama", "ring", ("mesh.context=2", "mesh.data=2", "mesh.fsdp=2"), True),
    ("gpt2", "all-gather", ("mesh.context=2", "mesh.tensor=4"), True),
    ("llama", "ulysses", ("mesh.context=2", "mesh.data=4"), False),
]
_SLOW = {2, 5, 7} | set(range(8, len(CASES)))  # the default run: one case per kind and axis


def _cfg(kind: str, mesh: tuple[str, ...], load_balance: bool, *model: str):
    return tiny_cfg("mesh.data=1", *mesh, *model, f"context_parallel.kind={kind}",
                    f"context_parallel.load_balance={load_balance}")


@pytest.mark.parametrize("family,kind,mesh,load_balance", [
    pytest.param(*c, marks=pytest.mark.slow if i in _SLOW else ()) for i, c in enumerate(CASES)])
def test_loss_and_grads_equal_one_device(family, kind, mesh, load_balance):
    params, batch, ref_loss, ref_grads = one_device_reference(*MODEL[family])
    s = layout(_cfg(kind, mesh, load_balance, *MODEL[family]))
    assert s.mesh.devices.size == 8 and s.mesh.shape["context"] > 1
    loss, grads = loss_and_grads(s, params, batch)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
    assert max_abs_diff(grads, ref_grads) < 2e-6
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3


@pytest.mark.parametrize("kind,mesh", [
    pytest.param("ring", ("mesh.context=4", "mesh.data=2"), marks=pytest.mark.slow),
    ("ulysses", ("mesh.context=2", "mesh.fsdp=4"))])
def test_parameters_after_steps_equal_one_device(kind, mesh):
    ref_losses, ref_params = losses_and_params_after_steps("mesh.data=1", *MODEL["llama"])
    losses, params = losses_and_params_after_steps(
        "mesh.data=1", *mesh, *MODEL["llama"], f"context_parallel.kind={kind}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert losses[-1] < losses[0]  # it trained
    assert max_abs_diff(params, ref_params) < 2e-5


@pytest.mark.parametrize("overrides,message", [
    (("mesh.context=4", "model.seq_len=12"), "does not split into 2 × mesh.context chunks"),
    (("mesh.context=8", "context_parallel.kind=ulysses", *MODEL["llama"]), "not divisible by mesh.context=8"),
    (("mesh.context=2", "mesh.tensor=4", "mesh.sequence_parallel=true"), "set mesh.sequence_parallel=false"),
    (("mesh.context=2", "context_parallel.kind=all-gather", "model.attention=pallas"), "set model.attention=xla"),
    (("mesh.context=2", "mesh.pipe=2", "model.num_layers=2", "pipeline.microbatches=2"),
     "use context_parallel.kind=all-gather or ulysses with a pipeline"),
])
def test_bad_context_layouts_are_refused_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message):
        layout(tiny_cfg("mesh.data=1", *overrides))


@pytest.mark.parametrize("schedule,kind,axes", [
    ("1f1b", "all-gather", ("mesh.data=2", "mesh.context=2")),  # pipe=2 × data=2 × context=2
    pytest.param("zb-h1", "ulysses", ("mesh.data=1", "mesh.context=4"),
                 marks=pytest.mark.slow),
])
def test_pipeline_with_context_equals_one_device(schedule, kind, axes):
    """The pipeline's stages run context-parallel attention on each device's share of the
    sequence, at its zigzag positions; loss and gradients equal one device."""
    check_equal_to_one_device(schedule, 2, 2, *axes, f"context_parallel.kind={kind}")


def test_the_ring_refuses_cudnn_which_returns_no_lse():
    """(On this CPU machine setup() refuses cudnn first; the context check alone says why.)"""
    cfg = tiny_cfg("mesh.data=1", "mesh.context=2", "model.attention=cudnn")
    with pytest.raises(ConfigError, match="does not return"):
        check_context(cfg, {"pipe": 1, "data": 1, "fsdp": 1, "context": 2, "tensor": 1})
