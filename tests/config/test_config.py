"""Config overrides, presets and their error messages."""

import json
import re

import pytest

from jaxsys.config import (Config, ConfigError, all_keys, apply_overrides, from_dict, to_json,
                           validate)
from jaxsys.config.presets import PRESETS, get_preset


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["mesh.fsdp=4", "train.steps=500", "optimizer.lr=3e-4",
                                     "model.scan_layers=false", "run_dir=runs/x",
                                     "lr_schedule.step_boundaries=100,200", "model.family=llama"])
    assert cfg.mesh.fsdp == 4 and cfg.train.steps == 500 and cfg.optimizer.lr == 3e-4
    assert cfg.model.scan_layers is False and cfg.run_dir == "runs/x"
    assert cfg.lr_schedule.step_boundaries == (100, 200) and cfg.model.family == "llama"
    assert Config().mesh.fsdp == 1  # frozen defaults untouched


@pytest.mark.parametrize("override,message", [
    ("mesh.fdsp=4", "Unknown config key 'mesh.fdsp'. Did you mean 'mesh.fsdp'?"),
    ("trian.steps=5", "Did you mean 'train.steps'?"),
    ("lr=1e-3", "Did you mean 'optimizer.lr'?"),
    ("train.steps=ten", "train.steps='ten' is not a valid int"),
    ("model.scan_layers=maybe", "not a boolean"),
    ("model.family=gtp2", "Did you mean 'gpt2'?"),
    ("model.attention=flash", "not one of ['xla', 'cudnn', 'pallas']"),
    ("mesh=4", "is a section"),
    ("train.steps", "must look like key=value"),
])
def test_override_errors_name_key_and_suggest(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert message in str(err.value)


def test_every_key_is_overridable():
    keys = all_keys()
    assert "model.embed_dim" in keys and "checkpoint.every" in keys and "run_dir" in keys
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = get_preset(name)
    validate(cfg)
    assert from_dict(json.loads(to_json(cfg))) == cfg


def test_preset_shapes():
    g = get_preset("gpt2-small").model
    assert (g.num_layers, g.embed_dim, g.num_heads, g.seq_len) == (12, 768, 12, 1024)
    llama = get_preset("llama-1b").model
    assert llama.family == "llama" and llama.resolved().num_kv_heads == 8 and llama.compute_dtype == "bfloat16"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="Did you mean 'gpt2-small'"):
        get_preset("gpt2_small")


@pytest.mark.parametrize("overrides,message", [
    (["model.embed_dim=100", "model.num_heads=3"], "not divisible by model.num_heads=3"),
    (["model.family=llama", "model.num_heads=4", "model.num_kv_heads=3"], "not divisible by model.num_kv_heads=3"),
    (["train.batch_size=10", "train.grad_accum=4"], "train.batch_size=10 is not divisible by train.grad_accum=4"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["train.log_every=0"], "train.log_every must be ≥ 1, got 0"),
    (["train.eval_batches=0"], "train.eval_batches must be ≥ 1, got 0"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["model.fp8=current", "model.family=llama", "model.attention_kind=mla", "model.kv_lora_rank=8"],
     "model.fp8=current covers the multi-head attention projections"),
    (["model.fp8=current", "model.moe.num_experts=4"], "model.fp8=current covers dense MLPs, not routed experts"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(apply_overrides(Config(), overrides))


@pytest.mark.parametrize("override,new", [("train.microbatches=2", "train.grad_accum"),
                                          ("schedule.kind=wsd", "lr_schedule.kind"),
                                          ("train.nan_steps=3", "faults.nan_steps"),
                                          ("train.nan_batches=3", "faults.nan_batches")])
def test_renamed_keys_name_their_new_spelling(override, new):
    with pytest.raises(ConfigError, match=rf"'{override.split('=')[0]}' was renamed to '{new}'"):
        apply_overrides(Config(), [override])
    assert new in all_keys()
