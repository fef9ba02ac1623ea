"""The MoE layer against a per-token float64 reference, its routers, slots, balancing terms,
the interleaved / scanned layer layouts, and the config refusals."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError, ModelConfig, MoEConfig, apply_overrides, validate
from jaxsys.config.presets import tiny
from jaxsys.model import moe, transformer
from jaxsys.model.loss import objective


def _cfg(family="gpt2", **moe_kw) -> ModelConfig:
    kw = dict(num_experts=4, top_k=2, expert_dim=24)
    kw.update(moe_kw)
    return ModelConfig(family=family, vocab_size=64, seq_len=16, num_layers=2, embed_dim=32, num_heads=4,
                       moe=MoEConfig(**kw)).resolved()


def _layer(cfg: ModelConfig, B=3, seed=0, router_scale=40.0):
    """An MoeMlp's parameters (router scaled up so routing is far from uniform, experts so the
    output is of order 1) and an input."""
    x = jax.random.normal(jax.random.key(seed), (B, cfg.seq_len, cfg.embed_dim), jnp.float32)
    variables = jax.jit(moe.MoeMlp(cfg).init)(jax.random.key(seed + 1), x)
    params = dict(nn.meta.unbox(variables["params"]))
    params["router"] = params["router"] * router_scale
    # Outputs of order 1, so that the tolerances below mean something (init gives ~1e-3).
    params = {k: v if k == "router" else jax.tree_util.tree_map(lambda a: a * 5, v) for k, v in params.items()}
    return params, x


def _apply(cfg, variables, x, mutable=False):
    """The layer, jitted (op by op, its many small ops each compile: slower)."""
    fn = lambda v, x: moe.MoeMlp(cfg).apply(v, x, mutable=list(mutable) if mutable else False)  # noqa: E731
    return jax.jit(fn)(variables, x)


def _gelu_tanh(h):
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


def _silu(h):
    return h / (1 + np.exp(-h))


def _expert(cfg, p, e, v):
    if cfg.family == "llama":
        h = _silu(v @ p["w_gate"][e]) * (v @ p["w_in"][e])
    else:
        h = _gelu_tanh(v @ p["w_in"][e])
    return h @ p["w_out"][e]


def _shared(cfg, p, v):
    s = p["shared"]
    if cfg.family == "llama":
        return (_silu(v @ s["wi_gate"]) * (v @ s["wi_up"])) @ s["wo"]
    return _gelu_tanh(v @ s["wi"] + s["bi"]) @ s["wo"] + s["bo"]


def reference(cfg: ModelConfig, params, x, capacity=None, bias=None):
    """Each token through its own top-k experts, in float64 Python loops; with `capacity`, GShard's
    priority (all first choices of a row in token order, then the second ones, ...) decides which
    assignments drop. Returns (y [B, T, D], kept [B, T, I] bool)."""
    m = cfg.moe
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    logits = x @ p["router"]
    if m.router == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    select = scores if bias is None else scores + np.asarray(bias, np.float64)
    choice = np.argsort(-select, axis=-1, kind="stable")[..., :m.top_k]
    kept = np.ones(choice.shape, bool)
    if capacity is not None:
        for b in range(B):
            used = np.zeros(m.num_experts, int)
            for i in range(m.top_k):
                for t in range(T):
                    e = choice[b, t, i]
                    kept[b, t, i] = used[e] < capacity
                    used[e] += 1
    y = np.zeros_like(x)
    for b in range(B):
        for t in range(T):
            w = scores[b, t, choice[b, t]]
            w = w / w.sum() * (m.routed_scale if m.router == "sigmoid" else 1.0)
            for i in range(m.top_k):
                if kept[b, t, i]:
                    y[b, t] += w[i] * _expert(cfg, p, choice[b, t, i], x[b, t])
            if m.num_shared_experts:
                y[b, t] += _shared(cfg, p, x[b, t])
    return y, kept


CASES = {
    "gpt2-softmax": ("gpt2", {}),
    "llama-sigmoid-shared": ("llama", dict(router="sigmoid", routed_scale=2.5, num_shared_experts=1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dropless_equals_per_token_reference(name):
    family, kw = CASES[name]
    cfg = _cfg(family, dispatch="dropless", **kw)
    params, x = _layer(cfg)
    y = _apply(cfg, {"params": params}, x)
    ref, _ = reference(cfg, params, x)
    assert float(np.abs(ref).max()) > 0.3
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-6, rtol=1e-5)


def test_capacity_mode_equals_reference_when_ample_and_drops_what_it_predicts():
    ample = _cfg("llama", dispatch="capacity", capacity_factor=2.0)  # U = T: nothing can drop
    params, x = _layer(ample)
    assert moe.capacity(ample.moe, ample.seq_len) == ample.seq_len
    ref, _ = reference(ample, params, x)
    np.testing.assert_allclose(np.asarray(_apply(ample, {"params": params}, x)), ref,
                               atol=2e-6, rtol=1e-5)

    tight = dataclasses.replace(ample, moe=dataclasses.replace(ample.moe, capacity_factor=1.0))
    U = moe.capacity(tight.moe, tight.seq_len)
    assert U == 8
    ref, kept = reference(tight, params, x, capacity=U)
    assert 0 < (~kept).sum() < kept.size // 2  # some assignments drop, most do not
    y, sown = _apply(tight, {"params": params}, x, mutable=(moe.STATS,))
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-6, rtol=1e-5)
    logits = jnp.einsum("btd,dx->btx", x, params["router"])
    expert, _, _ = moe.route(logits, None, tight.moe)
    slots = moe.assign_slots(expert, tight.moe.num_experts, U)
    np.testing.assert_array_equal(np.asarray(slots) < U, kept)
    assert float(sown[moe.STATS]["dropped"][0]) == pytest.approx((~kept).mean())


def test_bias_moves_selection_not_weights():
    cfg = _cfg("gpt2", router="sigmoid", bias_update_rate=0.1)
    params, x = _layer(cfg)
    bias = jnp.asarray([0.5, -0.5, 0.25, -0.25], jnp.float32)
    y = _apply(cfg, {"params": params, moe.BIAS: {"bias": bias}}, x)
    ref, _ = reference(cfg, params, x, bias=bias)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-6, rtol=1e-5)
    unbiased, _ = reference(cfg, params, x)
    assert float(np.abs(unbiased - ref).max()) > 0.1  # the bias changed some choices


def _plain_balance(logits_BTX, top, router):
    """Switch / GShard per sequence, written out: mean_b X · Σ_x f_bx P_bx, f counted in loops
    from the top-k choices `top` [B, T, k] (constants: not differentiable)."""
    B, T, X = logits_BTX.shape
    k = top.shape[-1]
    counts = np.zeros((B, X))
    for b in range(B):
        for t in range(T):
            for e in top[b, t]:
                counts[b, e] += 1
    scores = jax.nn.softmax(logits_BTX) if router == "softmax" else jax.nn.sigmoid(logits_BTX)
    probs = scores if router == "softmax" else scores / scores.sum(-1, keepdims=True)
    return jnp.mean(X * jnp.sum(jnp.asarray(counts / (T * k)) * probs.mean(1), -1))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_and_z_loss_values_and_gradients_match_the_formulas(router):
    cfg = _cfg("gpt2", router=router, aux_loss_coef=0.3, z_loss_coef=0.07)
    params, x = _layer(cfg, router_scale=5.0)

    def module(w_DX):
        _, sown = moe.MoeMlp(cfg).apply({"params": {**params, "router": w_DX}}, x, mutable=[moe.STATS])
        return moe.penalty(sown[moe.STATS], cfg.moe)

    w = params["router"]
    top = np.argsort(-np.asarray(x @ w), axis=-1, kind="stable")[..., :cfg.moe.top_k]  # both routers are monotone

    def plain(w_DX):
        logits = x @ w_DX
        z = jnp.mean(jnp.square(jnp.log(jnp.sum(jnp.exp(logits), -1))))
        return 0.3 * _plain_balance(logits, top, router) + 0.07 * z

    assert float(module(w)) == pytest.approx(float(plain(w)), rel=1e-5)
    g_module, g_plain = jax.grad(module)(w), jax.grad(plain)(w)
    assert float(jnp.abs(g_plain).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(g_module), np.asarray(g_plain), atol=1e-6, rtol=1e-4)


def test_bias_update_rule_on_hand_made_loads():
    rate = 0.01
    bias = jnp.zeros(4)
    # Signs (-1, +1, +1, +1) sum to 2: re-centred to (-1.5, 0.5, 0.5, 0.5) · rate.
    new = moe.bias_step(bias, jnp.asarray([0.7, 0.1, 0.1, 0.1]), rate)
    np.testing.assert_allclose(np.asarray(new), rate * np.array([-1.5, 0.5, 0.5, 0.5]), atol=1e-9)
    # An expert exactly at the mean load does not move (sign 0); per layer along the last axis.
    loads = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    new = moe.bias_step(jnp.asarray([[0.1, 0.0, 0.0, -0.1], [0.0] * 4]), loads, rate)
    np.testing.assert_allclose(np.asarray(new), [[0.09, 0.0, 0.0, -0.09], [0.0] * 4], atol=1e-9)
    np.testing.assert_allclose(np.asarray(new).mean(-1), 0.0, atol=1e-9)
    state = {moe.BIAS: {"layer_1": {"moe": {"bias": bias}}}}
    stats = {"layer_1": {"moe": {"load": (jnp.asarray([0.7, 0.1, 0.1, 0.1]),)}}}
    out = moe.update_bias(state, stats, rate)
    np.testing.assert_allclose(np.asarray(out[moe.BIAS]["layer_1"]["moe"]["bias"]),
                               rate * np.array([-1.5, 0.5, 0.5, 0.5]), atol=1e-9)


def test_interleaving_and_scan_give_the_unrolled_model():
    base = dataclasses.replace(_cfg("llama", first_dense_layers=1, every=2, bias_update_rate=0.01),
                               num_layers=4, num_kv_heads=2)
    unrolled = dataclasses.replace(base, scan_layers=False)
    tree, _ = transformer.abstract_params(unrolled)
    assert ["moe" in tree[f"layer_{i}"] for i in range(4)] == [False, True, False, True]
    assert ["mlp" in tree[f"layer_{i}"] for i in range(4)] == [True, False, True, False]

    scanned = dataclasses.replace(base, scan_layers=True)
    sp, state = jax.jit(transformer.init_variables, static_argnums=0)(scanned, jax.random.key(0))
    assert [n for n, _, _ in transformer.segments(scanned)] == ["dense_layers", "moe_layers", "tail"]
    up, ustate = transformer.unstack_tree(scanned, sp), {moe.BIAS: transformer.unstack_tree(scanned, state[moe.BIAS])}
    assert jax.tree_util.tree_structure(up) == jax.tree_util.tree_structure(tree)
    assert sorted(ustate[moe.BIAS]) == ["layer_1", "layer_3"]
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1)}
    run = jax.jit(lambda c, *a: objective(transformer.Transformer(c), *a, None), static_argnums=0)
    l_scan, (ce_scan, _) = run(scanned, sp, state, batch)
    l_unr, (ce_unr, _) = run(unrolled, up, ustate, batch)
    assert float(l_scan - ce_scan) > 0  # the balancing terms are in the objective
    assert float(l_scan) == pytest.approx(float(l_unr), abs=2e-6)


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny(), ["model.moe.num_experts=4", *overrides]))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refusals_name_the_key_and_the_fix():
    validate(apply_overrides(tiny(), ["model.moe.num_experts=4"]))  # the defaults work
    assert "top_k ≤ 4" in _refused("model.moe.top_k=5")
    assert "model.moe.top_k must be ≥ 1" in _refused("model.moe.top_k=0")
    # 0.1 · 16 · 2 / 4 = 0.8 tokens per expert and sequence
    assert "raise it to ≥ 0.125" in _refused("model.moe.dispatch=capacity", "model.moe.capacity_factor=0.1")
    assert "model.moe.every must be ≥ 1" in _refused("model.moe.every=0")
    assert "first_dense_layers < 2" in _refused("model.moe.first_dense_layers=2")
    for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
        assert f"model.moe.{key} must be" in _refused(f"model.moe.{key}=-0.1")
    assert "model.moe.expert_dim must be ≥ 0" in _refused("model.moe.expert_dim=-1")
    assert "mesh.pipe=1" in _refused("mesh.pipe=2")
