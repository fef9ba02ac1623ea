"""The training objective: mean next-token cross-entropy in nats per token.

The per-token cross-entropy is the `cross_entropy` hook (`jaxsys.model.hooks`): plain here,
vocabulary-parallel under tensor parallelism. `objective` is what training differentiates: the
cross-entropy plus, for a mixture-of-experts model, its balancing terms (`jaxsys.model.moe`),
with the sown MoE statistics beside it.

With `model.loss_vocab_tiles` = n > 0 the output projection and the cross-entropy run one
vocabulary tile of V/n entries at a time (`jaxsys.model.vocab_tiles`, through the
`tiled_cross_entropy` hook, vocabulary-parallel under tensor parallelism): [B, T, V] float32
logits and their gradient never exist whole (for gpt2-small at b = 1, T = 1024: 393 MiB per
device, `jaxsys.tools.memory_breakdown`), only [B, T, V/n]. The price is one more [B, T, D] ×
[D, V/n] matmul per tile in the backward (each tile's logits are recomputed: ~2·D·V FLOPs per
token). Tiles of V rather than chunks of T, because the head's weight gradient is then written
tile by tile as the scan's output; a scan over token chunks sums a whole [V, D] gradient per
chunk (measured: three [V, D] float32 buffers live at the peak, 442 MiB, more than it saved).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsys.model import hooks, moe
from jaxsys.model.transformer import Transformer

# {"inputs": int32[B, T], "targets": int32[B, T]}, and, when present:
#   "positions"    int32[B, T]: each token's position (a context-parallel layout reorders the
#                  tokens, `jaxsys.parallel.context.reorder_batch`; packed documents restart at 0);
#   "segment_ids"  int32[B, T]: packed documents (equal = same document); attention stays inside;
#   "loss_mask"    int32[B, T]: 1 where the target counts (0 where it is the next document's
#                  first token); the loss is the mean over the counted tokens;
#   "loss_weights" float32[B, T]: what the train step makes of "loss_mask" for the whole batch
#                  (`normalize_loss_mask`), so microbatch and device means add up exactly.
Batch = dict[str, jax.Array]


def mean_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                       weights_BT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over [B, T], in nats per token (float32); with
    `weights_BT`, the mean of the weighted per-token values."""
    ce_BT = hooks.cross_entropy(logits_BTV, targets_BT)
    return ce_BT.mean() if weights_BT is None else (ce_BT * weights_BT).mean()


def normalize_loss_mask(batch: Batch) -> Batch:
    """`batch` with its "loss_mask" (if any) turned into "loss_weights" = mask / mean(mask) over
    the whole [B, T]: the plain mean of ce · weights over any equal-sized split of the batch
    (accumulation microbatches, data-parallel shards, pipeline microbatches), averaged, is the
    mean over the counted tokens of the whole batch. A batch with nothing counted gets 0."""
    if "loss_mask" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "loss_mask"}
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    out["loss_weights"] = mask_BT / jnp.maximum(mask_BT.mean(), 1.0 / mask_BT.size)
    return out


def loss_weights(batch: Batch) -> jax.Array | None:
    """The per-token weights of `batch`'s mean loss: "loss_weights", else "loss_mask"
    normalized over this batch, else None (every token counts)."""
    if "loss_weights" in batch:
        return batch["loss_weights"]
    if "loss_mask" in batch:
        return normalize_loss_mask(batch)["loss_weights"]
    return None


def tiled_mean_cross_entropy(model: Transformer, xn_BTD: jax.Array, head_w: jax.Array, targets_BT: jax.Array,
                             weights_BT: jax.Array | None) -> jax.Array:
    """`mean_cross_entropy` of the logits of `features`' (normed x, head weight), computed
    `model.loss_vocab_tiles` vocabulary tiles at a time (never [B, T, V] whole). Nats per
    token, float32; equal to the untiled mean up to float32 rounding."""
    c = model.cfg
    ce_BT = hooks.tiled_cross_entropy(xn_BTD, head_w, c.tied_head, targets_BT, c.loss_vocab_tiles)
    return ce_BT.mean() if weights_BT is None else (ce_BT * weights_BT).mean()


def _forward_cross_entropy(model: Transformer, variables: dict[str, Any], batch: Batch,
                           dropout_key: jax.Array | None, mutable: list[str] | bool = False) -> tuple[jax.Array, Any]:
    """(mean cross-entropy of `batch`, the `mutable` collections sown) through the whole model,
    tiled by `model.loss_vocab_tiles`."""
    args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    if dropout_key is not None:
        model = model.clone(deterministic=False)
    rngs = {} if dropout_key is None else {"rngs": {"dropout": dropout_key}}
    tiled = model.cfg.loss_vocab_tiles > 0
    method = "features" if tiled else None  # None: __call__, the logits
    if mutable:
        out, sown = model.apply(variables, *args, method=method, mutable=mutable, **rngs)
    else:
        out, sown = model.apply(variables, *args, method=method, **rngs), {}
    weights_BT = loss_weights(batch)
    if tiled:
        return tiled_mean_cross_entropy(model, *out, batch["targets"], weights_BT), sown
    return mean_cross_entropy(out, batch["targets"], weights_BT), sown


def loss(model: Transformer, params: Any, batch: Batch, dropout_key: jax.Array | None,
         model_state: dict[str, Any] | None = None) -> jax.Array:
    """The model's mean loss on `batch` (see `Batch` for its keys); with dropout when
    `dropout_key` is given. `model_state`: the variables besides the parameters, if the model
    has any (the MoE loss-free bias, `{"moe_bias": ...}`)."""
    return _forward_cross_entropy(model, {"params": params, **(model_state or {})}, batch, dropout_key)[0]


def head_loss(model: Transformer, variables: dict[str, Any], x_BTD: jax.Array, targets_BT: jax.Array,
              weights_BT: jax.Array | None) -> jax.Array:
    """Mean cross-entropy of the last layer's output `x_BTD` (the head: final norm, projection,
    loss), tiled by `model.loss_vocab_tiles`: what a pipeline's last stage computes."""
    if not model.cfg.loss_vocab_tiles:
        return mean_cross_entropy(model.apply(variables, x_BTD, method="head"), targets_BT, weights_BT)
    xn_BTD, head_w = model.apply(variables, x_BTD, method="head_inputs")
    return tiled_mean_cross_entropy(model, xn_BTD, head_w, targets_BT, weights_BT)


def objective(model: Transformer, params: Any, model_state: dict[str, Any], batch: Batch,
              dropout_key: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """(the value the train step differentiates, (mean cross-entropy, MoE statistics)).

    Dense models: (loss, (loss, {})) — the same function as `loss`. MoE models: cross-entropy
    + `moe.penalty`, and the layers' `moe_stats` tree; `model_state` ({"moe_bias": ...} or {})
    holds the variables that are not parameters."""
    if not model.cfg.moe.num_experts:
        ce = loss(model, params, batch, dropout_key)
        return ce, (ce, {})
    ce, sown = _forward_cross_entropy(model, {"params": params, **model_state}, batch, dropout_key,
                                      mutable=[moe.STATS])
    return ce + moe.penalty(sown[moe.STATS], model.cfg.moe), (ce, sown[moe.STATS])


def token_losses(model: Transformer, params: Any, inputs_BT: jax.Array, targets_BT: jax.Array,
                 positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
                 model_state: dict[str, Any] | None = None) -> jax.Array:
    """Next-token cross-entropy at every position, in nats, float32 [B, T] (no dropout): for
    evaluations that mask padding or add up nats instead of averaging per batch. `model_state`
    as in `loss`."""
    logits_BTV = model.apply({"params": params, **(model_state or {})}, inputs_BT, positions_BT, segment_ids_BT)
    return hooks.cross_entropy(logits_BTV, targets_BT)
