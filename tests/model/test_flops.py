"""Parameter counts (total and active per token) and FLOPs per token (`jaxsys.model.flops`)
against the models' own parameter trees and hand-computed closed forms.

The full-size presets are checked against their published sizes: DeepSeek-V3 671B total / 37B
activated (arXiv 2412.19437; its 685B checkpoint adds the 14B multi-token-prediction module,
not modelled here) and Mixtral 8x7B 46.7B / 12.9B (arXiv 2401.04088).
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec

from jaxsys.config import apply_overrides
from jaxsys.config.presets import get_preset, tiny
from jaxsys.model.flops import active_params, flops_per_token, param_counts
from jaxsys.model.params import count_params
from jaxsys.model.transformer import abstract_params

MLA = ["model.family=llama", "model.attention_kind=mla", "model.kv_lora_rank=16", "model.qk_nope_dim=8",
       "model.qk_rope_dim=4", "model.v_head_dim=6"]


@pytest.mark.parametrize("overrides", [
    [], ["model.family=llama", "model.num_kv_heads=2"], ["model.family=llama", "model.qkv_bias=true"],
    [*MLA, "model.q_lora_rank=12"], MLA,
], ids=["gpt2", "llama-gqa", "llama-qkv_bias", "mla-q_lora", "mla-q_direct"])
def test_closed_form_counts_the_models_parameters(overrides):
    cfg = apply_overrides(tiny(), overrides).model
    shapes, specs = abstract_params(cfg)
    counts = param_counts(cfg)
    assert counts.total == count_params(shapes) == active_params(cfg, shapes, specs) == counts.active


@pytest.mark.parametrize("name", ["deepseek-tiny", "mixtral-8x7b", "deepseek-v3"])
def test_closed_form_counts_the_moe_presets(name):
    """The MoE presets' trees (abstract: nothing is allocated) against the closed form, total
    and active."""
    cfg = get_preset(name).model
    shapes, specs = abstract_params(dataclasses.replace(cfg, scan_layers=True))
    if not any("expert" in tuple(p) for p in jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)):
        pytest.skip("no MoE layer on this branch yet (jaxsys.model.moe): its MLPs are dense")
    counts = param_counts(cfg)
    assert (count_params(shapes), active_params(cfg, shapes, specs)) == (counts.total, counts.active)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def test_mla_attention_by_hand():
    """tiny + MLA with a query latent: D = 32, H = 4, Q = 12, U = 16, I = 8, Y = 4, E = 6."""
    cfg = apply_overrides(tiny(), [*MLA, "model.q_lora_rank=12"]).model
    attn = (32 * 12 + 12 + 12 * 4 * 12) + (32 * 20 + 16 + 16 * 4 * 14) + 4 * 6 * 32  # q, kv, wo
    mlp = 3 * 32 * 128  # SwiGLU, the llama rule's 8/3·32 rounded up to 64
    total = 256 * 32 * 2 + 32 + 2 * (attn + 2 * 32 + mlp)  # embed + head, final norm, 2 layers
    assert param_counts(cfg).total == total == 47_704


def test_deepseek_v3_is_671b_with_37b_active():
    cfg = get_preset("deepseek-v3").model
    D, V, H = 7168, 129_280, 128
    attn = (D * 1536 + 1536 + 1536 * H * 192) + (D * 576 + 512 + 512 * H * 256) + H * 128 * D
    expert = 3 * D * 2048
    dense, moe = 3 * D * 18_432, D * 256 + (256 + 1) * expert
    total = 2 * V * D + D + 61 * (attn + 2 * D) + 3 * dense + 58 * moe
    active = total - 58 * (256 - 8) * expert
    counts = param_counts(cfg)
    assert (counts.total, counts.active) == (total, active) == (671_026_404_352, 37_552_282_624)
    # Rounded to whole billions as published: 671B; 37B active without the input embedding
    # (a lookup, not a matmul: 36.63B), 38B with it (37.55B).
    assert round(counts.total / 1e9) == 671 and round((counts.active - V * D) / 1e9) == 37


def test_mixtral_8x7b_is_46_7b_with_12_9b_active():
    counts = param_counts(get_preset("mixtral-8x7b").model)
    D, V = 4096, 32_000
    layer = (2 * D * D + 2 * D * 1024) + 2 * D + D * 8 + 8 * 3 * D * 14_336
    assert counts.total == 2 * V * D + D + 32 * layer == 46_702_792_704
    assert counts.active == counts.total - 32 * 6 * 3 * D * 14_336 == 12_879_925_248


def test_flops_per_token_uses_active_params_and_mla_head_sizes():
    cfg = get_preset("deepseek-v3").model
    counts = param_counts(cfg)
    want = 6 * (counts.active - 129_280 * 7168) + 6 * 61 * 128 * (192 + 128) * 4096
    assert flops_per_token(cfg, counts.active) == want
    mha = dataclasses.replace(tiny().model, family="llama")  # 12·L·H·E·T when W = E
    assert flops_per_token(mha, 10_000) == 6 * (10_000 - 256 * 32) + 12 * 2 * 4 * 8 * 16
