"""`attention.softmax_saving_probs`: jax.nn.softmax's values and gradients (the VJP that reads
only the saved probabilities), with the causal mask's float32-min logits; float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.model.attention import softmax_saving_probs


def test_softmax_saving_probs_equals_softmax_and_its_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 5)).astype(np.float32) * 3
    logits = np.where(np.tril(np.ones((5, 5), bool)), logits, np.finfo(np.float32).min)
    g = rng.normal(size=logits.shape).astype(np.float32)
    f = lambda fn: jax.jit(lambda x: (fn(x) * g).sum())  # noqa: E731
    got_y, ref_y = softmax_saving_probs(logits), jax.nn.softmax(logits, axis=-1)
    got_dx = jax.grad(f(softmax_saving_probs))(logits)
    ref_dx = jax.grad(f(lambda x: jax.nn.softmax(x, axis=-1)))(logits)
    x64 = logits.astype(np.float64)
    y64 = np.exp(x64 - x64.max(-1, keepdims=True))
    y64 /= y64.sum(-1, keepdims=True)
    dx64 = y64 * (g - (g * y64).sum(-1, keepdims=True))
    np.testing.assert_allclose(got_y, y64, atol=1e-6)
    np.testing.assert_allclose(got_y, ref_y, atol=1e-7)
    np.testing.assert_allclose(got_dx, dx64, atol=1e-6)
    np.testing.assert_allclose(got_dx, ref_dx, atol=1e-6)
    assert float(jnp.abs(got_dx).max()) > 0.1 and float(jnp.abs(got_dx[..., 0, 1:]).max()) == 0.0
