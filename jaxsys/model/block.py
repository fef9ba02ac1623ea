"""The pre-norm residual block: attention (multi-head, or latent with `model.attention_kind=
mla`) then the MLP, each added to the residual stream; and the remat policies of a block.

Its own module so that it can choose among the attention and MLP modules (`layers`, `mla`),
which import `layers` themselves. Shapes (`jaxsys.model.axes`): B batch, T sequence, D embed.
"""

from __future__ import annotations

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
}


class Block(nn.Module):
    """Pre-norm residual block: `(x, positions, cache, segment_ids) -> (x, cache)`, the (carry,
    scanned output) signature `nn.scan` expects; the cache is None when training, the segment
    ids (packed documents, int [B, T]) None but when packing."""

    cfg: ModelConfig
    deterministic: bool = True

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
        h_BTD = Mlp(cfg, name="mlp")(Norm(cfg, name="ln_mlp")(x_BTD))
        x_BTD = hooks.constrain(x_BTD + drop(h_BTD), ACT_BTD)
        return x_BTD, cache
