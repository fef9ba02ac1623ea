"""Sampling: autoregressive generation from a model's parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.config.presets import tiny
from jaxsys.inference.sampling import generate_recompute as generate
from jaxsys.model.transformer import Transformer


def test_sampling_stays_inside_a_small_tokenizer_vocabulary():
    cfg = tiny().model  # vocabulary 256, but pretend the tokenizer only has 65 characters
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    ids = generate(Transformer(cfg), params, jnp.array([1, 2, 3]), jax.random.key(1),
                   max_new_tokens=64, temperature=1.0, num_tokens=65)
    assert ids.shape == (67,) and int(ids.max()) < 65
    unrestricted = generate(Transformer(cfg), params, jnp.array([1, 2, 3]), jax.random.key(1),
                            max_new_tokens=64, temperature=1.0)
    assert int(unrestricted.max()) >= 65  # without the limit, an untrained model strays outside
