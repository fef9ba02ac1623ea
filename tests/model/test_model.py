"""The transformer as a pure function: shapes, causality, scan/remat/dtype equivalences, attention."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError, ModelConfig
from jaxsys.config.presets import get_preset
from jaxsys.model.attention import attention, xla_attention
from jaxsys.model.params import count_params
from jaxsys.model.transformer import Transformer

TINY = get_preset("tiny").model
LLAMA = dataclasses.replace(TINY, family="llama", num_kv_heads=2)


def init(cfg: ModelConfig, seed: int = 0):
    tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
    return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(seed), tokens)["params"])


def apply(cfg: ModelConfig, params, x):
    return jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, x)


def tokens(cfg: ModelConfig, batch: int = 2, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (batch, cfg.seq_len), 0, cfg.vocab_size)


def test_gpt2_small_has_gpt2_parameter_count():
    cfg = get_preset("gpt2-small").model
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    # GPT-2 124M (HF count 124,439,808 at vocab 50257) + 47 padded vocab rows × 768.
    assert count_params(nn.meta.unbox(abstract)) == 124_439_808 + 47 * 768


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_shapes_and_causality(cfg):
    params = init(cfg)
    x = tokens(cfg)
    logits = apply(cfg, params, x)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size) and logits.dtype == jnp.float32
    t = cfg.seq_len // 2
    x2 = x.at[:, t].set((x[:, t] + 1) % cfg.vocab_size)
    logits2 = apply(cfg, params, x2)
    np.testing.assert_array_equal(logits[:, :t], logits2[:, :t])  # the past never sees the future
    assert float(jnp.abs(logits[:, t:] - logits2[:, t:]).max()) > 1e-4


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_scan_equals_unrolled_layers(cfg):
    scanned = init(dataclasses.replace(cfg, scan_layers=True))
    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = {k: v for k, v in scanned.items() if k != "layers"}
    for i in range(cfg.num_layers):
        unrolled[f"layer_{i}"] = jax.tree_util.tree_map(lambda a: a[i], scanned["layers"])
    jax.tree_util.tree_map(lambda a, b: None, unrolled, init(unrolled_cfg))  # same structure
    x = tokens(cfg)
    a = apply(dataclasses.replace(cfg, scan_layers=True), scanned, x)
    b = apply(unrolled_cfg, unrolled, x)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_gradients(policy):
    params, x = init(TINY), tokens(TINY)

    def grads(cfg):
        def loss(p):
            return Transformer(cfg).apply({"params": p}, x).mean()
        return jax.jit(jax.grad(loss))(params)

    ref = grads(TINY)
    got = grads(dataclasses.replace(TINY, remat=policy))
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_with_fp32_params():
    cfg = dataclasses.replace(LLAMA, compute_dtype="bfloat16")
    params = init(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = tokens(cfg)
    low = apply(cfg, params, x)
    high = apply(LLAMA, params, x)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.05)
    grads = jax.jit(jax.grad(lambda p: Transformer(cfg).apply({"params": p}, x).mean()))(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def _reference_attention(q, k, v):
    """float64 numpy attention with K/V repeated per query head group."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_xla_attention_matches_float64_reference(heads, kv_heads):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, 12, heads, 8))
    k = jax.random.normal(keys[1], (2, 12, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, 12, kv_heads, 8))
    np.testing.assert_allclose(xla_attention(q, k, v), _reference_attention(q, k, v), atol=2e-6)


def test_unavailable_attention_backends_raise_clear_errors():
    # (model.attention=pallas and its errors: tests/model/test_flash_attention.py)
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        attention(q, q, q, impl="cudnn")
