"""Ring attention over the `context` axis: K/V blocks travel around the ring, queries stay.

Runs inside a `shard_map` that is manual over `context` (`jaxsys.parallel.context`). Device i
of c holds one block of the sequence: its queries q, keys k and values v ([b, t, h, E] and
[b, t, k, E], t = T / c positions). At ring step r it attends its queries over the K/V block
that started on device (i - r) mod c, and passes that block on to device i + 1 with `ppermute`.
Each step gives a partial output and its log-sum-exp (`attention.attention_with_lse`); the
partials merge exactly by online softmax:

    lse = logaddexp(lse, lse_r);   o = o · exp(lse_old - lse) + o_r · exp(lse_r - lse)

The backward is a ring too (a `jax.custom_vjp`, so no step's K/V block is kept for autodiff):
the K/V blocks travel again, each with a float32 dK/dV accumulator that every device adds its
share to; after c sends the accumulator is home. They travel the other way round (i -> i - 1):
sent the same way as in the forward, XLA merged the two rings' identical sends (measured: 14
instead of 20 per layer at c = 4) and so kept every rotated block alive from the forward to the
backward, the memory the ring is there to save. (At c = 2 both ways are the same swap, and XLA
merges the one K/V send of each: one extra block kept per layer. An optimization barrier on
the residuals did not stop it.) A step's share comes from
`jax.vjp` of that step's block attention with the cotangents of the merge: with w_r =
exp(lse_r - lse), the block's output gets w_r · dO and its lse gets w_r · Σ_E dO·(o_r - o).

The steps after the first run in a `lax.scan`, so one block's scores exist at a time: per-device
temporaries fall as (T/c)², and the longest sequence a memory budget allows grows linearly with
c (unrolled, XLA kept every step's block alive at once: ~T²/c). A block is sent on at the start
of the step that attends the previous one; the two are independent, free to overlap.

Causal masks (queries see keys at positions ≤ their own) are exact per block and skip work:
- contiguous layout (device i holds chunk i): a block from an earlier device is seen whole,
  one from a later device not at all (skipped: its lse is -inf, its weight 0);
- zigzag layout (device i holds chunks i and 2c-1-i, `context.layout_order`): a block from an
  earlier device is seen by all queries but only in its first half; one from a later device
  only by the second half of the queries, whole. Every step r > 0 is half a block's work on
  every device: the load balance.
Step 0 (the device's own block) is the causal diagonal in both layouts: positions increase
along a device's local block, so the plain causal mask is the positional one.

Packed documents: each block's segment ids travel with it (both rings), and every block's
attention also masks by them. A query that sees no key of a block gets an lse of about -3e38,
so the block's weight in the merge is 0 (and so are its gradients).

Shapes: b rows, t local positions, h query heads, k K/V heads on this device, E head size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxsys.model.attention import attention_with_lse

AXIS = "context"


@dataclasses.dataclass(frozen=True)
class RingStatics:
    """What the ring needs at trace time: the ring's size, the mask, the layout, the kernel."""

    size: int  # c, the context axis size
    causal: bool
    zigzag: bool
    impl: str  # "xla" or "pallas": the block attention
    scale: float | None = None


def ring_attention(q_bthE: jax.Array, k_btkE: jax.Array, v_btkE: jax.Array, st: RingStatics,
                   segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """This device's attention output [b, t, h, E] (q's dtype) over the whole ring's K/V;
    with `segment_ids_bt` (packed documents, this device's positions) only within documents."""
    return _ring(st, q_bthE, k_btkE, v_btkE, segment_ids_bt)


def _weight(lse_r_bht: jax.Array, lse_bht: jax.Array) -> jax.Array:
    """exp(lse_r - lse) as [b, t, h, 1]: a block's share of the merged softmax."""
    return jnp.exp(lse_r_bht - lse_bht).transpose(0, 2, 1)[..., None]


def _skipped(q_bthE: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t, h, _ = q_bthE.shape
    return jnp.zeros(q_bthE.shape, jnp.float32), jnp.full((b, h, t), -jnp.inf, jnp.float32)


def _block(st: RingStatics, shift: jax.Array | int, q: jax.Array, k: jax.Array, v: jax.Array,
           q_seg: jax.Array | None, kv_seg: jax.Array | None, diagonal: bool = False,
           ) -> tuple[jax.Array, jax.Array]:
    """(o float32 [b, t, h, E], lse [b, h, t]) of this device's queries over the K/V block that
    started on device (i - shift) mod c (`diagonal`: its own block), with the causal mask exact
    for the layout and, with segment ids ([b, t] each), the documents'."""
    def attend(q, k, v, *, causal, qs=slice(None), ks=slice(None)):
        seg = None if q_seg is None else (q_seg[:, qs], kv_seg[:, ks])
        return attention_with_lse(q, k, v, causal=causal, impl=st.impl, scale=st.scale, segment_ids=seg)

    if diagonal:
        return attend(q, k, v, causal=st.causal)
    if not st.causal:
        return attend(q, k, v, causal=False)
    i = jax.lax.axis_index(AXIS)
    earlier = (i - shift) % st.size < i  # the block's owner precedes this device
    if not st.zigzag:
        return jax.lax.cond(earlier, lambda: attend(q, k, v, causal=False), lambda: _skipped(q))
    half = q.shape[1] // 2

    def first_half_of_keys():
        return attend(q, k[:, :half], v[:, :half], causal=False, ks=slice(None, half))

    def second_half_of_queries():
        o_bthE, lse_bht = attend(q[:, half:], k, v, causal=False, qs=slice(half, None))
        zero_o, none_lse = _skipped(q[:, :half])
        return (jnp.concatenate([zero_o, o_bthE], axis=1), jnp.concatenate([none_lse, lse_bht], axis=2))

    return jax.lax.cond(earlier, first_half_of_keys, second_half_of_queries)


def _send(x, step: int = 1):
    """Pass a pytree of blocks `step` devices on around the ring (device j -> j + step)."""
    size = jax.lax.axis_size(AXIS)
    return jax.lax.ppermute(x, AXIS, [(j, (j + step) % size) for j in range(size)])


def _steps(size: int, body, carry):
    """`carry = body(carry, r, last)` for ring steps r = 1 .. size-1: a `lax.scan` over all but
    the last (one block's temporaries at a time: unrolled, XLA kept every step's score block
    alive at once, measured ~T²/c per device), then the last, which sends nothing further."""
    if size > 2:
        carry, _ = jax.lax.scan(lambda cr, r: (body(cr, r, False), None), carry, jnp.arange(1, size - 1))
    return body(carry, size - 1, True)


def _forward(st: RingStatics, q, k, v, seg) -> tuple[jax.Array, jax.Array]:
    """Merged (o float32, lse) over every block of the ring; a block's segment ids travel with it."""
    kv = _send((k, v, seg)) if st.size > 1 else None  # the next block travels while this one is attended
    o, lse = _block(st, 0, q, k, v, seg, seg, diagonal=True)
    if st.size == 1:
        return o, lse

    def step(carry, r, last):
        o, lse, kv = carry
        nxt = kv if last else _send(kv)
        o_r, lse_r = _block(st, r, q, kv[0], kv[1], seg, kv[2])
        merged = jnp.logaddexp(lse, lse_r)
        return o * _weight(lse, merged) + o_r * _weight(lse_r, merged), merged, nxt

    o, lse, _ = _steps(st.size, step, (o, lse, kv))
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: RingStatics, q, k, v, seg):
    return _forward(st, q, k, v, seg)[0].astype(q.dtype)


def _ring_fwd(st: RingStatics, q, k, v, seg):
    o, lse = _forward(st, q, k, v, seg)
    return o.astype(q.dtype), (q, k, v, seg, o, lse)


def _ring_bwd(st: RingStatics, res, do_bthE):
    q, k, v, seg, o, lse = res
    do = do_bthE.astype(jnp.float32)

    def grads(shift, kv, diagonal=False):
        """This device's share of dq, dk, dv through the block (k, v, its segment ids) that
        started on i - shift."""
        (o_r, lse_r), vjp = jax.vjp(lambda q_, k_, v_: _block(st, shift, q_, k_, v_, seg, kv[2], diagonal),
                                    q, kv[0], kv[1])
        w = _weight(lse_r, lse)
        dlse_r = (w[..., 0] * jnp.einsum("bthe,bthe->bth", do, o_r - o)).transpose(0, 2, 1)
        return [g.astype(jnp.float32) for g in vjp((w * do, dlse_r))]

    dq, dk, dv = grads(0, (k, v, seg), diagonal=True)
    if st.size == 1:
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None
    # The other way round: at step r, the block of device i + r with its accumulator.
    carry = (dq, _send((k, v, seg), -1), _send((dk, dv), -1))

    def step(carry, r, last):
        dq, kv, dkv = carry
        dq_r, dk_r, dv_r = grads(-r, kv)
        dkv = _send((dkv[0] + dk_r, dkv[1] + dv_r), -1)  # after c sends, home
        return dq + dq_r, (kv if last else _send(kv, -1)), dkv

    dq, _, (dk, dv) = _steps(st.size, step, carry)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
