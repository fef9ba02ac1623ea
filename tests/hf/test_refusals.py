"""What the import refuses, each with one line naming the field; and the model options' checks."""

from __future__ import annotations

import json

import pytest

from jaxsys.checkpoint.hf import config_map, import_hf
from jaxsys.config import ConfigError, apply_overrides, validate
from jaxsys.config.presets import tiny

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2,
        "n_head": 4, "activation_function": "gelu_new"}


@pytest.mark.parametrize("base,change,words", [
    (LLAMA, {"architectures": ["BertForMaskedLM"]}, "architectures=['BertForMaskedLM']"),
    (LLAMA, {"architectures": ["GemmaForCausalLM"]}, "architectures=['GemmaForCausalLM']"),
    (LLAMA, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    (LLAMA, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='dynamic'"),
    (LLAMA, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    (LLAMA, {"attention_bias": True}, "attention_bias=True"),
    (LLAMA, {"mlp_bias": True}, "mlp_bias=True"),
    (LLAMA, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (LLAMA, {"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config='bitsandbytes'"),
    (LLAMA, {"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding_window=16"),
    (LLAMA, {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 16},
     "use_sliding_window=True"),
    (LLAMA, {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['sliding_attention']"),
    (GPT2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    (GPT2, {"scale_attn_weights": False}, "scale_attn_weights=False"),
    (GPT2, {"add_cross_attention": True}, "add_cross_attention=True"),
    (GPT2, {"activation_function": "relu"}, "activation_function='relu'"),
])
def test_unsupported_sources_are_refused_naming_the_field(base, change, words):
    with pytest.raises(ConfigError) as e:
        config_map.model_config({**base, **change}, "src/config.json")
    msg = str(e.value)
    assert msg.startswith("src/config.json: ") and words in msg and "\n" not in msg


def test_what_is_accepted():
    ok = config_map.model_config({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 64})
    assert ok.family == "llama" and ok.seq_len == 64  # a window as long as the context never binds
    assert config_map.model_config(LLAMA, seq_len=32).seq_len == 32
    with pytest.raises(ConfigError, match="sliding_window=32"):  # ... but not when longer than it
        config_map.model_config({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 32})
    with pytest.raises(ConfigError, match="n_positions=32 .*--seq-len 16"):
        config_map.model_config(GPT2, seq_len=16)
    legacy = config_map.model_config({**LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})  # transformers 4.x spelling (Llama 3.2's config.json)
    assert (legacy.rope_scaling, legacy.rope_factor, legacy.rope_theta) == ("llama3", 32.0, 5e5)




def test_a_tensor_without_a_place_is_refused(tmp_path, hf_model):
    import shutil
    from safetensors.numpy import load_file, save_file
    folder, _ = hf_model("llama-gqa-llama3-tied")
    shutil.copytree(folder, tmp_path / "m")
    data = load_file(tmp_path / "m" / "model.safetensors")
    data["model.layers.0.self_attn.o_proj.bias"] = data["model.norm.weight"]
    save_file(data, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.0.self_attn.o_proj.bias' .*has no place"):
        import_hf(tmp_path / "m")
    del data["model.layers.1.mlp.up_proj.weight"], data["model.layers.0.self_attn.o_proj.bias"]
    save_file(data, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        import_hf(tmp_path / "m")


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: save it again with safe_serialization=True"):
        import_hf(tmp_path)


@pytest.mark.parametrize("overrides,words", [
    (["model.family=llama", "model.gelu=exact"], "model.gelu only applies to gpt2"),
    (["model.qkv_bias=true"], "model.qkv_bias is for llama"),
    (["model.rope_scaling=llama3"], "gpt2 has learned positions"),
    (["model.family=llama", "model.rope_scaling=llama3", "model.rope_factor=0"], "model.rope_factor must be > 0"),
    (["model.family=llama", "model.rope_scaling=llama3", "model.rope_high_freq_factor=1"],
     "model.rope_high_freq_factor=1.0 must be > model.rope_low_freq_factor=1.0"),
])
def test_the_model_options_are_checked(overrides, words):
    with pytest.raises(ConfigError, match=words):
        validate(apply_overrides(tiny(), overrides))


def test_the_head_option_ties_or_unties_either_family():
    from jaxsys.model.transformer import abstract_params
    for family, head, has_head in (("gpt2", "auto", False), ("gpt2", "untied", True), ("llama", "auto", True),
                                   ("llama", "tied", False)):
        cfg = apply_overrides(tiny(), [f"model.family={family}", f"model.head={head}"])
        validate(cfg)
        assert ("head" in abstract_params(cfg.model)[0]) is has_head
