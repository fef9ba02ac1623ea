"""Packed documents: attention never crosses a document boundary, in every implementation, and
each document's loss in a packed row equals that document run alone.

The reference is a float64 loop over (row, query, head) that keeps only the keys at or before
the query *and* in its document. A packed row here is three documents of lengths 11, 6 and 15
(T = 32), with positions restarting at each document and the loss mask 0 on the last token of
each document (its target is the next document's first token).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import apply_overrides
from jaxsys.config.presets import tiny
from jaxsys.model import attention as attention_lib
from jaxsys.model.loss import loss, normalize_loss_mask, token_losses
from jaxsys.model.transformer import Transformer, init_params

LENGTHS = (11, 6, 15)


def packed_row(lengths=LENGTHS):
    """(segment_ids, positions, loss_mask) int32 [1, sum(lengths)] of documents of `lengths`."""
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    mask = np.concatenate([np.r_[np.ones(n - 1), 0] for n in lengths])
    return [a[None].astype(np.int32) for a in (seg, pos, mask)]


def loop_attention(q, k, v, seg, causal=True):
    """Float64 loop: query t of row b, head h sees key s when s <= t (causal) and seg equal."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, E = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                keys = [s for s in range(T) if (s <= t or not causal) and seg[b, s] == seg[b, t]]
                scores = np.array([q[b, t, h] @ k[b, s, h // G] for s in keys]) / math.sqrt(E)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, h] = sum(pi * v[b, s, h // G] for pi, s in zip(p, keys))
    return out


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])  # multi-head, grouped-query
def test_attention_with_segment_ids_equals_loop(impl, heads):
    H, K = heads
    rng = np.random.default_rng(0)
    T = sum(LENGTHS)
    q = rng.standard_normal((2, T, H, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, T, K, 16)).astype(np.float32) for _ in range(2))
    seg = np.concatenate([packed_row()[0], packed_row((20, 12))[0]])  # two rows, other boundaries
    want = loop_attention(q, k, v, seg)
    got = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl,
                                  causal=True, segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    plain = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl, causal=True)
    assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the segments change the answer


def test_attention_with_lse_segment_ids_equals_loop():
    rng = np.random.default_rng(1)
    T = sum(LENGTHS)
    q, k, v = (rng.standard_normal((1, T, 2, 8)).astype(np.float32) for _ in range(3))
    seg = packed_row()[0]
    o, lse = attention_lib.attention_with_lse(q, k, v, causal=True, segment_ids=(seg, seg))
    np.testing.assert_allclose(np.asarray(o), loop_attention(q, k, v, seg), atol=2e-6)
    assert np.isfinite(np.asarray(lse)).all()


def _model(family: str, *extra: str):
    over = ["model.seq_len=32", "model.num_layers=2"]
    if family == "llama":
        over += ["model.family=llama", "model.num_kv_heads=2"]
    return apply_overrides(tiny(), over + list(extra)).model


@pytest.mark.parametrize("family,extra", [
    ("gpt2", ()), pytest.param("llama", (), marks=pytest.mark.slow), ("llama", ("model.scan_layers=false",)),
    pytest.param("gpt2", ("model.attention=pallas",), marks=pytest.mark.slow),
])
def test_each_document_loss_equals_the_document_alone(family, extra):
    cfg = _model(family, *extra)
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    per_token = jax.jit(lambda *a: token_losses(model, params, *a))
    rng = np.random.default_rng(2)
    T = sum(LENGTHS)
    tokens = rng.integers(0, cfg.vocab_size, (1, T + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg, pos, mask = packed_row()
    packed = np.asarray(per_token(inputs, targets, pos, seg))
    start = 0
    alone_sum = 0.0
    for n in LENGTHS:
        alone = np.asarray(per_token(inputs[:, start:start + n], targets[:, start:start + n]))
        # Every position but the last (whose target is the next document's) is the document's own.
        np.testing.assert_allclose(packed[0, start:start + n - 1], alone[0, :n - 1], atol=2e-5)
        alone_sum += alone[0, :n - 1].sum()
        start += n
    unpacked = np.asarray(per_token(inputs, targets))
    assert np.abs(unpacked - packed).max() > 1e-3  # without segment ids, documents would mix
    # The masked mean loss is the mean over the documents' own tokens.
    batch = {"inputs": inputs, "targets": targets, "positions": pos, "segment_ids": seg, "loss_mask": mask}
    np.testing.assert_allclose(float(loss(model, params, batch, None)), alone_sum / mask.sum(), rtol=1e-5)


def test_normalized_loss_mask_splits_exactly():
    """Means of ce · weights over equal splits of the batch average to the masked mean."""
    rng = np.random.default_rng(3)
    ce = rng.random((4, 8))
    mask = (rng.random((4, 8)) > 0.4).astype(np.int32)
    w = np.asarray(normalize_loss_mask({"loss_mask": jnp.asarray(mask)})["loss_weights"], np.float64)
    halves = [(ce[i::2] * w[i::2]).mean() for i in range(2)]  # two strided microbatches
    np.testing.assert_allclose(np.mean(halves), (ce * mask).sum() / mask.sum(), rtol=1e-6)
    assert float(normalize_loss_mask({"loss_mask": jnp.zeros((2, 2), jnp.int32)})["loss_weights"].sum()) == 0.0
