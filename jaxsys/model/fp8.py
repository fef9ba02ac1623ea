"""fp8 matmuls with current scaling (`model.fp8=current`): e4m3 operands, e5m2 gradients.

A dense matmul `y = einsum(spec, x, w)` becomes

    y = grad_qdq(einsum(spec, qdq(x, e4m3), qdq(w, e4m3)))

- `qdq(v, e4m3)` quantizes to float8_e4m3fn (max 448) and dequantizes back to v's dtype; its
  backward is the identity (straight-through), as Flax's `fp8_ops.in_qdq`.
- `grad_qdq` is the identity forward; its backward quantize-dequantizes the incoming gradient
  dy to float8_e5m2 (max 57344), as Flax's `fp8_ops.out_qdq`. The two backward matmuls
  (dx = dy·wᵀ, dw = xᵀ·dy) then see e5m2 dy and the e4m3 operands saved by the forward.

**Current scaling**: one float32 scale per tensor and per use, `scale = amax(|v|) / fp8_max`,
computed from the tensor itself on the fly (`current_scale`; amax 0 or non-finite: scale 1).
So the quantized tensor spans the format's whole range and never saturates except by
rounding. It is stateless: nothing is added to the train state, the optimizer, the
checkpoints or the gradient sync (delayed scaling, Flax's `Fp8DotGeneralOp`, keeps an amax
history per tensor in the `_overwrite_with_gradient` collection, which the Optax update, the
explicit ZeRO sync and the checkpoints would all have to special-case).

The quantize / dequantize ops are Flax's (`flax.linen.fp8_ops.quantize` / `dequantize`), so
the graph is the same convert–scale–dot pattern Flax's fp8 ops emit, which XLA on GPU
(Hopper and later) rewrites into a cuBLASLt fp8 gemm. On the CPU it runs as float matmuls of
fp8-rounded values: numerics only, no speed.

amax goes through the `amax` hook (`jaxsys.model.hooks`): plain, the max over the whole array;
inside the explicit data-parallel region (`jaxsys.parallel.zero`), a max over the batch axes
too, so a tensor split over devices gets the one scale it would have on one device (tested:
tests/equivalence/test_fp8.py). Elsewhere XLA's partitioner computes the max of a split array
whole. Under gradient accumulation each microbatch has its own scales (as with any current
scaling), so fp8 results depend on `train.grad_accum`; likewise the pipeline executor
(`mesh.pipe` > 1), whose devices each scale their own microbatch's rows.

What runs fp8 (`jaxsys.model.layers`): the fused QKV projection, the attention output
projection and the MLP's matmuls. The embedding, the output head, the attention scores
(softmax(QKᵀ)V) and the norms stay in the compute dtype, as in Transformer Engine's recipes.

Shapes: any; a scale is a float32 scalar.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from jaxsys.model import hooks

E4M3 = jnp.float8_e4m3fn  # forward operands: 4 exponent bits, 3 mantissa; max 448, no inf
E5M2 = jnp.float8_e5m2  # gradients: 5 exponent bits, 2 mantissa; max 57344
MODES = ("none", "current")


def fp8_max(dtype: Any) -> float:
    """The largest finite value of an fp8 `dtype` (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(dtype).max)


def current_scale(x: jax.Array, dtype: Any) -> jax.Array:
    """The per-tensor scale of current scaling: amax(|x|) / fp8_max(dtype), float32 scalar,
    with no gradient; 1 where amax is 0 or not finite (an all-zero or non-finite tensor)."""
    amax = jax.lax.stop_gradient(hooks.amax(x)).astype(jnp.float32)
    ok = jnp.isfinite(amax) & (amax > 0)
    return jnp.where(ok, amax / fp8_max(dtype), jnp.float32(1.0))


def quantize(x: jax.Array, dtype: Any, scale: jax.Array) -> jax.Array:
    """x / scale, saturated to ±fp8_max(dtype), rounded to `dtype` (nearest even); the
    division runs in float32."""
    return fp8_ops.quantize(x.astype(jnp.float32), dtype, scale, jnp.float32)


def dequantize(q: jax.Array, scale: jax.Array, out_dtype: Any) -> jax.Array:
    """q · scale in `out_dtype`."""
    return fp8_ops.dequantize(q, out_dtype, scale)


def quantize_dequantize(x: jax.Array, dtype: Any, scale: jax.Array | None = None) -> jax.Array:
    """x rounded through the fp8 `dtype` at `scale` (None: `current_scale`), in x's dtype."""
    scale = current_scale(x, dtype) if scale is None else scale
    return dequantize(quantize(x, dtype, scale), scale, x.dtype)


@jax.custom_vjp
def operand(x: jax.Array) -> jax.Array:
    """A matmul operand rounded through e4m3 at its current scale; straight-through gradient."""
    return quantize_dequantize(x, E4M3)


def _operand_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return operand(x), None


def _operand_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


operand.defvjp(_operand_fwd, _operand_bwd)


@jax.custom_vjp
def output(y: jax.Array) -> jax.Array:
    """A matmul's output, unchanged; its gradient is rounded through e5m2 at its current scale."""
    return y


def _output_fwd(y: jax.Array) -> tuple[jax.Array, None]:
    return y, None


def _output_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (quantize_dequantize(g, E5M2),)


output.defvjp(_output_fwd, _output_bwd)


def matmul(mode: str, fn: Callable[..., jax.Array], spec: str, x: jax.Array, w: jax.Array,
           *args: Any, **kwargs: Any) -> jax.Array:
    """`fn(spec, x, w, *args, **kwargs)` (an einsum-like hook such as `hooks.column_matmul`),
    in fp8 by `mode` (`model.fp8`): "none" unchanged, "current" e4m3 operands and an e5m2
    gradient, each at its current scale."""
    if mode == "none":
        return fn(spec, x, w, *args, **kwargs)
    return output(fn(spec, operand(x), operand(w), *args, **kwargs))
