"""The Pallas flash-attention kernel (interpret mode on CPU) against a float64 reference.

Every case runs the forward (o and lse) and the backward with random cotangents for both o
and lse, and compares o, lse, dq, dk, dv with `flash_attention_reference` evaluated in float64
(`jax.enable_x64`) on the same, dtype-rounded inputs. Inputs are fresh standard normals.

Error metric: max |kernel - reference| / max |reference| per array (a normalised max error).
Tolerances per input dtype, about 3× the worst error seen over all 60 default + slow cases
(worst seen in brackets; fp32 unit roundoff is 6e-8, fp16 4.9e-4, bf16 3.9e-3):

| dtype    | o                 | dq, dk, dv        | why                                       |
|----------|-------------------|-------------------|-------------------------------------------|
| float32  | 3e-6 (1.0e-6)     | 5e-6 (1.5e-6)     | fp32 accumulation; summation order only   |
| bfloat16 | 1.2e-2 (3.7e-3)   | 1.6e-2 (5.2e-3)   | p and ds rounded to the input dtype for the matmuls (as FlashAttention does), outputs stored in it |
| float16  | 1.2e-3 (3.7e-4)   | 2e-3 (6.3e-4)     | same, 11-bit mantissa                     |

lse has its own tolerance, 1e-6 for every dtype (worst seen 2.9e-7, fp16 d256): it comes from
fp32 scores of the same dtype-rounded inputs the reference sees, with no rounding to the input
dtype, so the bf16/fp16 output tolerances would let an lse bug through.

Default run: a handful of cases that between them cover causal/non-causal, GQA ratios 1/2/4,
segment ids, ragged lengths (T, S not multiples of the blocks, T != S), head dims 64/128/256,
fp32/bf16/fp16. `--runslow` adds a wider sweep.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.model.attention import attention
from jaxsys.model.loss import loss
from jaxsys.parallel.install import parallelize
from jaxsys.train.state import TrainState, init_state
from tests.helpers import host_batch, layout, tiny_cfg, train_steps
from pallas_kernels.flash_attention import (DEFAULT_BLOCKS, default_block_sizes, flash_attention,
                                            flash_attention_with_lse, resolve_interpret)
from pallas_kernels.reference import flash_attention_reference

TOL = {  # (forward: o, backward: dq, dk, dv), normalised max error; see the docstring
    "float32": (3e-6, 5e-6),
    "bfloat16": (1.2e-2, 1.6e-2),
    "float16": (1.2e-3, 2e-3),
}
LSE_TOL = 1e-6  # every dtype: lse is fp32 throughout (see the docstring)


def _segments(B: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[B, n] packed-sequence ids: sorted, 2-4 segments per row, different per row."""
    cuts = np.sort(rng.integers(1, n, size=(B, 3)), axis=1)
    return (np.arange(n)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def _errors(dtype: str, causal: bool, B: int, T: int, S: int, H: int, K: int, D: int,
            segments: bool, block_q: int | None, block_k: int | None, seed: int = 0,
            sm_scale: float | None = None) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dt)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), dt)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), dt)
    do = jnp.asarray(rng.standard_normal((B, T, H, D)), dt)
    dlse = jnp.asarray(rng.standard_normal((B, H, T)), jnp.float32)
    seg = None
    if segments:
        assert T == S
        seg = jnp.asarray(_segments(B, T, rng))

    @jax.jit
    def kernel(q, k, v, do, dlse):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention_with_lse(
            q, k, v, causal=causal, sm_scale=sm_scale, segment_ids=seg, block_q=block_q,
            block_k=block_k, interpret=True), q, k, v)
        return out, vjp((do, dlse))

    (o, lse), grads = kernel(q, k, v, do, dlse)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do, dlse)]
        (o_r, lse_r), vjp = jax.vjp(lambda q, k, v: flash_attention_reference(
            q, k, v, causal=causal, sm_scale=sm_scale, q_segment_ids=seg, kv_segment_ids=seg),
            *f64[:3])
        grads_r = vjp((f64[3], f64[4]))
        ref = {n: np.asarray(x) for n, x in zip(("o", "lse", "dq", "dk", "dv"),
                                                 (o_r, lse_r, *grads_r))}
    got = {n: np.asarray(x, np.float64) for n, x in zip(("o", "lse", "dq", "dk", "dv"),
                                                         (o, lse, *grads))}
    for n in got:
        assert got[n].shape == ref[n].shape, n
        assert np.isfinite(got[n]).all(), n
        assert np.abs(ref[n]).max() > 1e-2, f"{n} is trivially small"
    return {n: float(np.abs(got[n] - ref[n]).max() / np.abs(ref[n]).max()) for n in got}


# (dtype, causal, B, T, S, H, K, D, segments, block_q, block_k[, seed, sm_scale])
DEFAULT_CASES = {
    "fp32-causal-mha-d64-scale0.3": ("float32", True, 1, 64, 64, 2, 2, 64, False, 16, 16, 0, 0.3),
    "fp32-full-gqa2-d128-ragged": ("float32", False, 1, 40, 40, 4, 2, 128, False, 16, 32),
    "fp32-causal-gqa4-d64-segments": ("float32", True, 2, 48, 48, 4, 1, 64, True, 16, 16),
    "bf16-causal-gqa2-d64-ragged-cross": ("bfloat16", True, 1, 40, 56, 4, 2, 64, False, 16, 32),
    "bf16-full-mha-d256-segments": ("bfloat16", False, 1, 32, 32, 2, 2, 256, True, 16, 16),
    "fp16-causal-gqa2-d128": ("float16", True, 1, 32, 32, 2, 1, 128, False, 16, 16),
}


@pytest.mark.parametrize("case", list(DEFAULT_CASES.values()), ids=list(DEFAULT_CASES))
def test_matches_float64_reference(case):
    errs = _errors(*case)
    fwd_tol, bwd_tol = TOL[case[0]]
    for n, e in errs.items():
        assert e < {"o": fwd_tol, "lse": LSE_TOL}.get(n, bwd_tol), (n, errs)


SLOW_CASES = [  # dtype x causal x (G, D) x (segments, ragged), not the whole product
    (dt, causal, 2, T, T, 4, 4 // G, D, seg, 16, 32)
    for dt, causal, (G, D), (seg, T) in itertools.product(
        ("float32", "bfloat16", "float16"), (True, False), ((1, 64), (2, 128), (4, 256)),
        ((False, 64), (True, 64), (False, 50)))
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64_reference_sweep(case):
    errs = _errors(*case)
    fwd_tol, bwd_tol = TOL[case[0]]
    for n, e in errs.items():
        assert e < {"o": fwd_tol, "lse": LSE_TOL}.get(n, bwd_tol), (n, errs)


# ----------------------------------------------------------------------------- causal skipping


def _poison_inputs(rng, T=64, D=32):
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, T, 1, D)), jnp.float32) for _ in range(4))
    return q, k, v, do


def test_causal_skips_fully_masked_blocks_forward_and_dq():
    """NaN in the keys/values of blocks 2-3 must not reach query blocks 0-1. A kernel that only
    masked those blocks would still multiply p = 0 by NaN values and return NaN."""
    T, blk, half = 64, 16, 32
    q, k, v, do = _poison_inputs(np.random.default_rng(1), T)
    nan_k = k.at[:, half:].set(jnp.nan)
    nan_v = v.at[:, half:].set(jnp.nan)

    @functools.partial(jax.jit, static_argnums=0)
    def run(causal, k, v):
        f = lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=blk, block_k=blk,
                                            interpret=True)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)[0]

    o, dq = run(True, nan_k, nan_v)
    o_ref, vjp = jax.vjp(lambda q: flash_attention_reference(q, k, v, causal=True)[0], q)
    dq_ref = vjp(do)[0]
    np.testing.assert_allclose(o[:, :half], o_ref[:, :half], atol=2e-6)
    np.testing.assert_allclose(dq[:, :half], dq_ref[:, :half], atol=2e-6)
    assert np.isnan(np.asarray(o[:, half:])).all()  # later rows do see the poisoned keys
    # The poison is real: without causal skipping, every row visits every block and is NaN.
    o_full, dq_full = run(False, nan_k, nan_v)
    assert np.isnan(np.asarray(o_full[:, :half])).all()
    assert np.isnan(np.asarray(dq_full[:, :half])).all()


def test_causal_dkv_skips_query_blocks_that_cannot_see_the_key_block():
    """NaN in query rows 0-31 must not reach dk/dv of keys 32-63 (no later key is visible to
    them), which the dk/dv kernel guarantees by starting its query loop at the diagonal."""
    T, blk, half = 64, 16, 32
    q, k, v, do = _poison_inputs(np.random.default_rng(2), T)
    nan_q, nan_do = q.at[:, :half].set(jnp.nan), do.at[:, :half].set(jnp.nan)
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=blk, block_k=blk,
                                        interpret=True)
    _, vjp = jax.vjp(f, nan_q, k, v)
    _, dk, dv = vjp(nan_do)
    _, vjp_ref = jax.vjp(lambda k, v: flash_attention_reference(q, k, v, causal=True)[0], k, v)
    dk_ref, dv_ref = vjp_ref(do)
    np.testing.assert_allclose(dk[:, half:], dk_ref[:, half:], atol=2e-6)
    np.testing.assert_allclose(dv[:, half:], dv_ref[:, half:], atol=2e-6)
    assert np.isnan(np.asarray(dk[:, :half])).all()


# ----------------------------------------------------------------------------- modes and errors


def test_mode_is_chosen_by_backend_and_can_be_forced():
    assert jax.default_backend() == "cpu" and resolve_interpret(None) is True
    assert resolve_interpret(False) is False
    q = jnp.ones((1, 16, 1, 64), jnp.float32)
    # Forcing compiled mode really takes the compiled path, which CPU refuses.
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        flash_attention(q, q, q, interpret=False)


def test_default_block_sizes_per_head_dim():
    assert {d: default_block_sizes(d) for d in (64, 128, 256)} == DEFAULT_BLOCKS
    assert default_block_sizes(128) != default_block_sizes(256)


@pytest.mark.parametrize("shapes,dtype,kwargs,match", [
    (((1, 16, 3, 64), (1, 16, 2, 64)), "float32", {}, "multiple of key/value heads"),
    (((1, 16, 2, 64), (1, 16, 2, 32)), "float32", {}, "head_dim=64"),
    (((1, 16, 2, 64), (1, 16, 2, 64)), "int32", {}, "float32, bfloat16 and float16"),
    (((1, 16, 2, 96), (1, 16, 2, 96)), "float32", {"interpret": False}, r"head_dim in \(64, 128, 256\)"),
    (((1, 16, 2, 64), (1, 16, 2, 64)), "float32", {"interpret": False, "block_q": 24},
     "powers of two"),
    (((1, 16, 2, 64), (1, 16, 2, 64)), "float32", {"segment_ids": jnp.zeros((1, 8), jnp.int32)},
     "segment ids must be"),
    (((1, 32, 2, 64), (1, 16, 2, 64)), "float32", {"causal": True}, "would see no key"),
])
def test_unsupported_inputs_raise_clear_errors(shapes, dtype, kwargs, match):
    q = jnp.ones(shapes[0], dtype)
    k = jnp.ones(shapes[1], dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, **kwargs)


def test_model_attention_pallas_errors_are_config_errors(monkeypatch):
    import pallas_kernels.flash_attention as fa
    monkeypatch.setattr(fa, "resolve_interpret", lambda interpret: False)  # as on a GPU
    q = jnp.ones((1, 16, 2, 96), jnp.bfloat16)
    with pytest.raises(ConfigError, match=r"model.attention=pallas: .*head_dim in \(64, 128, 256\)"):
        attention(q, q, q, impl="pallas")


# ----------------------------------------------------------------------------- in the model


LLAMA_GQA = ("model.family=llama", "model.num_kv_heads=2")  # G = 2 query heads per K/V head
LAYOUTS = {  # under a mesh the kernel runs in shard_map over batch (data × fsdp), heads (tensor)
    "one-device": ("mesh.data=1",),
    "fsdp=2,tensor=2": ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"),
}
_XLA_REFERENCE: list = []


def _train(*overrides: str, init_params=None, steps: int = 3):
    """(losses, params, setup) after `steps` AdamW steps of the tiny llama-GQA model, from
    `init_params` (host arrays) placed in the layout's shardings, or from `init_state`."""
    cfg = tiny_cfg(*LLAMA_GQA, *overrides)
    s = layout(cfg)
    if init_params is None:
        state = init_state(s, seed=0)
    else:  # as init_state, minus model.init: the same parameters in every layout, and one
        # compile fewer per layout
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                             opt_state=s.tx.init(p)),
                        out_shardings=s.state_sharding)(
            jax.device_put(init_params, s.state_sharding.params))
    return (*train_steps(s, state, steps), s)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_model_trains_with_pallas_like_xla(name):
    """attention=pallas (interpret) trains to the losses and parameters of attention=xla on
    one device. Tolerances as tests/equivalence/test_parallel.py: fp32 rounding, amplified by
    Adam."""
    if not _XLA_REFERENCE:
        init = jax.device_get(init_state(layout(tiny_cfg(*LLAMA_GQA, "mesh.data=1")), 0).params)
        _XLA_REFERENCE.extend([init, *_train("mesh.data=1", "model.attention=xla",
                                             init_params=init)[:2]])
    init, ref_losses, ref_params = _XLA_REFERENCE
    losses, params, s = _train(*LAYOUTS[name], "model.attention=pallas", init_params=init)
    assert s.mesh.devices.size == (1 if name == "one-device" else 4)
    np.testing.assert_allclose(losses, ref_losses, atol=2e-6)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it does learn
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params, ref_params)
    assert max(jax.tree_util.tree_leaves(diffs)) < 5e-5
    # ... and the kernel really ran, inside shard_map.
    with parallelize(s.mesh):
        jaxpr = str(jax.make_jaxpr(lambda p, b: loss(s.model, p, b, None))(
            params, host_batch(s.cfg)))
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
