"""The mixture-of-experts MLP: router, top-k choice, slots, balancing terms, and its statistics.

`MoeMlp` replaces the dense MLP in the layers `is_moe_layer` picks (`model.moe.first_dense_layers`,
`every`). Each token's router logits [B, T, X] come from a router weight [D, X] in float32:

  softmax  p = softmax(logits); the top-k of p, their weights renormalised to sum 1 (Mixtral);
  sigmoid  s = sigmoid(logits); the top-k of s, normalised to sum 1, times `routed_scale`
           (DeepSeek-V3).

The routed experts run through the `experts` hook (`jaxsys.model.hooks`; plain version in
`jaxsys.model.experts`), which gets each assignment's expert, combine weight and *slot*: its
position in its expert's buffer within its own sequence. Priority is GShard's: a row's first
choices in token order, then its second choices, and so on; an assignment past the capacity
U = ceil(capacity_factor · T · top_k / X) gets slot U (dropped: it adds 0, the residual carries
its token). Dropless mode has U = T, so nothing drops (a token picks an expert at most once).
Decoding (a KV cache) always routes dropless: a capacity would depend on how many tokens one
call happens to feed. `num_shared_experts` always-on experts are one dense MLP of the family
(`layers.Mlp`) of num_shared · expert_dim hidden, named `shared`.

Balancing, all computed per sequence and then averaged over the rows, so that any split of the
batch by rows (accumulation microbatches, data / fsdp / expert shards) gives the same values and
gradients:
  aux      X · Σ_x f_x · P_x (Switch / GShard), f_x the fraction of the row's assignments that
           chose expert x, P_x the row's mean router probability of x (for the sigmoid router the
           scores normalised over the experts, s / Σ s). Per sequence as DeepSeek-V3's
           sequence-wise balance loss; 1.0 when perfectly balanced.
  z        the router z-loss, mean over tokens of logsumexp(logits)² (ST-MoE).
  bias     the auxiliary-loss-free bias (DeepSeek-V3, `bias_update_rate` > 0): a per-layer
           per-expert float32 bias added to the scores for *selection only* (the combine weights
           use the unbiased scores). It is a Flax variable in collection `moe_bias`, not a
           parameter: the train state carries it (`TrainState.model_state`) and `update_bias`
           moves it after each optimizer step by rate · sign(mean load − load_x), then
           re-centres it to zero mean.

Each MoE layer `sow`s into collection `moe_stats`: "aux" and "z" (scalars), "load" [X] (the
fraction of assignments per expert, before dropping; sums to 1) and "dropped" (the fraction of
assignments dropped). `layer_stats` gathers them from the unrolled or scanned tree;
`penalty` is what the train step adds to the cross-entropy (coefficients times the mean over MoE
layers); `step_metrics` the logged `moe_*` values.

Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed, F expert hidden, X experts,
I a token's expert choices (top_k), U capacity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig, MoEConfig
from jaxsys.model import hooks
from jaxsys.model.axes import ACT_BTD, EXPERT_XDF, EXPERT_XFD
from jaxsys.model.layers import Mlp, param

STATS = "moe_stats"  # the collection the layers sow their statistics into
BIAS = "moe_bias"  # the collection of the loss-free balancing bias
STAT_NAMES = ("aux", "z", "load", "dropped")


def is_moe_layer(moe: MoEConfig, i: int) -> bool:
    """Whether layer `i` (0-based) has routed experts instead of the dense MLP."""
    return moe.num_experts > 0 and i >= moe.first_dense_layers and (i - moe.first_dense_layers) % moe.every == 0


def capacity(moe: MoEConfig, T: int) -> int:
    """U, one expert's slots per sequence of T tokens: ceil(capacity_factor · T · top_k / X) in
    capacity mode, T when dropless."""
    if moe.dispatch == "dropless":
        return T
    return math.ceil(moe.capacity_factor * T * moe.top_k / moe.num_experts)


def route(logits_BTX: jax.Array, bias_X: jax.Array | None,
          moe: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int32 expert [B, T, I], float32 combine weight [B, T, I], float32 probability [B, T, X]
    for the balance loss) from float32 router logits. `bias_X` moves the selection only."""
    if moe.router == "softmax":
        scores_BTX = jax.nn.softmax(logits_BTX, axis=-1)
        p_BTX = scores_BTX
    else:
        scores_BTX = jax.nn.sigmoid(logits_BTX)
        p_BTX = scores_BTX / scores_BTX.sum(-1, keepdims=True)
    select_BTX = scores_BTX if bias_X is None else scores_BTX + bias_X
    _, expert_BTI = jax.lax.top_k(select_BTX, moe.top_k)
    chosen_BTI = jnp.take_along_axis(scores_BTX, expert_BTI, axis=-1)
    weight_BTI = chosen_BTI / chosen_BTI.sum(-1, keepdims=True)
    if moe.router == "sigmoid":
        weight_BTI = weight_BTI * moe.routed_scale
    return expert_BTI.astype(jnp.int32), weight_BTI, p_BTX


def assign_slots(expert_BTI: jax.Array, num_experts: int, capacity_: int) -> jax.Array:
    """Each assignment's slot in its expert's buffer within its row, GShard priority (all first
    choices in token order, then all second choices, ...); `capacity_` where it is dropped."""
    B, T, I = expert_BTI.shape
    e_BIT = expert_BTI.transpose(0, 2, 1)  # priority order: choice-major, then token
    onehot = jax.nn.one_hot(e_BIT.reshape(B, I * T), num_experts, dtype=jnp.int32)  # [B, I·T, X]
    pos = ((jnp.cumsum(onehot, axis=1) - 1) * onehot).sum(-1)  # [B, I·T]: earlier picks of the same expert
    pos_BTI = pos.reshape(B, I, T).transpose(0, 2, 1)
    return jnp.where(pos_BTI < capacity_, pos_BTI, capacity_).astype(jnp.int32)


def row_fractions(expert_BTI: jax.Array, num_experts: int) -> jax.Array:
    """f [B, X]: the fraction of each row's T·I assignments that chose each expert (float32)."""
    return jax.nn.one_hot(expert_BTI, num_experts, dtype=jnp.float32).mean((1, 2))


def balance_loss(p_BTX: jax.Array, expert_BTI: jax.Array) -> jax.Array:
    """The Switch / GShard loss per sequence, averaged over rows: mean_b X · Σ_x f_bx · P_bx
    (gradient through P only)."""
    X = p_BTX.shape[-1]
    f_BX = row_fractions(expert_BTI, X)
    return (X * (f_BX * p_BTX.mean(1)).sum(-1)).mean()


def z_loss(logits_BTX: jax.Array) -> jax.Array:
    """The router z-loss: mean over tokens of logsumexp(logits)²."""
    return jnp.square(jax.nn.logsumexp(logits_BTX, axis=-1)).mean()


class MoeMlp(nn.Module):
    """Routed (+ shared) experts on the normed residual [B, T, D] -> [B, T, D] (compute dtype)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, decoding: bool = False) -> jax.Array:
        cfg, m = self.cfg, self.cfg.moe
        D, X, F = cfg.embed_dim, m.num_experts, m.expert_dim or cfg.mlp_dim
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        router_DX = param(self, "router", (D, X), ("embed", None), 0.02, pdt)
        logits_BTX = jnp.einsum("btd,dx->btx", x_BTD.astype(jnp.float32), router_DX.astype(jnp.float32))
        bias_X = None
        if m.bias_update_rate > 0:
            bias_X = self.variable(BIAS, "bias", jnp.zeros, (X,), jnp.float32).value
        expert_BTI, weight_BTI, p_BTX = route(logits_BTX, bias_X, m)
        dispatch = "dropless" if decoding else m.dispatch
        U = x_BTD.shape[1] if dispatch == "dropless" else capacity(m, x_BTD.shape[1])
        slot_BTI = assign_slots(expert_BTI, X, U)
        w = {"w_in": param(self, "w_in", (X, D, F), EXPERT_XDF, 0.02, pdt).astype(cdt),
             "w_out": param(self, "w_out", (X, F, D), EXPERT_XFD, out_std, pdt).astype(cdt)}
        if cfg.family == "llama":
            w["w_gate"] = param(self, "w_gate", (X, D, F), EXPERT_XDF, 0.02, pdt).astype(cdt)
        act = "swiglu" if cfg.family == "llama" else f"gelu_{cfg.gelu}"
        y_BTD = hooks.experts(x_BTD, expert_BTI, slot_BTI, weight_BTI.astype(cdt), w, act=act,
                              capacity=U, dispatch=dispatch)
        if m.num_shared_experts:
            shared = dataclasses.replace(cfg, mlp_dim=m.num_shared_experts * F)
            y_BTD = y_BTD + Mlp(shared, name="shared")(x_BTD)
        self.sow(STATS, "aux", balance_loss(p_BTX, expert_BTI))
        self.sow(STATS, "z", z_loss(logits_BTX))
        self.sow(STATS, "load", row_fractions(expert_BTI, X).mean(0))
        self.sow(STATS, "dropped", (slot_BTI == U).mean(dtype=jnp.float32))
        return hooks.constrain(y_BTD.astype(cdt), ACT_BTD)


# ----------------------------------------------------------------------------- statistics


def layer_stats(stats: Any) -> dict[str, jax.Array]:
    """The `moe_stats` collection of one forward pass, every MoE layer's values stacked (layer
    order not kept): {"aux": [L'], "z": [L'], "load": [L', X], "dropped": [L']} float32."""
    found: dict[str, list[jax.Array]] = {k: [] for k in STAT_NAMES}

    def visit(tree: Any) -> None:
        for key, value in tree.items():
            if key in STAT_NAMES and isinstance(value, tuple):  # sow's tuple; stacked [G] under scan
                found[key].extend(value)
            else:
                visit(value)

    visit(stats)
    if not found["aux"]:
        raise ValueError("no MoE statistics in the tree: no MoE layer ran with `moe_stats` mutable")
    X = found["load"][0].shape[-1]
    out = {k: jnp.concatenate([v.reshape(-1) for v in found[k]]) for k in ("aux", "z", "dropped")}
    out["load"] = jnp.concatenate([v.reshape(-1, X) for v in found["load"]])
    return out


def penalty(stats: Any, moe: MoEConfig) -> jax.Array:
    """What the train step adds to the cross-entropy it differentiates: aux_loss_coef · mean aux
    + z_loss_coef · mean z, the means over the MoE layers."""
    s = layer_stats(stats)
    return moe.aux_loss_coef * s["aux"].mean() + moe.z_loss_coef * s["z"].mean()


def step_metrics(stats: Any) -> dict[str, jax.Array]:
    """The logged MoE metrics: `moe_aux_loss` and `moe_z_loss` (means over MoE layers, before the
    coefficients), `moe_load_imbalance` (the worst layer's max / mean per-expert assignment
    count; 1.0 is balanced) and `moe_dropped_fraction` (assignments dropped, mean over layers)."""
    s = layer_stats(stats)
    load_LX = s["load"]
    return {"moe_aux_loss": s["aux"].mean(), "moe_z_loss": s["z"].mean(),
            "moe_load_imbalance": (load_LX.max(-1) / load_LX.mean(-1)).max(),
            "moe_dropped_fraction": s["dropped"].mean()}


def bias_step(bias_X: jax.Array, load_X: jax.Array, rate: float) -> jax.Array:
    """One loss-free balancing update along the last axis: bias + rate · sign(mean load − load),
    re-centred to zero mean (under-loaded experts become likelier to be chosen)."""
    new = bias_X + rate * jnp.sign(load_X.mean(-1, keepdims=True) - load_X)
    return new - new.mean(-1, keepdims=True)


def update_bias(model_state: Any, stats: Any, rate: float) -> Any:
    """`model_state` ({"moe_bias": tree} or {}) after one step whose sown `stats` (the
    `moe_stats` tree, averaged over the whole step's batch) give each layer's load."""
    if BIAS not in model_state:
        return model_state

    def walk(bias: Any, sown: Any) -> Any:
        return {k: bias_step(v, sown["load"][0], rate) if k == "bias" else walk(v, sown[k])
                for k, v in bias.items()}

    return {**model_state, BIAS: walk(model_state[BIAS], stats)}
