"""FlashAttention-2 in Pallas: tiled forward with online softmax, backward from the log-sum-exp.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (G = H // K
query heads share K/V head h // G; K/V are never repeated), E head size; Tp, Sp the lengths
padded up to whole blocks, bq / bk the query / key block sizes. Inside a kernel, lower case is
one tile's share: t the bq query rows, s the bk key rows (`s_ts` is a score tile, `q_tE` a
query tile), as in the glossary of `jaxsys.model.axes`. Layout [B, T, H, E] as in the
model. `pallas_kernels.reference.flash_attention_reference` is the plain-`jnp` twin.

Three `pallas_call`s joined by `jax.custom_vjp` (`jax.grad` cannot go through a pallas_call):
- forward, grid (B, H, Tp/bq): one query block against the key blocks it can see, running
  max `m` and sum `l` (online softmax); writes o and lse = m + log(l). The [T, S] score matrix
  exists only one [bq, bk] tile at a time.
- dq, grid (B, H, Tp/bq): loops over key blocks, p = exp(s - lse), ds = p·(dp - delta) with
  delta = rowsum(dO·O) (minus the lse cotangent, which enters the same way).
- dk/dv, grid (B, K, Sp/bk): one key block, loops over the G query heads of its K/V head and
  over the query blocks that can see it, so the GQA reduction happens inside the kernel.

Causal attention does not visit fully masked blocks: the key loop of a query block stops at
`_causal_kv_end`, and the query loop of a key block starts at `_causal_q_start`.

Modes: on a GPU backend the kernel is compiled through the Triton lowering
(`compiler_params=pallas.triton.CompilerParams`); anywhere else it runs with `interpret=True`.
`interpret=` forces either. The GPU path is UNTESTED ON A GPU and its block sizes and warp
counts are untuned (no GPU was available when it was written): tuning is owed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.reference import MASK_VALUE

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
GPU_HEAD_DIMS = (64, 128, 256)
# (block_q, block_k) per head dim, sized so a [bq, E] q tile, two [bk, E] K/V tiles and the
# fp32 accumulator fit in an SM's shared memory/registers. Starting points; GPU tuning owed.
DEFAULT_BLOCKS = {64: (128, 128), 128: (128, 64), 256: (64, 32)}


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is known at trace time."""

    causal: bool
    scale: float
    T: int  # true (unpadded) lengths
    S: int
    block_q: int
    block_k: int
    groups: int  # G
    segments: bool
    interpret: bool

    @property
    def offset(self) -> int:  # query t is at absolute position t + offset
        return self.S - self.T

    @property
    def needs_mask(self) -> bool:
        return self.causal or self.segments or self.S % self.block_k != 0


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """(block_q, block_k) for `head_dim`; the nearest tabulated head dim for others."""
    nearest = min(DEFAULT_BLOCKS, key=lambda d: abs(d - head_dim))
    return DEFAULT_BLOCKS[nearest]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting a's dim contract[0] with b's dim contract[1], fp32 accumulation."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32)


def _causal_kv_end(st: _Static, q_block: jax.Array, num_kv_blocks: int) -> jax.Array:
    """One past the last key block that query block `q_block` can see (causal)."""
    last_key = q_block * st.block_q + st.block_q - 1 + st.offset  # seen by the block's last row
    return jnp.minimum(lax.div(jnp.maximum(last_key + st.block_k, 0), st.block_k), num_kv_blocks)


def _causal_q_start(st: _Static, kv_block: jax.Array) -> jax.Array:
    """First query block whose rows can see key block `kv_block` (causal)."""
    first_row = jnp.maximum(kv_block * st.block_k - st.offset, 0)
    return lax.div(first_row, st.block_q)


def _mask(st: _Static, q_start, k_start, q_seg=None, kv_seg=None) -> jax.Array:
    """[bq, bk] True where query row may attend key column (causal, segments, padding)."""
    rows = q_start + lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 1)
    mask = cols < st.S
    if st.causal:
        mask &= rows + st.offset >= cols
    if st.segments:
        mask &= q_seg[:, None] == kv_seg[None, :]
    return mask


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(*refs, st: _Static):
    if st.segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
        q_seg = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg = kseg_ref = None
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q_tE = q_ref[...]
    num_kv = k_ref.shape[0] // bk

    def body(j, carry):
        acc_tE, m_t, l_t = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_sE, v_sE = k_ref[ks, :], v_ref[ks, :]
        s_ts = _dot(q_tE, k_sE, (1, 1)) * st.scale
        if st.needs_mask:
            kv_seg = kseg_ref[ks] if st.segments else None
            s_ts = jnp.where(_mask(st, i * bq, j * bk, q_seg, kv_seg), s_ts, MASK_VALUE)
        m_new = jnp.maximum(m_t, s_ts.max(axis=1))
        alpha = jnp.exp(m_t - m_new)  # rescales what was accumulated under the old max
        p_ts = jnp.exp(s_ts - m_new[:, None])
        l_new = alpha * l_t + p_ts.sum(axis=1)
        acc_new = alpha[:, None] * acc_tE + _dot(p_ts.astype(v_sE.dtype), v_sE, (1, 0))
        return acc_new, m_new, l_new

    end = _causal_kv_end(st, i, num_kv) if st.causal else num_kv
    init = (jnp.zeros(q_tE.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc_tE, m_t, l_t = lax.fori_loop(0, end, body, init)
    # Guard l = 0 (a row that visited no key block) so that nothing here can produce NaN.
    l_safe = jnp.where(l_t == 0.0, 1.0, l_t)
    o_ref[...] = (acc_tE / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l_t == 0.0, MASK_VALUE, m_t + jnp.log(l_safe))


# ----------------------------------------------------------------------------- backward kernels


def _dq_kernel(*refs, st: _Static):
    if st.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
        q_seg = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg = kseg_ref = None
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q_tE, do_tE = q_ref[...], do_ref[...]
    lse_t, delta_t = lse_ref[...], delta_ref[...]
    num_kv = k_ref.shape[0] // bk

    def body(j, dq_tE):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_sE, v_sE = k_ref[ks, :], v_ref[ks, :]
        s_ts = _dot(q_tE, k_sE, (1, 1)) * st.scale
        p_ts = jnp.exp(s_ts - lse_t[:, None])
        if st.needs_mask:
            kv_seg = kseg_ref[ks] if st.segments else None
            p_ts = jnp.where(_mask(st, i * bq, j * bk, q_seg, kv_seg), p_ts, 0.0)
        dp_ts = _dot(do_tE, v_sE, (1, 1))
        ds_ts = p_ts * (dp_ts - delta_t[:, None])
        return dq_tE + _dot(ds_ts.astype(k_sE.dtype), k_sE, (1, 0))

    end = _causal_kv_end(st, i, num_kv) if st.causal else num_kv
    dq_tE = lax.fori_loop(0, end, body, jnp.zeros(q_tE.shape, jnp.float32))
    dq_ref[...] = (dq_tE * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static):
    if st.segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dk_ref, dv_ref) = refs
        kv_seg = kseg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kv_seg = None
    bq, bk = st.block_q, st.block_k
    j = pl.program_id(2)
    k_sE, v_sE = k_ref[...], v_ref[...]
    num_q = q_ref.shape[0] // bq
    start = _causal_q_start(st, j) if st.causal else 0

    def q_body(g, i, carry):
        dk_sE, dv_sE = carry
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_tE, do_tE = q_ref[qs, g, :], do_ref[qs, g, :]
        lse_t, delta_t = lse_ref[g, qs], delta_ref[g, qs]
        s_ts = _dot(q_tE, k_sE, (1, 1)) * st.scale
        p_ts = jnp.exp(s_ts - lse_t[:, None])
        if st.needs_mask:
            q_seg = qseg_ref[qs] if st.segments else None
            p_ts = jnp.where(_mask(st, i * bq, j * bk, q_seg, kv_seg), p_ts, 0.0)
        dv_sE = dv_sE + _dot(p_ts.astype(do_tE.dtype), do_tE, (0, 0))
        dp_ts = _dot(do_tE, v_sE, (1, 1))
        ds_ts = p_ts * (dp_ts - delta_t[:, None])
        dk_sE = dk_sE + _dot(ds_ts.astype(q_tE.dtype), q_tE, (0, 0))
        return dk_sE, dv_sE

    def g_body(g, carry):  # the G query heads that share this K/V head
        return lax.fori_loop(start, num_q, functools.partial(q_body, g), carry)

    zeros = jnp.zeros(k_sE.shape, jnp.float32)
    dk_sE, dv_sE = lax.fori_loop(0, st.groups, g_body, (zeros, zeros))
    dk_ref[...] = (dk_sE * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sE.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _call(kernel, st: _Static, head_dim: int, grid, in_specs, out_specs, out_shape, name: str):
    params = None
    if not st.interpret:  # GPU: Triton lowering of the BlockSpec kernel (untested, untuned)
        try:  # deprecated in JAX 0.11 (still present there), to be removed later
            from jax.experimental.pallas import triton as pltriton
        except ImportError as e:
            raise NotImplementedError(
                f"flash_attention: this JAX ({jax.__version__}) has no Pallas Triton backend; "
                "run with interpret=True, or use cuDNN attention.") from e
        params = pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=st.interpret,
                          compiler_params=params, name=name)


def _seg_specs(st: _Static, q_block: bool, Tp: int, Sp: int) -> list[pl.BlockSpec]:
    """Segment-id specs: the query ids by block (fwd, dq) or whole (dk/dv), keys the reverse."""
    if q_block:
        return [pl.BlockSpec((None, st.block_q), lambda b, h, i: (b, i)),
                pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))]
    return [pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, st.block_k), lambda b, h, j: (b, j))]


def _forward(st: _Static, q, k, v, qseg, kseg):
    """Padded inputs -> (o [B,Tp,H,E], lse [B,H,Tp] float32)."""
    B, Tp, H, E = q.shape
    Sp, G = k.shape[1], st.groups
    q_spec = pl.BlockSpec((None, st.block_q, None, E), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, E), lambda b, h, i: (b, 0, h // G, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if st.segments:
        in_specs += _seg_specs(st, True, Tp, Sp)
        args += [qseg, kseg]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i))]
    o, lse = _call(_fwd_kernel, st, E, (B, H, Tp // st.block_q), in_specs, out_specs,
                   out_shape, "flash_attention_fwd")(*args)
    return o, lse


def _backward(st: _Static, q, k, v, qseg, kseg, do, lse, delta):
    """Padded inputs -> (dq, dk, dv) in the inputs' dtypes."""
    B, Tp, H, E = q.shape
    Sp, K, G = k.shape[1], k.shape[2], st.groups
    seg_args = [qseg, kseg] if st.segments else []

    q_spec = pl.BlockSpec((None, st.block_q, None, E), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, E), lambda b, h, i: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if st.segments:
        in_specs += _seg_specs(st, True, Tp, Sp)
    dq = _call(_dq_kernel, st, E, (B, H, Tp // st.block_q), in_specs, q_spec,
               jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_attention_dq",
               )(q, k, v, do, lse, delta, *seg_args)

    # Grid over K/V heads: block kh of the H axis (size G) holds exactly its query heads.
    qg_spec = pl.BlockSpec((None, Tp, G, E), lambda b, kh, j: (b, 0, kh, 0))
    kb_spec = pl.BlockSpec((None, st.block_k, None, E), lambda b, kh, j: (b, j, kh, 0))
    rows_spec = pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))
    in_specs = [qg_spec, kb_spec, kb_spec, qg_spec, rows_spec, rows_spec]
    if st.segments:
        in_specs += _seg_specs(st, False, Tp, Sp)
    dk, dv = _call(_dkv_kernel, st, E, (B, K, Sp // st.block_k), in_specs, [kb_spec, kb_spec],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   "flash_attention_dkv")(q, k, v, do, lse, delta, *seg_args)
    return dq, dk, dv


def _pad_to(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _padded(st: _Static, q, k, v, qseg, kseg):
    Tp = -(-st.T // st.block_q) * st.block_q
    Sp = -(-st.S // st.block_k) * st.block_k
    return (_pad_to(q, 1, Tp), _pad_to(k, 1, Sp), _pad_to(v, 1, Sp), _pad_to(qseg, 1, Tp),
            _pad_to(kseg, 1, Sp))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, qseg, kseg):
    o, lse = _forward(st, *_padded(st, q, k, v, qseg, kseg))
    return o[:, :st.T], lse[:, :, :st.T]


def _flash_fwd(st: _Static, q, k, v, qseg, kseg):
    padded = _padded(st, q, k, v, qseg, kseg)
    o, lse = _forward(st, *padded)
    return (o[:, :st.T], lse[:, :, :st.T]), (padded, o, lse)


def _flash_bwd(st: _Static, res, cotangents):
    (q, k, v, qseg, kseg), o, lse = res
    do, dlse = cotangents
    Tp = q.shape[1]
    do = _pad_to(do.astype(q.dtype), 1, Tp)
    # d lse / d s = p, so an lse cotangent joins ds = p·(dp - delta) as delta - dlse.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - _pad_to(dlse.astype(jnp.float32), 2, Tp)
    dq, dk, dv = _backward(st, q, k, v, qseg, kseg, do, lse, delta)
    return dq[:, :st.T], dk[:, :st.S], dv[:, :st.S], None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret=None` means: compiled on a GPU backend, interpreted everywhere else."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def check_supported(q_shape, k_shape, v_shape, dtype, *, interpret: bool, causal: bool = False,
                    block_q: int | None = None, block_k: int | None = None) -> None:
    """Raise `ValueError` naming the constraint when the kernel cannot run these inputs."""
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        raise ValueError(f"flash_attention expects [batch, seq, heads, head_dim] arrays, got "
                         f"q{tuple(q_shape)}, k{tuple(k_shape)}, v{tuple(v_shape)}.")
    B, T, H, E = q_shape
    if tuple(k_shape) != tuple(v_shape) or k_shape[0] != B or k_shape[3] != E:
        raise ValueError(f"k and v must both be [batch={B}, S, kv_heads, head_dim={E}]; got "
                         f"k{tuple(k_shape)}, v{tuple(v_shape)}.")
    if causal and T > k_shape[1]:
        raise ValueError(f"causal attention with more queries ({T}) than keys ({k_shape[1]}): "
                         f"the first {T - k_shape[1]} queries would see no key.")
    if H % k_shape[2]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads "
                         f"({k_shape[2]}) for grouped-query attention.")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        raise ValueError(f"flash_attention supports float32, bfloat16 and float16 inputs, "
                         f"got {jnp.dtype(dtype)}.")
    if not interpret and E not in GPU_HEAD_DIMS:
        raise ValueError(f"the compiled GPU kernel supports head_dim in {GPU_HEAD_DIMS}, got "
                         f"{E}; pad the head dim or run with interpret=True.")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is None:
            continue
        if b < 1 or (not interpret and (b < 16 or b & (b - 1))):
            raise ValueError(f"{name}={b}: block sizes must be positive, and powers of two "
                             f">= 16 for the compiled GPU kernel.")


def flash_attention_with_lse(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                             causal: bool = True, sm_scale: float | None = None,
                             segment_ids=None, block_q: int | None = None,
                             block_k: int | None = None, interpret: bool | None = None,
                             ) -> tuple[jax.Array, jax.Array]:
    """Flash attention returning (o [B,T,H,E] in q's dtype, lse [B,H,T] float32, natural log).

    Differentiable in q, k, v (also through lse). `segment_ids`: None; one int array [B, T]
    when T == S (self-attention over packed sequences); or a pair (q_ids [B,T], kv_ids [B,S]).
    `sm_scale` defaults to 1/sqrt(E). Block sizes default per head dim (`default_block_sizes`),
    capped at the next power of two of the sequence length. `interpret`: see
    `resolve_interpret`. Causal masking is bottom-right aligned (query t sees keys
    s <= t + S - T), like `jaxsys.model.attention.xla_attention`, and needs T <= S. A query row whose
    segment id matches no visible key has no defined output (the reference averages v).
    """
    interpret = resolve_interpret(interpret)
    check_supported(q_BTHE.shape, k_BSKE.shape, v_BSKE.shape, q_BTHE.dtype, interpret=interpret,
                    causal=causal, block_q=block_q, block_k=block_k)
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    k_BSKE, v_BSKE = k_BSKE.astype(q_BTHE.dtype), v_BSKE.astype(q_BTHE.dtype)
    dq, dk = default_block_sizes(E)
    block_q = block_q or min(dq, max(16, _next_pow2(T)))
    block_k = block_k or min(dk, max(16, _next_pow2(S)))
    qseg = kseg = None
    if segment_ids is not None:
        qseg, kseg = segment_ids if isinstance(segment_ids, (tuple, list)) else (
            segment_ids, segment_ids)
        if qseg.shape != (B, T) or kseg.shape != (B, S):
            raise ValueError(f"segment ids must be [B, T]=({B}, {T}) for queries and "
                             f"[B, S]=({B}, {S}) for keys; got {qseg.shape} and {kseg.shape}.")
        qseg, kseg = qseg.astype(jnp.int32), kseg.astype(jnp.int32)
    st = _Static(causal=bool(causal), scale=float(1.0 / math.sqrt(E) if sm_scale is None
                                                  else sm_scale),
                 T=T, S=S, block_q=block_q, block_k=block_k, groups=H // K,
                 segments=segment_ids is not None, interpret=interpret)
    return _flash(st, q_BTHE, k_BSKE, v_BSKE, qseg, kseg)


def flash_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                    causal: bool = True, sm_scale: float | None = None, segment_ids=None,
                    block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Flash attention [B,T,H,E] x [B,S,K,E] x [B,S,K,E] -> [B,T,H,E]; see
    `flash_attention_with_lse` for the arguments."""
    return flash_attention_with_lse(q_BTHE, k_BSKE, v_BSKE, causal=causal, sm_scale=sm_scale,
                                    segment_ids=segment_ids, block_q=block_q, block_k=block_k,
                                    interpret=interpret)[0]
