"""`jaxsys tokenizer train` -> `jaxsys data prepare` -> `jaxsys train` -> `jaxsys sample` on the
shipped Shakespeare with a trained BPE, in fresh processes; and the commands' one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jaxsys.data.corpus import shakespeare_text
from jaxsys.data.dataset import load_prepared
from jaxsys.data.tokenizers import HFTokenizer, load_tokenizer
from jaxsys.inference.load import read_run
from tests.helpers import subprocess_env

TRAIN = ["train", "--preset", "tiny", "train.steps=2", "checkpoint.every=2", "train.eval_every=2",
         "logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0"]


def jaxsys(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxsys", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_bpe_prepare_train_sample_end_to_end(tmp_path):
    text = shakespeare_text()
    (tmp_path / "part1.txt").write_text(text[:600_000], encoding="utf-8")
    (tmp_path / "part2.txt").write_text(text[600_000:], encoding="utf-8")
    tok = jaxsys("tokenizer", "train", "--vocab-size", "512", "part*.txt", "--doc-sep", "\\n\\n", "--out", "bpe",
                 cwd=tmp_path)
    assert tok.returncode == 0, tok.stderr
    assert "512 tokens (eos = bos = id 0)" in tok.stdout
    bpe = load_tokenizer(tmp_path / "bpe")
    assert isinstance(bpe, HFTokenizer) and bpe.vocab_size == 512

    prep = jaxsys("data", "prepare", "part*.txt", "--tokenizer", "bpe", "--out", "data", "--doc-sep", "\\n\\n",
                  "--workers", "2", "--quiet", cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    data = load_prepared(tmp_path / "data")
    docs = [d for d in text[:600_000].split("\n\n") + text[600_000:].split("\n\n") if d]
    assert data.meta["splits"]["train"]["documents"] + data.meta["splits"]["val"]["documents"] == len(docs)
    assert data.meta["tokenizer"] == bpe.to_json()

    run = jaxsys(*TRAIN, "data.source=data", "model.vocab_size=512", "run_dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "final val loss" in run.stdout
    assert json.loads((tmp_path / "run/tokenizer.json").read_text()) == bpe.to_json()
    assert (tmp_path / "run/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "bpe/tokenizer.json").read_bytes()
    _, run_tok = read_run(tmp_path / "run")
    assert isinstance(run_tok, HFTokenizer) and run_tok.sha256 == bpe.sha256

    sample = jaxsys("sample", "--run-dir", "run", "--prompt", "JULIET:", "--max-new-tokens", "12", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("JULIET:") and len(sample.stdout) > len("JULIET:\n")

    # Resuming on a dataset prepared with another tokenizer (the same data.source path) is refused.
    (tmp_path / "data").rename(tmp_path / "data-bpe")
    other = jaxsys("data", "prepare", "part2.txt", "--tokenizer", "byte", "--out", "data", "--doc-sep", "\\n\\n",
                   "--workers", "1", "--quiet", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    again = jaxsys(*TRAIN, "train.steps=4", "data.source=data", "model.vocab_size=512", "run_dir=run", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "trained with the tokenizer in run/tokenizer.json (hf sha256 " in again.stderr
    assert "data.source='data' gives another one (byte)" in again.stderr
    assert "prepare the data again with `jaxsys data prepare ... --tokenizer run`" in again.stderr


def test_a_bad_input_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    run = jaxsys("data", "prepare", "empty.txt", "--tokenizer", "byte", "--out", "out", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr == "jaxsys: error: empty.txt is empty (0 bytes); remove it from the inputs.\n"
    run = jaxsys("tokenizer", "train", "--vocab-size", "512", "missing/*.txt", "--out", "t", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "'missing/*.txt' matches no file" in run.stderr
