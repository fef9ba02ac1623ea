"""Export: import -> export reproduces every tensor bitwise; the export loads in `transformers`
with no extra code and gives the same logits; sharded past --max-shard-size; a jaxsys byte
tokenizer becomes one AutoTokenizer reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from jaxsys.checkpoint.hf import export_hf, import_to_run_dir
from jaxsys.checkpoint.hf.files import Source
from tests.hf import models


def tensors(folder) -> dict[str, np.ndarray]:
    src = Source(folder)
    return {name: src.get(name) for name in sorted(src.names())}


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-llama3-tied", "qwen2-qkv-bias", "mistral-head-dim-16"])
def test_import_export_reproduces_every_tensor_and_the_logits(hf_model, tmp_path, name):
    folder, ref = hf_model(name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    import_to_run_dir(folder, tmp_path / "run", scan_layers=name != "qwen2-qkv-bias")
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())
    export_hf(tmp_path / "run", tmp_path / "out", log=lambda _: None)
    a, b = tensors(folder), tensors(tmp_path / "out")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(model).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    assert np.abs(models.logits(model) - ref).max() <= 1e-5  # the same weights, the same code


def test_export_shards_past_the_size_limit(hf_model, tmp_path):
    folder, ref = hf_model("gpt2")
    import_to_run_dir(folder, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "out", max_shard_size="30KB", log=lambda _: None)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "out" / "model.safetensors").exists()
    for f in files[:-1]:  # every shard but a tensor larger than the limit stays under it
        with safe_open(tmp_path / "out" / f, "numpy") as st:
            assert len(list(st.keys())) == 1 or (tmp_path / "out" / f).stat().st_size <= 30_000 + 2_000
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(models.logits(model) - ref).max() <= 1e-5


def test_a_byte_tokenizer_exports_as_one_autotokenizer_reads(tmp_path):
    from jaxsys.checkpoint.hf import hf_tokenizers
    assert hf_tokenizers.write({"kind": "byte"}, 64, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "ROMEO: héllo  wörld\n\t→ ok"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert hf_tokenizers.write({"kind": "ids"}, 64, tmp_path / "x") == []
    text = "ROMEO: the world,\n  a stub?"
    chars = "".join(sorted(set(text + "xyz")))  # as CharTokenizer.from_text
    hf_tokenizers.write({"kind": "char", "chars": chars}, 64, tmp_path / "c")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "c")
    assert tok.encode(text) == [chars.index(c) for c in text] and tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_a_jaxsys_run_with_a_byte_tokenizer_exports(tmp_path, family):
    """A run jaxsys made itself (no hf/ or tokenizer/ folder): the weights load in transformers
    with the same logits, and its byte tokenizer comes along."""
    import jax
    import jax.numpy as jnp
    from jaxsys.checkpoint import manager as ckpt
    from jaxsys.checkpoint import run_files
    from jaxsys.config import apply_overrides, to_json
    from jaxsys.config.presets import tiny
    from jaxsys.model.transformer import Transformer, init_params

    cfg = apply_overrides(tiny(), [f"model.family={family}", "model.num_kv_heads=2" if family == "llama" else
                                   "model.gelu=exact", f"run_dir={tmp_path / 'run'}"])
    rng = np.random.RandomState(1)  # every parameter moved off its init (ones, zeros)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32),
                                    init_params(cfg.model, jax.random.key(0)))
    run = tmp_path / "run"
    ckpt.save_params(run, 3, params)
    run_files.write_atomic(run / run_files.CONFIG, to_json(cfg))
    run_files.write_atomic(run / run_files.TOKENIZER, json.dumps({"kind": "byte"}))
    export_hf(run, tmp_path / "out", log=lambda _: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode("ROMEO: O, she doth teach") == list(b"ROMEO: O, she doth teach")
    ids = np.array([tok.encode("ROMEO: O, she")[: cfg.model.seq_len]])
    ref = np.asarray(Transformer(cfg.model).apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(models.logits(model, ids) - ref).max() <= 1e-4


def test_bfloat16_weights_stay_bfloat16_bit_for_bit(tmp_path):
    model = models.build("qwen2-qkv-bias", tmp_path / "f32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg = import_to_run_dir(tmp_path / "bf16", tmp_path / "run")
    assert cfg.model.param_dtype == "bfloat16"
    export_hf(tmp_path / "run", tmp_path / "out", log=lambda _: None)
    a, b = tensors(tmp_path / "bf16"), tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(str(a[k].dtype) == "bfloat16" for k in a)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
