"""The pre-norm residual block: attention (multi-head, or latent with `model.attention_kind=
mla`) then the MLP, each added to the residual stream; and the remat policies of a block.

Its own module so that it can choose among the attention modules (`layers`, `mla`, which
imports `layers` itself); the MoE MLP comes in as the `ffn` class from `transformer`. Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxsys.config import ModelConfig
from jaxsys.model import hooks, kv_cache
from jaxsys.model.axes import ACT_BTD
from jaxsys.model.layers import Attention, Mlp, Norm
from jaxsys.model.mla import MLAttention

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # dots_no_batch's saved set, moved to host memory after the forward and back for the backward.
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Block(nn.Module):
    """Pre-norm residual block: `(x, positions, cache, segment_ids) -> (x, cache)`, the (carry,
    scanned output) signature `nn.scan` expects; the cache is None when training, the segment
    ids (packed documents, int [B, T]) None but when packing. `ffn`: the block's MLP, None for
    the dense `Mlp` (submodule "mlp"), or an MoE module class (`jaxsys.model.moe.MoeMlp`,
    submodule "moe", called as `ffn(cfg)(x, decoding)`). The attention is `mla.MLAttention`
    with `model.attention_kind=mla`, else `layers.Attention` (submodule "attn" either way)."""

    cfg: ModelConfig
    deterministic: bool = True
    ffn: Any = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: kv_cache.LayerCache | None = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, kv_cache.LayerCache | None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attention = MLAttention if cfg.attention_kind == "mla" else Attention
        h_BTD, cache = attention(cfg, name="attn")(Norm(cfg, name="ln_attn")(x_BTD), positions_BT, cache,
                                                   segment_ids_BT)
        x_BTD = hooks.constrain(x_BTD + drop(h_BTD), ACT_BTD)
        if self.ffn is None:
            h_BTD = Mlp(cfg, name="mlp")(Norm(cfg, name="ln_mlp")(x_BTD))
        else:
            h_BTD = self.ffn(cfg, name="moe")(Norm(cfg, name="ln_mlp")(x_BTD), cache is not None)
        x_BTD = hooks.constrain(x_BTD + drop(h_BTD), ACT_BTD)
        return x_BTD, cache
