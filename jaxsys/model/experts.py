"""The routed experts of an MoE layer on one device: the plain version of the `experts` hook.

`experts(x_BTD, expert_BTI, slot_BTI, weight_BTI, w, act=, capacity=, dispatch=) -> y_BTD` is
y[b, t] = Σ_i weight[b, t, i] · expert_{expert[b, t, i]}(x[b, t]) over the kept assignments
(slot < capacity); a dropped assignment contributes 0 (the block's residual carries its token).
Routing (which experts, their weights and slots) is computed before, in `jaxsys.model.moe`.

Two dispatch modes:
  capacity  each row's assignments are scattered into per-expert buffers [B, X, U, D] at their
            slots, every expert runs one batched matmul over its U slots, the outputs are
            gathered back. Compute is B·X·U tokens whatever the routing.
  dropless  all B·T·I assignments sorted by expert, `jax.lax.ragged_dot` (a grouped matmul
            with the experts' group sizes), then unsorted. Nothing drops; compute is B·T·I.

`w`: "w_in" [X, D, F], "w_out" [X, F, D], and "w_gate" [X, D, F] for "swiglu" (llama), all in
the compute dtype. `act` ∈ {"swiglu", "gelu_tanh", "gelu_exact"}. Experts have no biases.

Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed, F expert hidden, X experts,
I a token's expert choices (top_k), U capacity (slots per expert and sequence).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ACTS = ("swiglu", "gelu_tanh", "gelu_exact")


def ffn(x: jax.Array, w: dict[str, jax.Array], act: str,
        matmul: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """One expert MLP on `x` with `matmul(x, w_XDF)` doing the per-expert contraction (batched
    einsum or grouped ragged_dot): the activation of `act`, then w_out."""
    if act == "swiglu":
        h = jax.nn.silu(matmul(x, w["w_gate"])) * matmul(x, w["w_in"])
    elif act in ("gelu_tanh", "gelu_exact"):
        h = jax.nn.gelu(matmul(x, w["w_in"]), approximate=act == "gelu_tanh")
    else:
        raise ValueError(f"unknown expert activation {act!r}; one of {ACTS}")
    return matmul(h, w["w_out"])


def capacity_experts(x_BTD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array,
                     weight_BTI: jax.Array, w: dict[str, jax.Array], act: str, capacity: int) -> jax.Array:
    """Capacity dispatch: scatter into [B, X, U, D] by slot, batched expert matmuls, gather back."""
    B, T, D = x_BTD.shape
    X, U = w["w_in"].shape[0], capacity
    b_BTI = jnp.broadcast_to(jnp.arange(B)[:, None, None], expert_BTI.shape)
    x_BTID = jnp.broadcast_to(x_BTD[:, :, None, :], (*expert_BTI.shape, D))
    # Slot U is a bin for the dropped assignments, cut off before the experts run.
    buf_BXUD = jnp.zeros((B, X, U + 1, D), x_BTD.dtype).at[b_BTI, expert_BTI, slot_BTI].add(x_BTID)[:, :, :U]
    out_BXUD = ffn(buf_BXUD, w, act, lambda h, w_X: jnp.einsum("bxud,xdf->bxuf", h, w_X))
    out_BXUD = jnp.pad(out_BXUD, ((0, 0), (0, 0), (0, 1), (0, 0)))  # dropped: read a zero slot
    y_BTID = out_BXUD[b_BTI, expert_BTI, slot_BTI]
    return jnp.einsum("btid,bti->btd", y_BTID, weight_BTI.astype(y_BTID.dtype))


def dropless_experts(x_BTD: jax.Array, expert_BTI: jax.Array, weight_BTI: jax.Array,
                     w: dict[str, jax.Array], act: str) -> jax.Array:
    """Dropless dispatch: the B·T·I assignments sorted by expert through `ragged_dot`, unsorted."""
    B, T, D = x_BTD.shape
    I, X = expert_BTI.shape[-1], w["w_in"].shape[0]
    expert_flat = expert_BTI.reshape(-1)  # [B·T·I], token-major
    order = jnp.argsort(expert_flat, stable=True)  # sorted position -> assignment
    sizes_X = jnp.bincount(expert_flat, length=X).astype(jnp.int32)
    x_sorted = x_BTD.reshape(B * T, D)[order // I]  # [B·T·I, D], grouped by expert
    y_sorted = ffn(x_sorted, w, act, lambda h, w_X: jax.lax.ragged_dot(h, w_X, sizes_X))
    y_BTID = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(B, T, I, D)
    return jnp.einsum("btid,bti->btd", y_BTID, weight_BTI.astype(y_BTID.dtype))


def experts_reference(x_BTD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array,
                      weight_BTI: jax.Array, w: dict[str, jax.Array], *, act: str, capacity: int,
                      dispatch: str) -> jax.Array:
    """The plain `experts` hook: y_BTD = Σ_i weight · expert(x) over kept assignments, by
    `dispatch` ("capacity" or "dropless"; see the module docstring)."""
    if dispatch == "capacity":
        return capacity_experts(x_BTD, expert_BTI, slot_BTI, weight_BTI, w, act, capacity)
    if dispatch == "dropless":
        return dropless_experts(x_BTD, expert_BTI, weight_BTI, w, act)
    raise ValueError(f"unknown MoE dispatch {dispatch!r}; 'capacity' or 'dropless'")
