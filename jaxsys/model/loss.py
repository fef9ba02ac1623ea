"""The training objective: mean next-token cross-entropy in nats per token.

The per-token cross-entropy is the `cross_entropy` hook (`jaxsys.model.hooks`): plain here,
vocabulary-parallel under tensor parallelism.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxsys.model import hooks
from jaxsys.model.transformer import Transformer

# {"inputs": int32[B, T], "targets": int32[B, T]}, and "positions" int32[B, T] when the tokens
# are not in order (a context-parallel layout, `jaxsys.parallel.context.reorder_batch`).
Batch = dict[str, jax.Array]


def mean_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over [B, T], in nats per token (float32)."""
    return hooks.cross_entropy(logits_BTV, targets_BT).mean()


def loss(model: Transformer, params: Any, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
    """The model's mean loss on `batch`; with dropout when `dropout_key` is given."""
    positions_BT = batch.get("positions")
    if dropout_key is None:
        logits_BTV = model.apply({"params": params}, batch["inputs"], positions_BT)
    else:
        logits_BTV = model.clone(deterministic=False).apply(
            {"params": params}, batch["inputs"], positions_BT, rngs={"dropout": dropout_key})
    return mean_cross_entropy(logits_BTV, batch["targets"])


def token_losses(model: Transformer, params: Any, inputs_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Next-token cross-entropy at every position, in nats, float32 [B, T] (no dropout): for
    evaluations that mask padding or add up nats instead of averaging per batch."""
    return hooks.cross_entropy(model.apply({"params": params}, inputs_BT), targets_BT)
