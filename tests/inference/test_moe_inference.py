"""MoE models through inference: the loss-free bias (the model state) travels with the
parameters into the KV-cache generator, whose greedy output must equal the recompute sampler's
(the model's plain forward pass over the sequence so far), scanned and unrolled, both routers.

The models are made "lively" as in tests/inference/test_decode.py (weight matrices scaled up, so
greedy decoding does not repeat one token) and the router scaled further, so that the experts'
scores are far apart; the bias is random and large (N(0, 1) against scores in (0, 1)), so it
changes which experts are chosen, and `test_the_bias_changes_the_greedy_output` checks that it does.
Both paths route dropless (decoding always does; see `jaxsys.model.moe`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError, MoEConfig
from jaxsys.config.presets import tiny
from jaxsys.inference.decode import Generator, Request
from jaxsys.inference.quantize import QuantizedWeight, quantize_params
from jaxsys.inference.sampler import SamplingParams
from jaxsys.inference.sampling import generate_recompute
from jaxsys.model import moe
from jaxsys.model.params import path_str
from jaxsys.model.transformer import Transformer, init_variables

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [3, 17, 99, 42, 7]
NEW = 8
# (family, router, scan_layers); the first runs by default (the scanned bias tree is the one
# `Generator` must unstack), the rest with --runslow: each costs ~15 s of compiles.
CASES = [("llama", "sigmoid", True)]
SLOW_CASES = [("gpt2", "softmax", False), ("gpt2", "sigmoid", True), ("llama", "softmax", False)]


def _gain(name: str) -> float:
    if name.endswith("router"):
        return 30.0  # scores far apart: an ulp of difference between the paths flips no choice
    if ".moe." in f".{name}" or ".mlp." in f".{name}":
        return 6.0
    return 2.0 if ".attn." in f".{name}" else 3.0


@functools.lru_cache(maxsize=None)
def _setup(family: str, router: str, scan: bool):
    """(model, lively params, model state with a random bias) of a 2-layer MoE model."""
    cfg = dataclasses.replace(tiny().model, family=family, scan_layers=scan, moe=MoEConfig(
        num_experts=4, top_k=2, expert_dim=32, router=router, dispatch="dropless", bias_update_rate=0.01))

    @jax.jit
    def make(key):
        params, state = init_variables(cfg, key)

        def lively(path, x, k):
            name = path_str(path)
            axes = x.ndim - (name.split(".")[0] in ("layers", "moe_layers", "dense_layers"))
            if axes >= 2:
                return x * _gain(name)
            return x + 0.03 * jax.random.normal(k, x.shape)

        leaves, tree = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        params = tree.unflatten([lively(p, x, k) for (p, x), k in zip(leaves, keys)])
        bias = jax.tree_util.tree_map(lambda b: jax.random.normal(jax.random.fold_in(key, 2), b.shape),
                                      state[moe.BIAS])
        return params, {moe.BIAS: bias}

    params, state = make(jax.random.key(0))
    assert jax.tree_util.tree_leaves(state)  # one bias per MoE layer
    return Transformer(cfg), params, state


def _recompute(model, params, state) -> list[int]:
    out = generate_recompute(model, params, jnp.asarray(PROMPT), jax.random.key(0), max_new_tokens=NEW,
                             temperature=0.0, model_state=state)
    return np.asarray(out)[len(PROMPT):].tolist()


def _check_generator_equals_recompute(family: str, router: str, scan: bool) -> None:
    model, params, state = _setup(family, router, scan)
    [c] = Generator(model, params, model_state=state).generate([Request(PROMPT, NEW, GREEDY)])
    want = _recompute(model, params, state)
    assert c.tokens == want
    assert len(set(want)) > 2  # lively: not one repeated token


@pytest.mark.parametrize("family,router,scan", CASES)
def test_generator_greedy_equals_recompute_with_the_bias(family, router, scan):
    _check_generator_equals_recompute(family, router, scan)


@pytest.mark.slow
@pytest.mark.parametrize("family,router,scan", SLOW_CASES)
def test_generator_greedy_equals_recompute_with_the_bias_slow(family, router, scan):
    _check_generator_equals_recompute(family, router, scan)


def test_the_bias_changes_the_greedy_output():
    """Without this the equality above could not tell a dropped bias from the real one."""
    model, params, state = _setup(*CASES[0])
    zero = jax.tree_util.tree_map(jnp.zeros_like, state)
    assert _recompute(model, params, zero) != _recompute(model, params, state)  # same shapes: no compile


def test_a_missing_bias_is_refused_clearly():
    model, params, _ = _setup(*CASES[0])
    with pytest.raises(ConfigError, match="model_state"):
        Generator(model, params)


def test_int8_quantizes_the_experts_per_expert_and_keeps_the_router_float():
    model, params, _ = _setup(*CASES[0])  # llama, scanned: [G, X, D, F] stacked expert weights
    q = jax.jit(lambda p: quantize_params(p, model.cfg))(params)  # one compile, not hundreds of ops
    layer = q["moe_layers"]["moe"]
    X, D, F = 4, model.cfg.embed_dim, 32
    assert isinstance(layer["w_in"], QuantizedWeight) and layer["w_in"].scale.shape == (2, X, 1, F)
    assert isinstance(layer["w_gate"], QuantizedWeight) and layer["w_out"].scale.shape == (2, X, 1, D)
    assert not isinstance(layer["router"], QuantizedWeight)
    # Each expert's output channel has its own scale: the dequantized weights are within scale / 2.
    w = np.asarray(params["moe_layers"]["moe"]["w_in"])
    err = np.abs(np.asarray(layer["w_in"].dequantize()) - w)
    assert (err <= np.asarray(layer["w_in"].scale) / 2 + 1e-7).all()
