"""`jaxsys eval`: loss, perplexity and bits per byte of a trained run, on its val split or a file."""

import functools
import json
import math
import shutil

import jax
import numpy as np
import optax
import pytest

from jaxsys.cli.main import main
from jaxsys.config import ConfigError, apply_overrides
from jaxsys.config.presets import tiny
from jaxsys.data.tokenizers import ByteTokenizer, CharTokenizer
from jaxsys.inference.evaluate import evaluate_run, token_bytes, windows
from jaxsys.inference.load import load_run
from jaxsys.train.loop import train

TEXT = "Où est la café? Naïve señor — ça va.\n" * 10  # multi-byte characters: bytes ≠ characters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run on one device (checkpoint and val loss at step 2)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    cfg = apply_overrides(tiny(), ["mesh.data=1", "train.steps=2", "checkpoint.every=2",
                                   "logging.progress=false", "logging.sample_tokens=0", f"run_dir={run_dir}"])
    result = train(cfg, devices=jax.devices()[:1])
    return run_dir, result


def test_eval_on_the_val_split_equals_the_val_loss_training_reported(trained):
    run_dir, result = trained
    r = evaluate_run(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [row for row in rows if "val_loss" in row][-1]
    assert r.step == last_val["step"] == 2 and r.data == "val" and r.batches == 2
    # The same batches and the same one-device loss in the same order: equal to float precision.
    assert r.loss == pytest.approx(result.val_loss, rel=1e-6) and r.loss == pytest.approx(last_val["val_loss"], rel=1e-6)
    assert r.tokens == r.bytes == 2 * 8 * 16  # byte tokens: one byte each
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2), rel=1e-12)
    assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-12)


@functools.lru_cache(maxsize=None)
def _loaded(run_dir: str):
    return load_run(run_dir)


def _loss_by_hand(run_dir, tokens: np.ndarray) -> float:
    """Mean next-token cross-entropy over consecutive windows of seq_len, computed directly:
    the whole windows in one call, the rest in another (no padding, no mask)."""
    run = _loaded(str(run_dir))
    T, predicted = run.cfg.model.seq_len, len(tokens) - 1
    whole = predicted // T * T
    apply = jax.jit(lambda x: run.model.apply({"params": run.params}, x))
    nats = 0.0
    for x, y in ((tokens[:whole].reshape(-1, T), tokens[1:whole + 1].reshape(-1, T)),
                 (tokens[whole:predicted][None], tokens[whole + 1:][None])):
        if y.size:
            nats += float(optax.softmax_cross_entropy_with_integer_labels(apply(x), y).sum())
    return nats / predicted


def test_eval_on_a_text_file_predicts_every_token_once(trained, tmp_path):
    run_dir, _ = trained
    path = tmp_path / "other.txt"
    path.write_text(TEXT, encoding="utf-8")
    r = evaluate_run(run_dir, path)
    nbytes = len(TEXT.encode("utf-8"))
    assert r.tokens == r.bytes == nbytes - 1  # byte tokenizer: every byte after the first
    assert r.batches == math.ceil(math.ceil((nbytes - 1) / 16) / 8)
    assert r.loss == pytest.approx(_loss_by_hand(run_dir, ByteTokenizer().encode(TEXT)), rel=2e-6)
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2), rel=1e-12)
    first = evaluate_run(run_dir, path, num_batches=1)
    assert first.batches == 1 and first.tokens == 8 * 16


def test_bits_per_byte_of_a_character_tokenizer_counts_utf8_bytes(trained, tmp_path):
    run_dir, _ = trained
    char_run = tmp_path / "char_run"
    shutil.copytree(run_dir, char_run)  # same parameters, read through a character tokenizer
    chars = "".join(sorted(set(TEXT)))
    (char_run / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": chars}))
    path = tmp_path / "other.txt"
    path.write_text(TEXT, encoding="utf-8")
    r = evaluate_run(char_run, path)
    assert r.tokens == len(TEXT) - 1
    assert r.bytes == len(TEXT[1:].encode("utf-8")) > r.tokens
    total_nats = _loss_by_hand(char_run, CharTokenizer(chars).encode(TEXT)) * (len(TEXT) - 1)
    assert r.bits_per_byte == pytest.approx(total_nats / math.log(2) / r.bytes, rel=2e-6)
    assert list(token_bytes(CharTokenizer("aé€"))) == [1, 2, 3]


def test_windows_mask_only_the_padding():
    inputs, targets, mask = windows(np.arange(1, 12), seq_len=4, batch_size=2)  # 10 predictions
    assert inputs.shape == targets.shape == mask.shape == (2, 2, 4)
    assert int(mask.sum()) == 10
    assert list(targets[mask]) == list(range(2, 12)) and list(inputs[mask]) == list(range(1, 11))


def test_eval_command_prints_a_table_and_json(trained, capsys, tmp_path):
    run_dir, result = trained
    assert main(["eval", "--run-dir", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "bits per byte" in table and "perplexity" in table and f"{result.val_loss:.4f}" in table
    assert main(["eval", "--run-dir", str(run_dir), "--json", "--batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batches"] == 1 and out["step"] == 2 and out["bits_per_byte"] > 0
    assert main(["eval", "--run-dir", str(run_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot encode"):
        char_run = tmp_path / "c"
        shutil.copytree(run_dir, char_run)
        (char_run / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "ab"}))
        (tmp_path / "x.txt").write_text("abc")
        evaluate_run(char_run, tmp_path / "x.txt")
