"""The command line end to end: `jaxsys hf import` -> `jaxsys sample` (greedy: the tokens
`transformers` generates) -> `jaxsys train` (a fine-tune from the imported weights with a fresh
optimizer) -> `jaxsys hf export` -> `transformers` loads the fine-tuned weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import transformers

from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import CheckpointConfig
from tests.cli.test_bad_inputs import cli
from tests.hf import models


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """`prompt` + `n` argmax tokens of the transformers model (no end-of-text stop or rule)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_import_sample_train_export(capsys, hf_model, tmp_path):
    folder, _ = hf_model("llama-gqa-llama3-tied")
    run = tmp_path / "run"
    code, out, err = cli(capsys, ["hf", "import", str(folder), "--out", str(run)])
    assert code == 0, err
    assert "Imported" in out and json.loads((run / "config.json").read_text())["model"]["rope_scaling"] == "llama3"

    prompt = [5, 17, 3, 60, 2]
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--prompt", " ".join(map(str, prompt)),
                                  "--temperature", "0", "--max-new-tokens", "12"])
    assert code == 0 and "Loaded checkpoint step 0" in err, err
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert [int(t) for t in out.split()] == greedy(model, prompt, 12)  # prompt + the same 12 greedy tokens

    code, out, err = cli(capsys, ["hf", "import", str(folder), "--out", str(run)])
    assert code == 2 and "already holds checkpoints" in err

    data = tmp_path / "ids.bin"  # a corpus of token ids, as the model's tokenizer would write
    np.random.RandomState(0).randint(0, models.V, 20_000).astype(np.uint16).tofile(data)
    code, out, err = cli(capsys, ["train", "--config", str(run / "config.json"), f"run_dir={run}",
                                  f"data.source={data}", "checkpoint.allow_changes=data.source", "train.steps=2",
                                  "train.batch_size=8", "train.eval_every=0", "logging.progress=false",
                                  "logging.tensorboard=false", "logging.sample_tokens=0", "optimizer.lr=0.1",
                                  "lr_schedule.kind=constant", "lr_schedule.warmup_steps=0"])
    assert code == 0, err
    assert "with a fresh optimizer" in out + err
    manager = ckpt.make_manager(run, CheckpointConfig(), read_only=True)
    assert sorted(manager.all_steps()) == [0, 2] and not ckpt.is_params_only(manager, 2)
    manager.close()

    code, out, err = cli(capsys, ["hf", "export", "--run-dir", str(run), "--out", str(tmp_path / "hf")])
    assert code == 0 and "Exported checkpoint step 2" in err, err
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from jaxsys.inference.load import load_run
    loaded = load_run(run, log=lambda _: None)
    ref = np.asarray(loaded.model.apply({"params": loaded.params}, models.TOKENS_BT))
    assert np.abs(models.logits(tuned) - ref).max() <= 1e-4
    assert np.abs(models.logits(tuned) - models.logits(model)).max() > 1e-2  # the fine-tune changed them


def test_a_source_tokenizer_becomes_the_runs_and_comes_back(capsys, hf_model, tmp_path):
    """A folder with a tokenizer.json: the run reads and writes text with it (`jaxsys sample`
    decodes the greedy tokens transformers generates), and the export gives it back."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
    folder, _ = hf_model("gpt2")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    tok = Tokenizer(tok_models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from jaxsys.data.corpus import shakespeare_text
    text = shakespeare_text()[:30_000].split("\n")
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=models.V, special_tokens=["[UNK]"]))
    assert tok.get_vocab_size() == models.V  # every id of the model has a token
    tok.save(str(src / "tokenizer.json"))
    run = tmp_path / "run"
    code, out, err = cli(capsys, ["hf", "import", str(src), "--out", str(run)])
    assert code == 0 and "with its tokenizer" in out, err
    assert json.loads((run / "tokenizer.json").read_text())["kind"] == "hf"
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--prompt", "Romeo thy", "--temperature", "0",
                                  "--max-new-tokens", "6"])
    assert code == 0, err
    prompt = tok.encode("Romeo thy").ids
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    assert out.strip() == tok.decode(greedy(model, prompt, 6)).strip()
    code, out, err = cli(capsys, ["hf", "export", "--run-dir", str(run), "--out", str(tmp_path / "hf")])
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Romeo thy") == prompt
