"""The decoder-only transformer: its parameters and its one forward pass, embed -> blocks -> head.

`Transformer(cfg).apply({"params": p}, tokens_BT) -> logits_BTV` (float32) is a pure function of
the parameter pytree `p` (a nested dict of arrays). The three stages of the forward pass are
methods, so a pipeline stage runs exactly the model's code on part of the tree:

    model.apply({"params": p}, tokens_BT, method="embed")          -> x_BTD
    model.apply({"params": p}, x_BTD, method="blocks")             -> x_BTD (all layers)
    model.apply({"params": p}, x_BTD, method="head")               -> logits_BTV
    model.apply({"params": p}, tokens_BT, method="features")       -> (xn_BTD, head weight)
    model.apply({"params": p}, xn_BTD, w, method="logits")         -> logits_BTV (a chunked loss)
    model.apply({"params": p}, tokens_BT, positions_BT, caches, method="decode")
                                                                   -> (logits, caches)  (KV cache)
    block_fn(cfg)(layer_params, x_BTD, positions_BT)               -> x_BTD (one layer, with remat)
    moe_block_fn(cfg)(layer_params, layer_bias, x_BTD, positions_BT) -> (x_BTD, moe_stats)

Families (`model.family`): gpt2 has a learned position table and ties the output head to the
token embedding; llama uses RoPE (inside attention) and a separate head matrix (`model.head`
ties or unties either). With
`model.scan_layers` the layers are one `nn.scan` over parameters stacked on a leading `layers`
axis (compile time flat in depth), else `layer_0`, `layer_1`, ...

With routed experts (`model.moe.num_experts` > 0; `jaxsys.model.moe`), layer i is an MoE block
(submodule `moe` in place of `mlp`) when `moe.is_moe_layer(i)`. Unrolled, the layers stay
`layer_0`, `layer_1`, ...; scanned, the stack is cut into homogeneous scans, in layer order:
`dense_layers` (the `first_dense_layers` leading dense blocks, stacked), `moe_layers` (G groups
of `every` layers: an MoE block then every − 1 dense ones, `block_0` .. as a `MoeGroup`, or
the MoE block itself when every = 1, stacked on G) and `tail` (a last, shorter group, not
stacked, when the layers after the dense ones are not a multiple of `every`). A dense model's
tree is exactly as without MoE. The loss-free bias (collection `moe_bias`) and the sown
statistics (`moe_stats`) are stacked like the parameters.

`decode` is the same pass over new tokens at given positions, reading and writing a KV cache
(`jaxsys.model.kv_cache`): one `LayerCache` per layer (a tuple), or one stacked on L under
`scan_layers`. The training path never sees a cache.

Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig
from jaxsys.model import hooks, moe
from jaxsys.model.axes import ACT_BTD, LOGITS_BTV
from jaxsys.model.block import REMAT_POLICIES, Block
from jaxsys.model.layers import Norm

_EMBED_VD = ("vocab", "embed")


def _declare(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
             dtype: Any) -> jax.Array:
    """A normal(0, 0.02) parameter with logical axes, as stored (see `hooks.stored_shape`)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return module.param(name, init, hooks.stored_shape(shape, axes), dtype)


def _block_class(c: ModelConfig) -> Any:
    """`Block`, wrapped in the model's remat policy when `model.remat` asks for one."""
    if c.remat == "none":
        return Block
    if c.remat not in REMAT_POLICIES:  # "auto" is a choice made by compiling (jaxsys.train.remat_auto)
        raise ValueError(f"model.remat={c.remat} must be resolved to a policy before the model is built")
    return nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)


def segments(c: ModelConfig) -> list[tuple[str, int, int]]:
    """The scanned layer stacks of an MoE model, in layer order: (name, layers per element,
    elements); `tail` is one unstacked element. See the module docstring."""
    m = c.moe
    fd = min(m.first_dense_layers, c.num_layers)
    groups, rest = divmod(c.num_layers - fd, m.every)
    out = [("dense_layers", 1, fd), ("moe_layers", m.every, groups), ("tail", rest, 1)]
    return [(name, size, n) for name, size, n in out if size and n]


class MoeGroup(nn.Module):
    """`size` consecutive layers: an MoE block (`block_0`) then size − 1 dense ones; the
    element of a scanned MoE stack when `model.moe.every` > 1. Block's call signature."""

    cfg: ModelConfig
    deterministic: bool = True
    size: int = 1

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: Any = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, Any]:
        block = _block_class(self.cfg)
        for j in range(self.size):
            x_BTD, _ = block(self.cfg, self.deterministic, moe.MoeMlp if j == 0 else None, name=f"block_{j}")(
                x_BTD, positions_BT, None, segment_ids_BT)
        return x_BTD, None


class Transformer(nn.Module):
    """Token ids [B, T] -> float32 logits [B, T, V]; see the module docstring for the stages."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self) -> None:
        c = self.cfg.resolved()
        self.c = c
        pdt = jnp.dtype(c.param_dtype)
        self.embed_VD = _declare(self, "embed", (c.vocab_size, c.embed_dim), _EMBED_VD, pdt)
        if c.family == "gpt2":
            self.pos_TD = _declare(self, "pos_embed", (c.seq_len, c.embed_dim), (None, "embed"), pdt)
        # Dropout of the embedding's output; named as Flax names an inline module, which keeps
        # the dropout key stream (and so the masks) of earlier versions.
        self.Dropout_0 = nn.Dropout(c.dropout, deterministic=self.deterministic)
        block = _block_class(c)
        if c.moe.num_experts:
            self._moe_layers(c, block)
        elif c.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast), length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            self.layers = stack(c, self.deterministic)
        else:
            self.layer = [block(c, self.deterministic) for _ in range(c.num_layers)]  # layer_0, ...
        self.ln_final = Norm(c)
        if not c.tied_head:
            self.head_DV = _declare(self, "head", (c.embed_dim, c.vocab_size), ("embed", "vocab"), pdt)

    def _moe_layers(self, c: ModelConfig, block: Any) -> None:
        """The layers of an MoE model: unrolled `layer_i`, or the scanned `segments`."""
        if not c.scan_layers:
            self.layer = [block(c, self.deterministic, moe.MoeMlp if moe.is_moe_layer(c.moe, i) else None)
                          for i in range(c.num_layers)]
            return
        for name, size, n in segments(c):
            if name == "tail":
                setattr(self, name, MoeGroup(c, self.deterministic, size))
                continue
            element = block if size == 1 else MoeGroup
            args = (c, self.deterministic) + ((moe.MoeMlp,) if name == "moe_layers" and size == 1 else ())
            if size > 1:
                args = (c, self.deterministic, size)
            stack = nn.scan(element, variable_axes={"params": 0, moe.BIAS: 0, moe.STATS: 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast), length=n,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            setattr(self, name, stack(*args))

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """`positions_BT`: each token's position when it is not its index 0 .. T-1 (a context-
        parallel layout: the causal mask is then the attention hook's to apply; packed
        documents: positions restart at each document). `segment_ids_BT` (int, equal = same
        document): packed documents, attention never crosses from one to another."""
        return self.logits(*self.features(tokens_BT, positions_BT, segment_ids_BT))

    def features(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The forward pass up to the output projection: (final-normed x [B, T, D], the head
        weight at its point of use, compute dtype); `logits` of the two are `__call__`'s.
        A tiled loss (`jaxsys.model.vocab_tiles`, `model.loss_vocab_tiles`) projects them a
        vocabulary tile at a time."""
        embed_VD = hooks.use_weight(self.embed_VD, _EMBED_VD)  # used twice when tied: fetched once
        x_BTD = self.embed(tokens_BT, embed_VD, positions_BT)
        return self.head_inputs(self.blocks(x_BTD, positions_BT, segment_ids_BT), embed_VD)

    def embed(self, tokens_BT: jax.Array, embed_VD: jax.Array | None = None,
              positions_BT: jax.Array | None = None) -> jax.Array:
        """Token (+ learned position, gpt2) embedding with dropout: [B, T] -> [B, T, D] in
        `compute_dtype`. `embed_VD` is the table at its point of use, if already fetched;
        `positions_BT` the tokens' positions when they do not start at 0 (decoding)."""
        c = self.c
        T = tokens_BT.shape[1]
        if T > c.seq_len:
            raise ValueError(f"Input length {T} exceeds model.seq_len={c.seq_len}.")
        if embed_VD is None:
            embed_VD = hooks.use_weight(self.embed_VD, _EMBED_VD)
        pos_TD = hooks.use_weight(self.pos_TD, (None, "embed")) if c.family == "gpt2" else None
        x_BTD = hooks.embed_lookup(embed_VD, tokens_BT, ACT_BTD).astype(c.compute_dtype)
        if pos_TD is not None:
            pos = pos_TD[:T] if positions_BT is None else jnp.take(pos_TD, positions_BT, axis=0)
            x_BTD = x_BTD + pos.astype(c.compute_dtype)
        return hooks.constrain(self.Dropout_0(x_BTD), ACT_BTD)

    def blocks(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Every layer in order: [B, T, D] -> [B, T, D] (positions 0 .. T-1 unless given; one
        document per row unless `segment_ids_BT`)."""
        B, T = x_BTD.shape[:2]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        return self._layers(x_BTD, positions_BT, None, segment_ids_BT)[0]

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, caches: Any,
               logits_at_B: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """The forward pass of T new tokens per row at `positions_BT` (consecutive per row),
        attending over and writing into `caches`: (float32 logits [B, T, V], or [B, 1, V] at
        the one index `logits_at_B` of each row when given; the updated caches)."""
        embed_VD = hooks.use_weight(self.embed_VD, _EMBED_VD)
        x_BTD, caches = self._layers(self.embed(tokens_BT, embed_VD, positions_BT), positions_BT, caches)
        if logits_at_B is not None:  # the head on one position per row, not all T
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None], axis=1)
        return self.head(x_BTD, embed_VD), caches

    def _layers(self, x_BTD: jax.Array, positions_BT: jax.Array, caches: Any,
                segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, Any]:
        if self.c.scan_layers and self.c.moe.num_experts:
            if caches is not None:
                raise ValueError("decoding a scanned MoE model: unroll its layers first (unstack_layers)")
            for name, _, _ in segments(self.c):
                x_BTD, _ = getattr(self, name)(x_BTD, positions_BT, None, segment_ids_BT)
            return x_BTD, None
        if self.c.scan_layers:
            return self.layers(x_BTD, positions_BT, caches, segment_ids_BT)
        new = []
        for i, layer in enumerate(self.layer):
            x_BTD, cache = layer(x_BTD, positions_BT, None if caches is None else caches[i], segment_ids_BT)
            new.append(cache)
        return x_BTD, None if caches is None else tuple(new)

    def head(self, x_BTD: jax.Array, embed_VD: jax.Array | None = None) -> jax.Array:
        """Final norm and output projection: [B, T, D] -> float32 [B, T, V]. The vocabulary-
        parallel head (sequence parallel: all-gather along T first); the loss never gathers V."""
        return self.logits(*self.head_inputs(x_BTD, embed_VD))

    def head_inputs(self, x_BTD: jax.Array, embed_VD: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(final-normed x [B, T, D], the head weight in the compute dtype): what `logits`
        projects. The weight is as stored, never transposed: the tied table [V, D] (`embed_VD`:
        already fetched, if given), else `head` [D, V]: a tiled loss cuts the tied table into
        [V/n, D] tiles without a copy."""
        c = self.c
        x_BTD = self.ln_final(x_BTD)
        if c.tied_head:  # the output head is the input embedding
            w = embed_VD if embed_VD is not None else hooks.use_weight(self.embed_VD, _EMBED_VD)
        else:
            w = hooks.use_weight(self.head_DV, ("embed", "vocab"))
        return x_BTD, w.astype(c.compute_dtype)

    def logits(self, xn_BTD: jax.Array, w: jax.Array) -> jax.Array:
        """The output projection of normed activations: [B, T, D] -> float32 [B, T, V] (any T:
        a chunk of positions too), `w` from `head_inputs`; no parameters of its own."""
        if self.c.tied_head:
            return hooks.column_matmul("btd,vd->btv", xn_BTD, w, _EMBED_VD, LOGITS_BTV,
                                       preferred_element_type=jnp.float32)
        return hooks.column_matmul("btd,dv->btv", xn_BTD, w, ("embed", "vocab"), LOGITS_BTV,
                                   preferred_element_type=jnp.float32)


def block_fn(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """One layer as a function `(layer_params, x_BTD, positions_BT, segment_ids_BT=None) -> x_BTD`,
    without dropout and with the model's remat policy: the body of the model's layer loop, for
    code that walks the layers itself (a pipeline stage recomputing one layer at a time)."""
    c = cfg.resolved()

    def block(layer: Any, x_BTD: jax.Array, positions_BT: jax.Array,
              segment_ids_BT: jax.Array | None = None) -> jax.Array:
        return Block(c).apply({"params": layer}, x_BTD, positions_BT, None, segment_ids_BT)[0]

    if c.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[c.remat])
    return block


def moe_block_fn(cfg: ModelConfig) -> Callable[..., tuple[jax.Array, Any]]:
    """One MoE layer (an element of the `moe_layers` stack with `model.moe.every` = 1) as a
    function `(layer_params, layer_bias, x_BTD, positions_BT, segment_ids_BT=None) -> (x_BTD,
    stats)`: `layer_bias` the layer's `moe_bias` subtree (None without the loss-free bias),
    `stats` its sown `moe_stats` ({"moe": {"aux": (scalar,), ...}}). No dropout; the model's
    remat policy. `block_fn`'s MoE counterpart, for a pipeline stage."""
    c = cfg.resolved()

    def block(layer: Any, bias: Any, x_BTD: jax.Array, positions_BT: jax.Array,
              segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, Any]:
        variables = {"params": layer} if bias is None else {"params": layer, moe.BIAS: bias}
        (y_BTD, _), sown = Block(c, True, moe.MoeMlp).apply(variables, x_BTD, positions_BT, None, segment_ids_BT,
                                                            mutable=[moe.STATS])
        return y_BTD, sown[moe.STATS]

    if c.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[c.remat])
    return block


def unstack_layers(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """The same model with its layers unrolled: (`cfg` with scan_layers=False, `params` with the
    stacked `layers` subtree split into `layer_0`, `layer_1`, ...). Decoding uses it: a scanned
    layer loop slices each layer's KV cache out of the stacked buffer and writes it back, a
    copy of the whole cache per layer and token (measured 3.3x slower per step at batch 8, 512
    slots on CPU), where separate per-layer caches are updated in place."""
    if not cfg.scan_layers:
        return cfg, params
    return dataclasses.replace(cfg, scan_layers=False), unstack_tree(cfg, params)


def unstack_tree(cfg: ModelConfig, tree: Any) -> Any:
    """A scanned model's variable tree (parameters, or the `moe_bias` collection, which holds
    only MoE layers) as the unrolled model's `layer_0`, `layer_1`, ... (see `unstack_layers`)."""
    at = lambda t, i: jax.tree_util.tree_map(lambda x: x[i], t)  # noqa: E731
    if not cfg.moe.num_experts:
        out = {k: v for k, v in tree.items() if k != "layers"}
        for i in range(cfg.num_layers):
            out[f"layer_{i}"] = at(tree["layers"], i)
        return out
    names = [name for name, _, _ in segments(cfg)]
    out = {k: v for k, v in tree.items() if k not in names}
    i = 0
    for name, size, n in segments(cfg):
        grouped = name == "tail" or size > 1  # a MoeGroup: its layers are block_0, block_1, ...
        for g in range(n):
            element = tree.get(name)
            if element is not None and name != "tail":
                element = at(element, g)
            for j in range(size):
                layer = element.get(f"block_{j}") if grouped and element is not None else element
                if layer is not None:  # the bias tree has no dense layers
                    out[f"layer_{i}"] = layer
                i += 1
    return out


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
    """(tree of `jax.ShapeDtypeStruct`, matching tree of logical `PartitionSpec`s) of the
    model's parameters, from `jax.eval_shape` of its initialiser: nothing is allocated."""
    dummy = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), dummy)["params"]
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
    """Freshly initialised parameters (a nested dict of arrays) for `cfg` from `key`."""
    return init_variables(cfg, key)[0]


def init_variables(cfg: ModelConfig, key: jax.Array) -> tuple[Any, dict[str, Any]]:
    """(parameters, model state) freshly initialised from `key`; the model state holds the
    variables that are not parameters and are carried between steps (`{"moe_bias": tree}` with
    the loss-free balancing on, else `{}`). The parameters are `init_params`' exactly."""
    out = Transformer(cfg).init(key, jnp.zeros((1, cfg.seq_len), jnp.int32))
    state = {k: v for k, v in out.items() if k not in ("params", moe.STATS)}
    return nn.meta.unbox(out["params"]), state


def abstract_model_state(cfg: ModelConfig) -> dict[str, Any]:
    """The model state of `init_variables` as a tree of `jax.ShapeDtypeStruct` ({} if none)."""
    if not (cfg.moe.num_experts and cfg.moe.bias_update_rate > 0):
        return {}  # no trace of the initialiser for a model without state
    return jax.eval_shape(lambda k: init_variables(cfg, k)[1], jax.random.key(0))
