"""Context-parallel attention (all-gather, ring, Ulysses) equals plain attention on one device:
outputs and gradients of q, k and v, causal and full, multi-head and grouped-query, contiguous
and zigzag layouts, over context = 2, 4, 8 of the 8 simulated devices.

The reference is `xla_attention` on the whole sequence in natural order; the context version
gets the same q, k, v laid out (`layout_order`) and split over `context`, and its output is put
back in natural order. The ring's gradients come from its own custom backward (a second ring),
so comparing them with autodiff of the reference checks that backward. Tolerance: float32,
2e-6 absolute on values of order 1 (the ring and the reference add the softmax terms in a
different order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsys.config import ContextParallelConfig, MeshConfig
from jaxsys.model.attention import attention_with_lse, xla_attention
from jaxsys.parallel.context import attention_work, context_attention, layout_order
from jaxsys.parallel.mesh import make_mesh
from jaxsys.parallel.rules import activation_rules

B, T, E = 2, 32, 4
HEADS = {"mha": (8, 8), "gqa": (16, 8)}  # (H, K): Ulysses at context=8 needs 8 K/V heads
RULES = activation_rules(MeshConfig(context=2))  # sequence over context


def _mesh(c: int):
    return make_mesh(MeshConfig(data=1, context=c), jax.devices()[:c])


def _qkv(heads: str, seed: int = 0):
    H, K = HEADS[heads]
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, H, E)), jax.random.normal(kk, (B, T, K, E)),
            jax.random.normal(kv, (B, T, K, E)))


def _context_fn(kind: str, c: int, zigzag: bool, causal: bool, impl: str = "xla"):
    """(q, k, v) in natural order -> output in natural order, through the context kind."""
    mesh, cp = _mesh(c), ContextParallelConfig(kind=kind, load_balance=zigzag)
    order = layout_order(T, c, zigzag)
    inverse = np.argsort(order)
    seq = NamedSharding(mesh, P(None, "context"))

    def fn(q, k, v):
        q, k, v = (jax.lax.with_sharding_constraint(x[:, order], seq) for x in (q, k, v))
        o = context_attention(mesh, RULES, cp, q, k, v, impl=impl, causal=causal)
        return o[:, inverse]
    return fn


def _value_and_grads(fn, q, k, v):
    w = jax.random.normal(jax.random.key(7), q.shape)  # a loss that weighs every output
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _reference(causal: bool):
    return lambda q, k, v: xla_attention(q, k, v, causal=causal)


# (context, zigzag, causal): every degree with the default layout; contiguous and full.
GEOMETRY = [(2, True, True), (4, True, True), (8, True, True), (4, False, True), (4, True, False),
            (8, False, False)]
# The default run: per kind, the largest ring with GQA, zigzag and causal, and one contiguous
# (the ring) or full (the others) case; the rest of the grid is marked slow (`--runslow`).
_DEFAULT = {("ring", "gqa", 8, True, True), ("ring", "mha", 4, False, True),
            ("all-gather", "gqa", 8, True, True), ("all-gather", "mha", 8, False, False),
            ("ulysses", "gqa", 8, True, True), ("ulysses", "mha", 4, True, False)}
CASES = [pytest.param(kind, heads, *g, marks=() if (kind, heads, *g) in _DEFAULT else pytest.mark.slow)
         for kind in ("all-gather", "ring", "ulysses") for heads in HEADS for g in GEOMETRY]


@pytest.mark.parametrize("kind,heads,c,zigzag,causal", CASES)
def test_context_attention_equals_one_device(kind, heads, c, zigzag, causal):
    q, k, v = _qkv(heads)
    out, grads = _value_and_grads(_context_fn(kind, c, zigzag, causal), q, k, v)
    ref_out, ref_grads = _value_and_grads(_reference(causal), q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        assert float(jnp.abs(r).max()) > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(g, r, atol=2e-6, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_the_pallas_kernel_under_context_parallelism_equals_one_device(kind):
    """Ring: each step's block is the flash kernel (interpreted on CPU), which returns the lse;
    Ulysses: the kernel on whole sequences of a head group, in natural order."""
    q, k, v = _qkv("gqa")
    out, grads = _value_and_grads(_context_fn(kind, 2, True, True, impl="pallas"), q, k, v)
    ref_out, ref_grads = _value_and_grads(_reference(True), q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=2e-6, rtol=0)


def test_partial_results_merge_exactly_by_their_lse():
    """The online-softmax merge the ring relies on, on two key blocks, against a plain loop."""
    q, k, v = (np.asarray(x, np.float64) for x in _qkv("mha"))
    o1, l1 = attention_with_lse(*(jnp.asarray(x, jnp.float32) for x in (q, k[:, :16], v[:, :16])), causal=False)
    o2, l2 = attention_with_lse(*(jnp.asarray(x, jnp.float32) for x in (q, k[:, 16:], v[:, 16:])), causal=False)
    lse = np.logaddexp(l1, l2)
    w1, w2 = (np.exp(np.asarray(x) - lse).transpose(0, 2, 1)[..., None] for x in (l1, l2))
    merged = w1 * np.asarray(o1) + w2 * np.asarray(o2)
    expected = np.zeros_like(q)
    for b in range(B):
        for h in range(q.shape[2]):
            for t in range(T):
                s = np.array([q[b, t, h] @ k[b, j, h] for j in range(T)]) / np.sqrt(E)
                p = np.exp(s - s.max())
                expected[b, t, h] = (p / p.sum()) @ v[b, :, h]
    np.testing.assert_allclose(merged, expected, atol=2e-6)


def test_zigzag_layout_and_its_balanced_work():
    assert layout_order(8, 2, True).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert layout_order(8, 2, False).tolist() == list(range(8))
    for c in (2, 4, 8):
        contiguous, zig = attention_work(64, c, False), attention_work(64, c, True)
        assert contiguous.sum() == zig.sum() == 64 * 65 // 2  # the same causal pairs in all
        assert zig.max() == zig.min()  # equal work on every device
        # contiguous: device i's t queries at positions i·t + j each see i·t + j + 1 keys
        t = 64 // c
        assert contiguous.tolist() == [t * i * t + t * (t + 1) // 2 for i in range(c)]


def _segment_ids():
    """Packed documents, [B, T]: row 0 cut at 5, 13 and 27 (documents that straddle the chunks
    and the devices of every layout), row 1 at 16."""
    seg = np.zeros((B, T), np.int32)
    for b, cuts in enumerate(((5, 13, 27), (16,))):
        for cut in cuts:
            seg[b, cut:] += 1
    return jnp.asarray(seg)


def _context_fn_with_segments(kind: str, c: int, zigzag: bool, impl: str = "xla"):
    mesh, cp = _mesh(c), ContextParallelConfig(kind=kind, load_balance=zigzag)
    order = layout_order(T, c, zigzag)
    inverse = np.argsort(order)
    seq = NamedSharding(mesh, P(None, "context"))
    seg = jax.lax.with_sharding_constraint(_segment_ids()[:, order], seq)

    def fn(q, k, v):
        q, k, v = (jax.lax.with_sharding_constraint(x[:, order], seq) for x in (q, k, v))
        return context_attention(mesh, RULES, cp, q, k, v, impl=impl, causal=True, segment_ids=seg)[:, inverse]
    return fn


@pytest.mark.parametrize("kind,c,zigzag,impl", [
    ("ring", 4, True, "xla"), pytest.param("ring", 8, False, "xla", marks=pytest.mark.slow), ("all-gather", 4, True, "xla"),
    ("ulysses", 2, True, "xla"), ("ring", 2, True, "pallas"),
    pytest.param("ulysses", 4, False, "pallas", marks=pytest.mark.slow),
    pytest.param("all-gather", 8, False, "xla", marks=pytest.mark.slow),
])
def test_context_attention_keeps_packed_documents_apart(kind, c, zigzag, impl):
    """Every kind masks by the segment ids as well: outputs and dq/dk/dv equal one device's
    attention with the same segment ids (and differ from attention across documents)."""
    q, k, v = _qkv("gqa")
    seg = _segment_ids()
    out, grads = _value_and_grads(_context_fn_with_segments(kind, c, zigzag, impl), q, k, v)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: xla_attention(q, k, v, causal=True, segment_ids=seg), q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(g, r, atol=2e-6, rtol=0, err_msg=f"d{name}")
    assert float(jnp.abs(ref_out - xla_attention(q, k, v, causal=True)).max()) > 1e-2
