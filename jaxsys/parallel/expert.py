"""Expert parallelism (GShard, DeepSpeed-MoE): the MoE experts split over the `expert` mesh axis,
tokens sent to the devices that own their experts by all-to-all, and back.

Shapes (`jaxsys.model.axes`): B batch (b: this device's rows), T sequence, D embed, I a token's
expert choices (top_k), X routed experts (x = X / expert on one device), U capacity (slots of one
expert's buffer per sequence), F expert hidden (f = F / tensor on one device), n = mesh.expert.

`jaxsys.model.moe` routes outside any hook (the router, top-k, combine weights, each assignment's
slot, the auxiliary losses: plain jnp on global arrays) and calls `hooks.experts`. Its parallel
version here runs under `jax.shard_map`, manual over the batch axes (data, fsdp, expert) and
`tensor`:

1. dispatch: each device scatters its rows' kept assignments into buffers [b, X, U, D] (slot
   == U: dropped, the token contributes nothing here and rides the residual);
2. all-to-all over `expert`: the X axis is cut into n blocks of x experts, block j goes to device
   j, which receives [n·b, x, U, D]: the buffers of its own experts from every device;
3. its x experts run as batched matmuls on their own weights ([x, D, f], [x, f, D]: the
   `expert` dimension is split by the rules, F by `tensor`);
4. all-to-all back ([n·b, x, U, D] -> [b, X, U, D]), gather each assignment's row, weighted sum
   over I; with tensor > 1 a psum over tensor adds the row-parallel partial sums (on [b, T, D],
   the smallest place to do it).

The backward is autodiff's: the transpose of each all-to-all is the all-to-all the other way, so
per MoE layer a step sends four buffers of b·X·U·D elements, (n − 1)/n of each on the wire
(`jaxsys.tools.planner.closed_form_expert`). Capacity is per sequence, so splitting rows over
devices never changes which tokens drop. Dropless mode uses U = T buffers here (every assignment
fits; a token picks an expert at most once): `ragged_all_to_all`, which would send only the
assigned rows, does not run on XLA:CPU. That costs X·T/(T·I) = X/I times the dropless volume
on the wire and in memory; use capacity mode for large X.

Composition: data and fsdp split rows like `expert`; at ZeRO-3 the experts' `embed` dimension
is all-gathered over fsdp before use, by the `use_weight` hook (GSPMD, or `jaxsys.parallel.zero`
inside its manual region, which also hands each device its own experts). Inside that region the
batch axes are already manual and `manual.shard_map` keeps only `tensor`.

The function equals the plain `hooks.experts` (`jaxsys.model.experts.experts_reference`) (tests/parallel/test_expert.py and the layout
equivalence tests check it against one device); initialisation traces with a batch of one row,
which does not split: there the plain version runs.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsys.model import experts as experts_lib
from jaxsys.model.axes import EXPERT_XDF, EXPERT_XFD
from jaxsys.parallel.manual import manual_axes, shard_map
from jaxsys.parallel.mesh import DATA_AXES
from jaxsys.parallel.rules import Rules, logical_to_spec



def expert_ffn(buf_GxUD: jax.Array, w: dict[str, jax.Array], act: str) -> jax.Array:
    """Each of the x local experts on its own buffers: [G, x, U, D] -> [G, x, U, D] (G any
    leading batch of buffers; with F split over tensor the result is a partial sum). The
    model's own expert MLP (`jaxsys.model.experts.ffn`), so both compute the same function."""
    return experts_lib.ffn(buf_GxUD, w, act, lambda h, w_x: jnp.einsum("gxud,xdf->gxuf", h, w_x.astype(h.dtype)))


def to_buffers(x_BTD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array, num_experts: int,
             capacity: int) -> jax.Array:
    """Scatter each row's kept assignments into its experts' buffers: [B, X, U, D] (zeros where
    no token sits; slot == U, dropped, lands in a spare slot that is cut off)."""
    B, T, D = x_BTD.shape
    I = expert_BTI.shape[-1]
    rows_BTI = jnp.broadcast_to(jnp.arange(B)[:, None, None], (B, T, I))
    x_BTID = jnp.broadcast_to(x_BTD[:, :, None, :], (B, T, I, D))
    buf = jnp.zeros((B, num_experts, capacity + 1, D), x_BTD.dtype)
    return buf.at[rows_BTI, expert_BTI, slot_BTI].add(x_BTID)[:, :, :capacity]


def from_buffers(out_BXUD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array,
            weight_BTI: jax.Array) -> jax.Array:
    """Each assignment's expert output, weighted and summed over I: [B, T, D] (dropped: 0)."""
    B = out_BXUD.shape[0]
    padded = jnp.pad(out_BXUD, ((0, 0), (0, 0), (0, 1), (0, 0)))  # slot U reads zeros
    rows_BTI = jnp.broadcast_to(jnp.arange(B)[:, None, None], expert_BTI.shape)
    y_BTID = padded[rows_BTI, expert_BTI, slot_BTI]
    return jnp.einsum("btid,bti->btd", y_BTID, weight_BTI.astype(y_BTID.dtype))


def _batch_ways(mesh: Mesh) -> int:
    return math.prod(dict(mesh.shape)[a] for a in DATA_AXES)


def expert_parallel(mesh: Mesh, rules: Rules, x_BTD: jax.Array, expert_BTI: jax.Array,
                    slot_BTI: jax.Array, weight_BTI: jax.Array, w: dict[str, jax.Array], *,
                    act: str, capacity: int, dispatch: str,
                    plain: Callable[..., jax.Array] | None = None) -> jax.Array:
    """The parallel `hooks.experts` (see the module docstring): y_BTD = Σ_i weight_i ·
    expert_i(x) over kept assignments, with the experts split over `expert`. `w`: "w_in"
    [X, D, F], "w_out" [X, F, D] and for SwiGLU "w_gate" [X, D, F], at their point of use.
    `dispatch` ("capacity" or "dropless") only matters to `plain`, which runs when the batch
    does not split over the batch axes (initialisation's one row); both modes use buffers of
    `capacity` slots here (U = T in dropless mode)."""
    n = dict(mesh.shape)["expert"]
    if x_BTD.shape[0] % _batch_ways(mesh) and not manual_axes() & set(DATA_AXES):
        plain = plain or experts_lib.experts_reference
        return plain(x_BTD, expert_BTI, slot_BTI, weight_BTI, w, act=act, capacity=capacity, dispatch=dispatch)
    tensor_split = dict(mesh.shape)["tensor"] > 1

    compute_dtype = x_BTD.dtype

    def local(x_bTD, e_bTI, s_bTI, wt_bTI, w_local):
        x_bTD, wt_bTI = x_bTD.astype(compute_dtype), wt_bTI.astype(compute_dtype)
        w_local = {k: v.astype(compute_dtype) for k, v in w_local.items()}
        X = w_local["w_in"].shape[0] * n
        buf_bXUD = to_buffers(x_bTD, e_bTI, s_bTI, X, capacity)
        # Block j of the X axis (experts j·x ... (j+1)·x − 1) goes to device j; device i's rows
        # arrive as block i of the leading axis.
        recv_GxUD = jax.lax.all_to_all(buf_bXUD, "expert", split_axis=1, concat_axis=0, tiled=True)
        out_GxUD = expert_ffn(recv_GxUD, w_local, act)
        out_bXUD = jax.lax.all_to_all(out_GxUD, "expert", split_axis=0, concat_axis=1, tiled=True)
        y_bTD = from_buffers(out_bXUD, e_bTI, s_bTI, wt_bTI)
        if not tensor_split:
            return y_bTD
        return jax.lax.psum(y_bTD.astype(jnp.float32), "tensor").astype(y_bTD.dtype)

    rows = P(DATA_AXES)
    w_specs = {k: logical_to_spec(EXPERT_XFD if k == "w_out" else EXPERT_XDF, rules) for k in w}
    # check_vma=False: the transposes of all_to_all (all_to_all back) and of the final psum over
    # tensor (with the output's cotangent divided over the unmentioned tensor axis) are exact;
    # gradients of weights that enter replicated over data/fsdp are summed by shard_map's
    # transpose, as in `jaxsys.parallel.zero`'s region the explicit sync does.
    # Every cross-device sum runs in float32: the float inputs enter as float32 (cast back to the
    # compute dtype inside), so the sums of their cotangents over the axes they are replicated on
    # (tensor for x and the combine weights; the batch axes for the experts' weights) are float32
    # too. A bfloat16 psum inside shard_map crashes XLA:CPU's all-reduce promotion pass (jax
    # 0.10.2: "Invalid binary instruction opcode copy"), and float32 sums are the better numerics.
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return shard_map(local, mesh, {*DATA_AXES, "tensor"},
                     in_specs=(rows, rows, rows, rows, w_specs), out_specs=rows,
                     check_vma=False)(f32(x_BTD), expert_BTI, slot_BTI, f32(weight_BTI),
                                      {k: f32(v) for k, v in w.items()})


def experts_hook(mesh: Mesh, rules: Rules, plain: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`expert_parallel` bound to `mesh` and `rules`, falling back to `plain` (the model's own
    `hooks.experts`) where the batch does not split."""
    def hook(x_BTD: jax.Array, expert_BTI: jax.Array, slot_BTI: jax.Array, weight_BTI: jax.Array,
             w: dict[str, jax.Array], *, act: str, capacity: int, dispatch: str) -> jax.Array:
        return expert_parallel(mesh, rules, x_BTD, expert_BTI, slot_BTI, weight_BTI, w, act=act,
                               capacity=capacity, dispatch=dispatch, plain=plain)
    return hook


def used(mesh: Mesh) -> bool:
    """Does this mesh split the experts (mesh.expert > 1)?"""
    return dict(mesh.shape).get("expert", 1) > 1
