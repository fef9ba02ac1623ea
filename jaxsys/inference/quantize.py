"""Int8 weight-only quantization for inference: int8 weights in memory, float compute.

Each weight matrix is stored as int8 values and one float32 scale per *output channel*:
symmetric, `scale = max|w| / 127` over the axes its matmul contracts, `values = round(w /
scale)`. At its point of use (the `use_weight` hook) it is dequantized to float32, and the
model casts it to its compute dtype as it does a float weight, so the model code is unchanged:

    qparams = quantize_params(params, cfg.model)
    with hooks.installed(dequantizing()):
        logits_BTV = model.apply({"params": qparams}, tokens_BT)

Dequantized element error: |values * scale - w| <= scale / 2. A matmul's output j then differs
by at most sum_d |x_d| * scale_j / 2, because one scale serves a whole output channel.

Which axes a parameter's matmul contracts is a table keyed by the parameter's name
(`_CONTRACTED`, in logical axis names); the indices come from the model's own logical
PartitionSpecs (`abstract_params`), so stacked layers (`scan_layers`: a leading `layers` axis)
keep one scale per layer. Scales, for D embed, H heads, K kv heads, E head size,
F MLP hidden, V vocabulary, T positions, L layers (stacked only):

    attn.wq [L,] D H E -> [L,] 1 H E     attn.wk / wv [L,] D K E -> [L,] 1 K E
    attn.wo [L,] H E D -> [L,] 1 1 D     mlp.wi / wi_gate / wi_up [L,] D F -> [L,] 1 F
    MLA (Q a latent's rank, W a query/key head, Y its RoPE part, nope = W - Y, `jaxsys.model.mla`):
    attn.wq_a [L,] D Q -> [L,] 1 Q      attn.wkv_a [L,] D (Q+Y) -> [L,] 1 (Q+Y)
    attn.wq_b [L,] Q H W -> [L,] 1 H W  attn.wkv_b [L,] Q H (nope+E) -> [L,] 1 H (nope+E)
    mlp.wo  [L,] F D   -> [L,] 1 D       head (llama) D V -> 1 V
    moe.w_in / w_gate [L,] X D F -> [L,] X 1 F   moe.w_out [L,] X F D -> [L,] X 1 D (X experts;
    shared.* as mlp.*; the router [D, X] stays float: its top-k is a choice rounding could flip)
    embed   V D        -> V 1            one scale per token row: the row lookup needs it, and
                                         the tied gpt2 head contracts D, so it is per output V
    pos_embed T D      -> T 1            gpt2's position table: added, not multiplied; quantized
                                         per position row like the token table (its error is
                                         the same <= scale / 2 per element)

Parameters that are one vector per layer (norm scales, biases, and gpt2's per-head attention
biases bq / bk / bv) stay float: they are small and are added or multiplied elementwise.
A parameter of two or more axes that the table does not name is refused, not guessed at.

What it saves is storage (the parameters' resident bytes, a checkpoint, a transfer): each use
materialises a float32 copy of that one weight for the matmul (under `scan_layers`, one
layer's at a time). Composes with parallel hooks: `dequantizing(h)` hands `h.use_weight` the
float weight it expects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import ModelConfig
from jaxsys.model import hooks
from jaxsys.model.params import path_str
from jaxsys.model.transformer import abstract_params

# The logical axes each weight's matmul contracts, keyed by "<module>.<param>" (the last two
# names of its path) or by the top-level name. See the module docstring for the resulting scales.
_CONTRACTED: dict[str, tuple[str, ...]] = {
    "attn.wq": ("embed",),  # btd,dkje->btkje (fused QKV; concatenated after dequantization)
    "attn.wk": ("embed",),
    "attn.wv": ("embed",),
    "attn.wo": ("heads", "head_dim"),  # bthe,hed->btd
    "attn.wq_a": ("embed",),  # MLA (jaxsys.model.mla): btd,dr->btr, the latents
    "attn.wkv_a": ("embed",),
    "attn.wq_b": ("latent",),  # btq,qhw->bthw
    "attn.wkv_b": ("latent",),  # btq,qhj->bthj (decoding also contracts its key half over nope)
    "mlp.wi": ("embed",),  # btd,df->btf
    "mlp.wi_gate": ("embed",),  # btd,djf->btjf (fused gate/up; stacked after dequantization)
    "mlp.wi_up": ("embed",),
    "mlp.wo": ("mlp",),  # btf,fd->btd
    "embed": ("embed",),  # row lookup, and gpt2's tied head btd,dv->btv on its transpose
    "head": ("embed",),  # llama: btd,dv->btv
    "pos_embed": ("embed",),  # gpt2: rows added to the embedding
    "moe.w_in": ("embed",),  # MoE experts: bxud,xdf->bxuf (or ragged_dot), one scale per expert and F
    "moe.w_gate": ("embed",),
    "moe.w_out": ("mlp",),  # bxuf,xfd->bxud
    "shared.wi": ("embed",),  # an MoE layer's shared experts: the dense MLP under another name
    "shared.wi_gate": ("embed",),
    "shared.wi_up": ("embed",),
    "shared.wo": ("mlp",),
}
# Two-axis parameters that stay float: gpt2's attention biases [H, E] / [K, E], added to q, k, v;
# the MoE router [D, X], whose top-k picks the experts (rounding could flip a choice, and it is small).
_FLOAT: frozenset[str] = frozenset({"attn.bq", "attn.bk", "attn.bv", "moe.router"})
_LAYERS = "layers"


@flax.struct.dataclass
class QuantizedWeight:
    """A weight as int8 `values` (the weight's shape) and float32 `scale` (the weight's shape
    with size 1 on the contracted axes): the weight is about `values * scale`.

    A pytree of two arrays. `values` must stay the first field: Flax's `Scope.param` checks a
    stored parameter against its declaration by zipping the flattened leaves of both, so the
    declared float array is compared with `values` (same shape) and `scale` is never compared
    (zip stops at the shorter list). That is what lets a QuantizedWeight stand where the model
    declared a float parameter; `nn.scan` slices both leaves along the leading layers axis.
    """

    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, broadcastable to `values`
    float_dtype: str = flax.struct.field(pytree_node=False, default="float32")  # of the original

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the weight it replaces (not int8)."""
        return jnp.dtype(self.float_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the int8 values plus the float32 scales."""
        return param_bytes(self)

    def dequantize(self) -> jax.Array:
        """The weight as float32, `values * scale`."""
        return self.values.astype(jnp.float32) * self.scale


def quantize_weight(w: jax.Array, contracted: Sequence[int], bits: int = 8) -> QuantizedWeight:
    """Symmetric per-output-channel quantization of `w`: one scale per index of the axes not in
    `contracted`. `bits` < 8 (down to 2) keeps int8 storage with a coarser grid, for tests
    that must show a bad quantization fails."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: must be between 2 and 8.")
    qmax = 2 ** (bits - 1) - 1
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=tuple(contracted), keepdims=True) / qmax
    # An all-zero channel has scale 0: divide by 1 instead, which gives values 0 and so zeros back.
    values = jnp.clip(jnp.round(w32 / jnp.where(scale == 0, 1.0, scale)), -qmax, qmax).astype(jnp.int8)
    return QuantizedWeight(values, scale, jnp.dtype(w.dtype).name)


def _contracted(path: tuple, spec: jax.sharding.PartitionSpec) -> tuple[int, ...] | None:
    """The axis indices parameter `path` (logical axes `spec`) contracts, or None: stays float."""
    name, logical = ".".join(path_str(path).split(".")[-2:]), tuple(spec)
    if name in _CONTRACTED:
        if any(logical.count(a) != 1 for a in _CONTRACTED[name]):
            raise ValueError(f"quantize: parameter {path_str(path)} has logical axes {logical}, "
                             f"not one each of {_CONTRACTED[name]}.")
        return tuple(logical.index(a) for a in _CONTRACTED[name])
    if name in _FLOAT or len([a for a in logical if a != _LAYERS]) <= 1:
        return None
    raise ValueError(f"quantize: no rule for parameter {path_str(path)} with logical axes {logical}; "
                     "add the axes its matmul contracts to _CONTRACTED in jaxsys/inference/quantize.py.")


def _declared(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """{dotted parameter name: (shape, contracted axes or None)} of the model of `cfg`."""
    with hooks.installed(hooks.Hooks()):  # the global shapes, whatever hooks are in force
        shapes, specs = abstract_params(cfg)
    flat_specs = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    return {path_str(p): (tuple(s.shape), _contracted(p, spec))
            for (p, spec), s in zip(flat_specs, flat_shapes)}


def quantized_axes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    """{dotted parameter name: the axis indices its matmul contracts, or None for a parameter
    that stays float} of the model of `cfg`. Raises ValueError, naming the parameter, for one
    of two or more axes (besides `layers`) that has no rule."""
    return {name: axes for name, (_, axes) in _declared(cfg).items()}


def quantize_params(params: Any, cfg: ModelConfig, bits: int = 8) -> Any:
    """`params` (a tree of float arrays of the model of `cfg`) with every weight matrix replaced
    by a `QuantizedWeight`; vectors (norm scales, biases) are left as they are."""
    declared = _declared(cfg)

    def one(path: tuple, w: jax.Array) -> jax.Array | QuantizedWeight:
        name = path_str(path)
        if name not in declared:
            raise ValueError(f"quantize: parameter {name} is not a parameter of this model config.")
        shape, axes = declared[name]
        if tuple(w.shape) != shape:
            raise ValueError(f"quantize: parameter {name} has shape {tuple(w.shape)}; "
                             f"this model config declares {shape}.")
        return w if axes is None else quantize_weight(w, axes, bits)

    return jax.tree_util.tree_map_with_path(one, params)


def param_bytes(tree: Any) -> int:
    """Bytes stored by a tree of arrays, `QuantizedWeight`s or `jax.ShapeDtypeStruct`s."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def dequantizing(hooks_in_force: hooks.Hooks | None = None) -> hooks.Hooks:
    """`hooks_in_force` (default: the set in force now) with a `use_weight` that dequantizes a
    `QuantizedWeight` to float32 before handing it on, and hands anything else on unchanged.
    Install it around the trace: `with hooks.installed(dequantizing()): model.apply(...)`."""
    base = hooks.current() if hooks_in_force is None else hooks_in_force

    def use_weight(w: Any, axes: hooks.Axes) -> jax.Array:
        if isinstance(w, QuantizedWeight):
            w = w.dequantize()
        return base.use_weight(w, axes)

    return dataclasses.replace(base, use_weight=use_weight)
