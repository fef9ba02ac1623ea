"""Int8 weight-only quantization: per-weight and per-matmul error bounds, bytes, logits and val
loss against float32, scan_layers and llama (GQA), refusals."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import ScopeParamShapeError

from jaxsys.config import apply_overrides
from jaxsys.config.presets import llama_1b, shakespeare, tiny
from jaxsys.data.batches import global_batch
from jaxsys.data.corpus import load_corpus
from jaxsys.inference import quantize as quantize_lib
from jaxsys.inference.quantize import (QuantizedWeight, dequantizing, param_bytes, quantize_params,
                                       quantize_weight, quantized_axes)
from jaxsys.model import hooks
from jaxsys.model.loss import mean_cross_entropy
from jaxsys.model.params import path_str
from jaxsys.model.transformer import Transformer, abstract_params, init_params
from jaxsys.train.state import init_state
from tests.helpers import layout, tiny_cfg, train_steps

EPS32 = float(np.finfo(np.float32).eps)
LLAMA = ("model.family=llama", "model.num_heads=4", "model.num_kv_heads=2")  # GQA: G = 2
VAL_TOLERANCE = 0.005  # nats per token, |int8 - fp32| val loss: 250x the measured gap, half 4 bits'


def _model_cfg(*overrides: str):
    return apply_overrides(tiny(), list(overrides)).model


@functools.lru_cache(maxsize=None)
def _random_params(*overrides: str):
    cfg = _model_cfg(*overrides)
    return cfg, jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(params, cfg, bits: int = 8):
    return quantize_params(params, cfg, bits)  # jitted: one compile instead of many eager ops


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight))


@pytest.mark.parametrize("overrides", [("model.scan_layers=false",), LLAMA], ids=["gpt2", "llama"])
def test_each_weight_and_each_matmul_is_within_the_closed_form_bound(overrides):
    cfg, params = _random_params(*overrides)
    axes = quantized_axes(cfg)
    qparams = _quantize(params, cfg)
    float_leaves = dict((path_str(p), np.asarray(w, np.float64)) for p, w in _leaves(params))
    rng = np.random.default_rng(0)
    checked = 0
    for path, q in _leaves(qparams):
        name = path_str(path)
        if not isinstance(q, QuantizedWeight):
            assert axes[name] is None
            continue
        w, contracted = float_leaves[name], axes[name]
        assert q.values.dtype == jnp.int8 and q.shape == w.shape and q.dtype == jnp.float32
        assert q.scale.shape == tuple(1 if i in contracted else n for i, n in enumerate(w.shape))
        deq = np.asarray(q.dequantize(), np.float64)
        scale = np.asarray(q.scale, np.float64)
        assert np.all(np.abs(deq - w) <= scale / 2 + 4 * EPS32 * np.abs(w)), name
        assert np.any(deq != w), f"{name}: not quantized at all"
        # x @ w contracting `contracted`: move those axes first and flatten to [C, O].
        out_axes = [i for i in range(w.ndim) if i not in contracted]
        w_CO = np.transpose(w, (*contracted, *out_axes)).reshape(-1, math.prod(w.shape[i] for i in out_axes))
        deq_CO = np.transpose(deq, (*contracted, *out_axes)).reshape(w_CO.shape)
        scale_O = np.transpose(scale, (*contracted, *out_axes)).reshape(1, -1)
        x_NC = rng.normal(size=(4, w_CO.shape[0]))
        err_NO = np.abs(x_NC @ w_CO - x_NC @ deq_CO)
        bound_NO = np.abs(x_NC).sum(1, keepdims=True) * scale_O / 2 + 4 * EPS32 * (np.abs(x_NC) @ np.abs(w_CO))
        assert np.all(err_NO <= bound_NO), name
        checked += 1
    assert checked == (14 if cfg.family == "gpt2" else 9)  # gpt2: 2 tables + 2 x 6; llama: 2 + 7 stacked


def test_the_contracted_axes_are_those_of_the_model_matmuls():
    """Written out from layers.py's einsums, independently of the module's table."""
    gpt2 = quantized_axes(_model_cfg("model.scan_layers=false"))
    assert {k: v for k, v in gpt2.items() if k.startswith("layer_0.") or "." not in k} == {
        "embed": (1,), "pos_embed": (1,),  # one scale per vocabulary row / position row
        "layer_0.attn.wq": (0,), "layer_0.attn.wk": (0,), "layer_0.attn.wv": (0,),  # D H E: D
        "layer_0.attn.wo": (0, 1),  # H E D: H and E
        "layer_0.mlp.wi": (0,), "layer_0.mlp.wo": (0,),  # D F: D; F D: F
        "layer_0.attn.bq": None, "layer_0.attn.bk": None, "layer_0.attn.bv": None, "layer_0.attn.bo": None,
        "layer_0.mlp.bi": None, "layer_0.mlp.bo": None, "layer_0.ln_attn.scale": None,
        "layer_0.ln_attn.bias": None, "layer_0.ln_mlp.scale": None, "layer_0.ln_mlp.bias": None}
    llama = quantized_axes(_model_cfg(*LLAMA))  # scan_layers: the leading L axis is kept
    assert llama == {
        "embed": (1,), "head": (0,), "ln_final.scale": None,
        "layers.attn.wq": (1,), "layers.attn.wk": (1,), "layers.attn.wv": (1,), "layers.attn.wo": (1, 2),
        "layers.mlp.wi_gate": (1,), "layers.mlp.wi_up": (1,), "layers.mlp.wo": (1,),
        "layers.ln_attn.scale": None, "layers.ln_mlp.scale": None}


@pytest.mark.parametrize("cfg", [shakespeare().model, llama_1b().model], ids=["shakespeare", "llama-1b"])
def test_quantized_parameters_take_under_three_tenths_of_the_float32_bytes(cfg):
    shapes, _ = abstract_params(cfg)
    qshapes = jax.eval_shape(lambda p: quantize_params(p, cfg), shapes)
    ratio = param_bytes(qshapes) / param_bytes(shapes)
    # int8 is 1/4; the scales and the float vectors add a little (gpt2 0.262, llama 0.250).
    assert 0.25 <= ratio <= 0.3, ratio


@functools.lru_cache(maxsize=None)
def _trained():
    """A tiny gpt2 trained on the shipped Shakespeare (host params, config)."""
    s = layout(tiny_cfg("mesh.data=1", "train.steps=60", "optimizer.lr=3e-2", "model.scan_layers=false"))
    losses, params = train_steps(s, init_state(s, seed=0), 60)
    return s.cfg, params, losses


def _val_losses_and_logits(cfg, trees: dict, batches: int = 8) -> dict:
    """{name: (mean loss over the first `batches` val batches, logits of the first batch)} of each
    parameter tree: one function traced under `dequantizing()`, which passes float parameters
    through unchanged (so the float32 tree runs the plain model)."""
    model, corpus = Transformer(cfg.model), load_corpus(cfg.data)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    val = [global_batch(corpus.val, 0, i, "val", cfg.train.batch_size, cfg.model.seq_len, one)
           for i in range(batches)]

    @jax.jit
    def loss_and_logits(p, batch):
        logits_BTV = model.apply({"params": p}, batch["inputs"])
        return mean_cross_entropy(logits_BTV, batch["targets"]), logits_BTV

    out = {}
    with hooks.installed(dequantizing()):
        for name, tree in trees.items():
            results = [loss_and_logits(tree, b) for b in val]
            out[name] = (float(np.mean([r[0] for r in results])), np.asarray(results[0][1]))
    return out


def _rel_rms(got, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(got) - ref) ** 2) / np.mean(ref ** 2)))


# Logits tolerance, as rms(int8 - fp32) / rms(fp32). A weight row's error is uniform in
# +-scale/2, rms scale/sqrt(12) = max|w| / (127 sqrt(12)), about 0.5% of the row's rms for
# Gaussian-like rows (max ~ 2-3 rms); errors of a few matmuls add in quadrature to ~1%.
# Measured: 0.8% at random init (the embedding's error, used twice, dominates), 0.09% trained;
# 4 bits give 14% at init, 1.6% trained; 3 bits 4% trained.
LOGITS_TOLERANCE = 0.02


def test_int8_logits_and_val_loss_match_float32_and_three_bits_do_not():
    cfg, params, losses = _trained()
    assert losses[-1] < math.log(256) - 2, losses[-1]  # learned something: well below uniform
    out = _val_losses_and_logits(cfg, {"fp32": params, "int8": _quantize(params, cfg.model),
                                       "int3": _quantize(params, cfg.model, 3)})
    (fp32, ref), (int8, got), (int3, _) = out["fp32"], out["int8"], out["int3"]
    assert 0 < _rel_rms(got, ref) < LOGITS_TOLERANCE  # > 0: the int8 model really differs
    # Measured (val loss ~3.17): int8 - fp32 = 2e-5 nats; 4 bits 0.0095, 3 bits 0.049, 2 bits 0.72.
    # 2026-12-02, after the attention softmax that saves only its output (other rounding, another
    # trained model): 4 bits 0.0045, under the tolerance, so 3 bits is the one shown rejected.
    assert abs(int8 - fp32) < VAL_TOLERANCE, out
    assert int3 - fp32 > VAL_TOLERANCE, out  # the tolerance can fail: it rejects 3 bits


def test_llama_with_gqa_and_scan_layers_runs_quantized():
    cfg, params = _random_params(*LLAMA)  # scan_layers=True (the default): stacked, per-layer scales
    assert cfg.scan_layers and cfg.num_kv_heads < cfg.num_heads
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.seq_len), 0, cfg.vocab_size)
    model = Transformer(cfg)
    ref = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
    with hooks.installed(dequantizing()):
        got = jax.jit(lambda p, t: model.apply({"params": p}, t))(_quantize(params, cfg), tokens)
    assert 0 < _rel_rms(got, ref) < LOGITS_TOLERANCE


def test_dequantizing_hands_float_weights_to_the_hooks_in_force():
    cfg, params = _random_params(*LLAMA)
    seen = []

    def recording(w, axes):
        seen.append((type(w), tuple(w.shape)))
        return w

    outer = hooks.Hooks(use_weight=recording)
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    with hooks.installed(outer):
        qparams = jax.eval_shape(lambda p: quantize_params(p, cfg), params)
        assert not seen  # quantize_params's own trace of the model runs with the plain hooks
        with hooks.installed(dequantizing()):  # composes with the set in force
            jax.eval_shape(lambda p, t: Transformer(cfg).apply({"params": p}, t), qparams, tokens)
    quantized_uses = len(seen)
    seen.clear()
    with hooks.installed(outer):
        jax.eval_shape(lambda p, t: Transformer(cfg).apply({"params": p}, t), params, tokens)
    assert len(seen) == quantized_uses > 0
    assert all(not issubclass(t, QuantizedWeight) for t, _ in seen)


def test_flax_still_checks_the_shape_of_a_quantized_parameter():
    cfg, params = _random_params("model.scan_layers=false")
    qparams = _quantize(params, cfg)
    wo = qparams["layer_0"]["mlp"]["wo"]
    qparams["layer_0"]["mlp"]["wo"] = QuantizedWeight(wo.values[:-1], wo.scale)  # F - 1 rows
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    # Flax compares `values` with the declared [F, D]; the quantized leaf is not waved through.
    with hooks.installed(dequantizing()), pytest.raises(ScopeParamShapeError, match='"wo"'):
        jax.eval_shape(lambda p, t: Transformer(cfg).apply({"params": p}, t), qparams, tokens)


def test_an_unknown_matrix_is_refused_by_name(monkeypatch):
    cfg, params = _random_params("model.scan_layers=false")
    monkeypatch.delitem(quantize_lib._CONTRACTED, "mlp.wi")
    with pytest.raises(ValueError, match=r"no rule for parameter layer_0\.mlp\.wi "):
        jax.eval_shape(lambda p: quantize_params(p, cfg), params)
    monkeypatch.undo()
    stray = {**params, "extra": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"parameter extra is not a parameter"):
        jax.eval_shape(lambda p: quantize_params(p, cfg), stray)


def test_a_zero_channel_gives_zeros_not_nan():
    w_DF = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32).at[:, 1].set(0.0)
    quantize = jax.jit(quantize_weight, static_argnums=1)
    q = quantize(w_DF, (0,))
    assert q.scale.shape == (1, 3) and float(q.scale[0, 1]) == 0.0
    deq = np.asarray(q.dequantize())
    assert np.all(np.isfinite(deq)) and np.all(deq[:, 1] == 0.0)
    assert np.all(np.asarray(quantize(jnp.zeros((4, 4)), (0, 1)).dequantize()) == 0.0)
    assert q.nbytes == 8 * 3 * 1 + 3 * 4
