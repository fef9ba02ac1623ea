"""Hugging Face `config.json` <-> `ModelConfig`, and the one place where an unsupported source is
refused (one line naming the field and the fix).

Supported architectures and what they become:

    GPT2LMHeadModel    family=gpt2   (gelu = tanh for gelu_new / gelu_pytorch_tanh, exact for gelu)
    LlamaForCausalLM   family=llama  (grouped-query; rope_type default or llama3; tied or untied head)
    MistralForCausalLM family=llama  (only without a sliding window shorter than the context)
    Qwen2ForCausalLM   family=llama, qkv_bias=true (only without use_sliding_window)

Both `transformers` 5 configs (`rope_parameters`) and 4.x ones (`rope_theta` + `rope_scaling`)
are read; an export writes both spellings so either version loads it.
"""

from __future__ import annotations

from typing import Any

from jaxsys.config import ConfigError, ModelConfig

ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPE = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2"}
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}


def _refuse(where: str, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {field}={value!r} is not supported ({why}).")


def architecture(hf: dict, where: str) -> str:
    """The one supported architecture named by `hf["architectures"]`, else `ConfigError`."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _refuse(where, "architectures", archs, f"jaxsys imports one of {', '.join(ARCHITECTURES)}")
    if hf.get("quantization_config"):
        raise _refuse(where, "quantization_config", hf["quantization_config"].get("quant_method", "?"),
                      "import the unquantized model")
    return archs[0]


def _rope(hf: dict, where: str) -> dict[str, Any]:
    """RoPE settings as ModelConfig fields, from `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    key = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(where, "partial_rotary_factor", params.get("partial_rotary_factor",
                      hf.get("partial_rotary_factor")), "jaxsys rotates the whole head")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_positions=int(params["original_max_position_embeddings"]))
    elif kind not in ("default", None):
        raise _refuse(where, f"{key}.rope_type", kind, "jaxsys has default RoPE and llama3 scaling")
    return out


def _check_llama(hf: dict, arch: str, seq_len: int, where: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "jaxsys's llama MLP is SwiGLU with silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(where, field, True, "jaxsys's llama has no o_proj or MLP biases")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        raise _refuse(where, "use_sliding_window", True, "jaxsys attends over the whole context")
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM" and window is not None and window < seq_len:
        raise _refuse(where, "sliding_window", window, f"shorter than the context of {seq_len} tokens; jaxsys "
                      "attends over the whole context (import with --seq-len ≤ the window)")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise _refuse(where, "layer_types", other, "jaxsys has full attention in every layer")


def _check_gpt2(hf: dict, where: str) -> None:
    if hf.get("activation_function", "gelu_new") not in _GELU:
        raise _refuse(where, "activation_function", hf["activation_function"], f"one of {', '.join(_GELU)}")
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                      ("add_cross_attention", False)):
        if bool(hf.get(field, ok)) != ok:
            raise _refuse(where, field, hf[field], f"jaxsys's gpt2 has {field}={ok}")


def model_config(hf: dict, where: str = "config.json", seq_len: int = 0) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` dict (`where` names it in errors);
    `seq_len` > 0 shortens a RoPE model's context (gpt2's is its position table). Float32
    parameters, scanned layers, no dropout."""
    arch = architecture(hf, where)
    if arch == "GPT2LMHeadModel":
        _check_gpt2(hf, where)
        n = hf["n_positions"]
        if seq_len and seq_len != n:
            raise _refuse(where, "n_positions", n, f"--seq-len {seq_len}: gpt2's position table fixes the "
                          "context; leave --seq-len out")
        return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], seq_len=n, num_layers=hf["n_layer"],
                           embed_dim=hf["n_embd"], num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 0,
                           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                           gelu=_GELU[hf.get("activation_function", "gelu_new")],
                           head="tied" if hf.get("tie_word_embeddings", True) else "untied")
    max_pos = hf["max_position_embeddings"]
    if seq_len > max_pos:
        raise _refuse(where, "max_position_embeddings", max_pos, f"--seq-len {seq_len} is longer")
    _check_llama(hf, arch, seq_len or max_pos, where)
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(family="llama", vocab_size=hf["vocab_size"], seq_len=seq_len or max_pos,
                       num_layers=hf["num_hidden_layers"], embed_dim=D, num_heads=H,
                       num_kv_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or D // H,
                       mlp_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                       head="tied" if hf.get("tie_word_embeddings", False) else "untied",
                       qkv_bias=arch == "Qwen2ForCausalLM", **_rope(hf, where))


def hf_architecture(m: ModelConfig, source: str = "") -> str:
    """The architecture to export `m` as: `source` (an imported run's) when it fits, else
    GPT2LMHeadModel for gpt2, Qwen2ForCausalLM for llama with qkv_bias, LlamaForCausalLM."""
    fits = {"GPT2LMHeadModel": m.family == "gpt2", "Qwen2ForCausalLM": m.family == "llama" and m.qkv_bias,
            "LlamaForCausalLM": m.family == "llama" and not m.qkv_bias,
            "MistralForCausalLM": m.family == "llama" and not m.qkv_bias}
    if fits.get(source):
        return source
    return "GPT2LMHeadModel" if m.family == "gpt2" else "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"


def hf_config(m: ModelConfig, dtype: str, arch: str = "") -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a jaxsys model as `hf_architecture(m, arch)`;
    `dtype` is the tensors'."""
    m, arch = m.resolved(), hf_architecture(m, arch)
    if m.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
                "n_positions": m.seq_len, "n_embd": m.embed_dim, "n_layer": m.num_layers, "n_head": m.num_heads,
                "n_inner": m.mlp_dim, "activation_function": "gelu_new" if m.gelu == "tanh" else "gelu",
                "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tied_head,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "dtype": dtype, "torch_dtype": dtype}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_factor,
                "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_max_positions}
    out = {"architectures": [arch], "model_type": _MODEL_TYPE[arch], "vocab_size": m.vocab_size,
           "max_position_embeddings": m.seq_len, "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers,
           "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
           "intermediate_size": m.mlp_dim, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
           "tie_word_embeddings": m.tied_head, "rope_parameters": rope, "rope_theta": m.rope_theta,
           "rope_scaling": rope if m.rope_scaling == "llama3" else None, "attention_dropout": 0.0,
           "dtype": dtype, "torch_dtype": dtype}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(sliding_window=None)
    return out


