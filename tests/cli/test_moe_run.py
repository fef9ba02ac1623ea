"""A tiny MoE run through the command line: `jaxsys train` (its end-of-train sample included),
then `jaxsys sample` and `jaxsys eval` on the checkpoint, with the loss-free bias on and off.
With the bias on, eval's loss must be the loss of the run's parameters *with its trained bias*
(and differ from the loss with a zero bias: the bias really moved the routing). The rate is
large (0.5 against router scores near 1 / X) so that the bias decides the routing; over an odd
number of steps it cannot have come back to zero."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.data import batches as batches_lib
from jaxsys.data.corpus import load_corpus
from jaxsys.inference.load import load_run
from jaxsys.model import loss as loss_lib
from jaxsys.model import moe
from tests.cli.test_bad_inputs import TINY, cli

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.dispatch=capacity", "train.steps=3",
       "checkpoint.every=3", "checkpoint.async_save=false", "train.eval_batches=1", "logging.sample_tokens=4"]


# Without the bias the run has an empty model state (what every dense run has): --runslow.
@pytest.mark.parametrize("rate", [0.5, pytest.param(0.0, marks=pytest.mark.slow)], ids=["bias", "no-bias"])
def test_moe_run_trains_samples_and_evaluates(capsys, tmp_path, rate):
    run = tmp_path / "run"
    code, out, err = cli(capsys, ["train", *TINY, *MOE, f"model.moe.bias_update_rate={rate}", f"run_dir={run}"])
    assert code == 0, err
    assert "-" * 60 in out  # the end-of-train sample printed
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0, err
    assert out.startswith("ROMEO:")
    code, out, err = cli(capsys, ["eval", "--run-dir", str(run), "--json"])
    assert code == 0, err
    result = json.loads(out)

    loaded = load_run(run, log=lambda _: None)
    assert (moe.BIAS in loaded.model_state) == (rate > 0)
    corpus = load_corpus(loaded.cfg.data)
    batch = batches_lib.global_batch(corpus.val, loaded.cfg.train.seed, 0, "val", loaded.cfg.train.batch_size,
                                     loaded.cfg.model.seq_len, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    loss = jax.jit(lambda state: loss_lib.loss(loaded.model, loaded.params, batch, None, state))
    assert result["loss"] == pytest.approx(float(loss(loaded.model_state)), abs=1e-6)
    if rate > 0:
        bias = jax.tree_util.tree_leaves(loaded.model_state)
        assert max(float(np.abs(b).max()) for b in bias) > 0.1  # large: it decides the routing
        zero = jax.tree_util.tree_map(jnp.zeros_like, loaded.model_state)
        assert abs(float(loss(zero)) - result["loss"]) > 1e-4
