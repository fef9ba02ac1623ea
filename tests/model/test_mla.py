"""Multi-head latent attention (`jaxsys.model.mla`) against a plain float64 reference that
decompresses K and V and runs ordinary multi-head attention; its latent KV cache against the
full forward pass; its refusals.

The reference (`_reference`) is written here from the DeepSeek-V2 equations with numpy-style
einsums and an explicit rotate-half RoPE in float64 under `jax.enable_x64`,
sharing no code with the module. Tolerances: the module runs float32; its outputs (O(0.1)) agree
with float64 to 2e-6 absolute, its gradients to 2e-6 of max(1, the leaf's largest gradient) (a
few dozen float32 ulps of sums over D = 32). Decoding through the latent cache (the up-projection
absorbed) against the decompressed forward pass: 1e-5, as tests/inference/test_decode.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError, apply_overrides, validate
from jaxsys.config.presets import tiny
from jaxsys.model import kv_cache
from jaxsys.model.mla import MLAttention
from jaxsys.model.transformer import Transformer, init_params

B, T, D, H = 2, 16, 32, 4
NOPE, Y, E = 8, 4, 6  # E != NOPE + Y: values narrower than queries


def _cfg(q_lora_rank: int = 12, **kw):
    return dataclasses.replace(tiny().model, family="llama", attention_kind="mla", embed_dim=D, num_heads=H,
                               q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_dim=NOPE, qk_rope_dim=Y,
                               v_head_dim=E, rope_theta=100.0, **kw).resolved()


def _rope64(x, pos, theta):
    """Rotate-half RoPE over the last axis of x [B, T, H, Y], float64."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(0, 2 * half, 2) / (2 * half))
    ang = pos[:, :, None, None] * freqs  # [B, T, 1, Y/2]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)


def _rms(x, scale, eps):
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _reference(p, x, pos, seg, cfg):
    """DeepSeek-V2 §2.1 in float64: decompressed per-head K and V, plain softmax attention."""
    U = cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = jnp.einsum("btr,rhw->bthw", _rms(x @ p["wq_a"], p["q_norm"], cfg.norm_eps), p["wq_b"])
    else:
        q = jnp.einsum("btd,dhw->bthw", x, p["wq"])
    ckv = x @ p["wkv_a"]  # [B, T, U + Y]
    c = _rms(ckv[..., :U], p["kv_norm"], cfg.norm_eps)
    k_nope = jnp.einsum("btu,uhi->bthi", c, p["wkv_b"][:, :, :NOPE])
    v = jnp.einsum("btu,uhe->bthe", c, p["wkv_b"][:, :, NOPE:])
    k_rope = _rope64(ckv[:, :, None, U:], pos, cfg.rope_theta)  # one per token
    q = jnp.concatenate([q[..., :NOPE], _rope64(q[..., NOPE:], pos, cfg.rope_theta)], -1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], Y))], -1)
    s = jnp.einsum("bthw,bshw->bhts", q, k) / math.sqrt(NOPE + Y)
    mask = (np.arange(x.shape[1])[:, None] >= np.arange(x.shape[1])[None, :])[None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    s = jnp.where(mask[:, None], s, -jnp.inf)
    o = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, -1), v)
    return jnp.einsum("bthe,hed->btd", o, p["wo"])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    seg = np.repeat(np.array([[0] * 6 + [1] * 10, [0] * 16]), 1, 0).astype(np.int32)
    pos = np.stack([np.r_[np.arange(6), np.arange(10)], np.arange(16)]).astype(np.int32)
    return x, pos, seg


def _params(cfg, seed=1):
    """Init params scaled up so that attention is far from uniform (the test can see RoPE and
    the masks), with norm scales perturbed from 1."""
    x, pos, _ = _inputs()
    p = nn.meta.unbox(MLAttention(cfg).init(jax.random.key(seed), jnp.asarray(x), jnp.asarray(pos))["params"])
    p = {k: np.asarray(v) for k, v in p.items()}
    rng = np.random.default_rng(seed)
    return {k: (v * (1 + 0.3 * rng.normal(size=v.shape)) if v.ndim == 1 else v * 8.0).astype(np.float32)
            for k, v in p.items()}


# Default: each q path once, one of them packed; with --runslow the other combinations and the
# Pallas kernel (interpret mode) with values wider (E = 16 > W = 12: q and k padded, q
# rescaled) and narrower (V padded) than queries.
CASES = [pytest.param(12, True, "xla", E, id="q_lora-segments"),
         pytest.param(0, False, "xla", E, id="q_direct-one_doc"),
         pytest.param(12, True, "pallas", 16, id="pallas-v_wider-segments", marks=pytest.mark.slow),
         pytest.param(12, False, "xla", E, id="q_lora-one_doc", marks=pytest.mark.slow),
         pytest.param(0, True, "xla", E, id="q_direct-segments", marks=pytest.mark.slow),
         pytest.param(0, True, "pallas", E, id="pallas-v_narrower-segments", marks=pytest.mark.slow)]


@pytest.mark.parametrize("q_lora_rank,packed,impl,v_head_dim", CASES)
def test_mla_equals_decompressed_reference(q_lora_rank, packed, impl, v_head_dim):
    cfg = dataclasses.replace(_cfg(q_lora_rank), attention=impl, v_head_dim=v_head_dim)
    x, pos, seg = _inputs()
    if not packed:
        pos, seg = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32), None
    p = _params(cfg)
    mod = MLAttention(cfg)

    def out(p_, x_):
        return mod.apply({"params": p_}, x_, jnp.asarray(pos), None,
                         None if seg is None else jnp.asarray(seg))[0]

    r = np.random.default_rng(2).normal(size=(B, T, D))

    def value_and_grads(f, p_, x_):  # jitted: one compile instead of hundreds of eager ops
        return jax.jit(lambda p_, x_: (f(p_, x_), jax.grad(lambda p_, x_: (f(p_, x_) * r).sum(),
                                                           argnums=(0, 1))(p_, x_)))(p_, x_)

    y_full, grads = value_and_grads(out, p, jnp.asarray(x))
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        ref = lambda p_, x_: _reference(p_, x_, pos, seg, cfg)  # noqa: E731
        y_ref, g_ref = jax.tree_util.tree_map(np.asarray, value_and_grads(ref, p64, jnp.asarray(x, jnp.float64)))
    assert np.abs(y_ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(y_full), y_ref, atol=2e-6, rtol=0)
    for name in p:
        scale = np.abs(g_ref[0][name]).max()
        assert scale > 1e-3, name
        np.testing.assert_allclose(np.asarray(grads[0][name]), g_ref[0][name], atol=2e-6 * max(1, scale), rtol=0,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(grads[1]), g_ref[1], atol=2e-6, rtol=0)
    # What is compared really depends on RoPE: other positions change the output.
    with jax.enable_x64(True):
        shifted = np.asarray(_reference(p64, jnp.asarray(x, jnp.float64), pos * 2, seg, cfg))
    assert np.abs(shifted - y_ref).max() > 1e-3


# ----------------------------------------------------------------------------- decoding


def _model_cfg(**kw):
    return dataclasses.replace(_cfg(), num_layers=2, seq_len=T, **kw)


def _lively(cfg, seed=0):
    """Init params with weight matrices scaled 3x so that the logits are not nearly uniform."""
    @jax.jit  # one compile instead of hundreds of eager ops
    def make(key):
        p = init_params(cfg, key)
        return jax.tree_util.tree_map(lambda w: w * 3.0 if w.ndim >= 2 + cfg.scan_layers else w, p)
    return make(jax.random.key(seed))


@pytest.mark.parametrize("scan", [pytest.param(True, marks=pytest.mark.slow), False], ids=["scanned", "unrolled"])
def test_latent_cache_decode_equals_the_forward_pass(scan):
    """A prefill of 5 tokens, then one token per call through the latent cache: every logit
    equals the full forward pass's at its position (float32, the absorbed and decompressed
    orders of summation apart: 1e-5 as tests/inference/test_decode.py)."""
    cfg = _model_cfg(scan_layers=scan)
    model, params = Transformer(cfg), _lively(cfg)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, size=(B, T)), jnp.int32)
    want = jax.jit(model.apply)({"params": params}, tokens)
    K, Ek, Ev = kv_cache.cache_dims(cfg)
    assert (K, Ek, Ev) == (1, cfg.kv_lora_rank, cfg.qk_rope_dim)  # the latent, not 2·H·E per token
    caches = (kv_cache.for_model(cfg, B, T, layers=cfg.num_layers) if scan
              else tuple(kv_cache.for_model(cfg, B, T) for _ in range(cfg.num_layers)))
    step = jax.jit(lambda t, pos, c: model.apply({"params": params}, t, pos, c, method="decode"))
    got, caches = step(tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (B, 5)), caches)
    outs = [got]
    for t in range(5, T):
        got, caches = step(tokens[:, t:t + 1], jnp.full((B, 1), t), caches)
        outs.append(got)
    got = jnp.concatenate(outs, 1)
    assert float(jnp.abs(want).max()) > 0.2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.slow  # the cache arithmetic is the test above; this is its engine (22 s)
def test_generator_greedy_equals_recompute():
    """`jaxsys sample`'s engine (`Generator`, latent cache) and the no-cache sampler agree on a
    greedy continuation of an MLA model."""
    from jaxsys.inference.decode import Generator, Request
    from jaxsys.inference.sampler import SamplingParams
    from jaxsys.inference.sampling import generate_recompute

    cfg = _model_cfg()
    model, params = Transformer(cfg), _lively(cfg, seed=1)
    prompt = [5, 17, 3, 99, 42]
    want = generate_recompute(model, params, jnp.asarray(prompt), jax.random.key(0), max_new_tokens=8,
                              temperature=0.0)
    [got] = Generator(model, params).generate([Request(prompt, 8, SamplingParams(temperature=0.0))])
    assert len(set(got.tokens)) >= 3, got.tokens
    assert got.tokens == [int(t) for t in want[len(prompt):]]


# ----------------------------------------------------------------------------- refusals

_MLA = ["model.family=llama", "model.attention_kind=mla", "model.kv_lora_rank=16"]


@pytest.mark.parametrize("overrides,message", [
    (["model.attention_kind=mla", "model.kv_lora_rank=16"], "model.attention_kind=mla needs RoPE, RMSNorm and "
                                                            "SwiGLU: use model.family=llama"),
    (["model.family=llama", "model.attention_kind=mla"], "set model.kv_lora_rank ≥ 1"),
    ([*_MLA, "model.qk_rope_dim=3"], "model.qk_rope_dim=3: RoPE needs an even size"),
    ([*_MLA, "model.num_kv_heads=2"], "model.num_kv_heads=2 does not apply to model.attention_kind=mla"),
    ([*_MLA, "model.qkv_bias=true"], "multi-head latent attention has no q/k/v biases"),
    ([*_MLA, "mesh.context=2"], "does not run context-parallel yet; set mesh.context=1"),
    ([*_MLA, "model.q_lora_rank=-1"], "model.q_lora_rank must be ≥ 0, got -1"),
    (["model.family=llama", "model.kv_lora_rank=16"], "set model.attention_kind=mla to use it"),
])
def test_mla_refusals(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(apply_overrides(tiny(), overrides))


def test_mla_heads_must_divide_the_tensor_axis():
    """Heads are split over `tensor` (the latents are not): 4 heads on tensor=8 is refused
    before compiling, by the layout check every layout goes through."""
    from jaxsys.parallel.layout import check_layout
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.model.transformer import abstract_params

    cfg = apply_overrides(tiny(), [*_MLA, "mesh.data=1", "mesh.tensor=8"])
    validate(cfg)
    with pytest.raises(ConfigError, match=re.escape("model.num_heads=4 is not divisible by the tensor axis "
                                                    "(mesh.tensor=8)")):
        check_layout(cfg, make_mesh(cfg.mesh, jax.devices()), *abstract_params(cfg.model))
