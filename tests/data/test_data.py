"""Tokenizers, corpus loading and the deterministic, process-local sampler."""

import numpy as np
import pytest

from jaxsys.config import ConfigError, DataConfig
from jaxsys.data import batches, corpus as corpus_lib, tokenizers


def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    text = "ROMEO: O, she doth teach the torches — to burn bright! ünïcödé ✓"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_char_tokenizer_round_trip():
    text = corpus_lib.shakespeare_text()
    tok = tokenizers.CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text[:1000])) == text[:1000]
    assert tokenizers.tokenizer_from_json(tok.to_json()).chars == tok.chars
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("€")


def test_shipped_shakespeare_and_split():
    corpus = corpus_lib.load_corpus(DataConfig())
    assert len(corpus.train) + len(corpus.val) == 1_115_394
    assert len(corpus.val) == pytest.approx(111_540, abs=1)
    assert tokenizers.ByteTokenizer().decode(corpus.train[:14]) == "First Citizen:"


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = corpus_lib.load_corpus(DataConfig()).train
    a = batches.local_batch(tokens, seed=0, step=7, split="train", global_batch=8, seq_len=32)
    b = batches.local_batch(tokens, seed=0, step=7, split="train", global_batch=8, seq_len=32)
    c = batches.local_batch(tokens, seed=0, step=8, split="train", global_batch=8, seq_len=32)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])  # shifted by one


def test_process_local_rows_compose_the_global_batch():
    tokens = corpus_lib.load_corpus(DataConfig()).train
    full = batches.local_batch(tokens, 0, 3, "train", 8, 16)
    parts = [batches.local_batch(tokens, 0, 3, "train", 8, 16, process_index=i, process_count=4)
             for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])


def test_text_and_bin_sources(tmp_path):
    text = "to be or not to be, that is the question. " * 20
    (tmp_path / "t.txt").write_text(text)
    corpus = corpus_lib.load_corpus(DataConfig(source=str(tmp_path / "t.txt"), tokenizer="char"))
    assert corpus.tokenizer.decode(corpus.train[:5]) == "to be"
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    corpus = corpus_lib.load_corpus(DataConfig(source=str(tmp_path / "tok.bin")))
    assert isinstance(corpus.train, np.memmap) and corpus.train[5] == 5 and len(corpus.val) == 100
    with pytest.raises(ConfigError, match="file not found"):
        corpus_lib.load_corpus(DataConfig(source=str(tmp_path / "missing.txt")))


def test_bad_data_is_refused_before_compiling(tmp_path):
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import tiny
    from jaxsys.train.loop import train

    np.array([1, 2, 300, 4] * 100, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    cfg = apply_overrides(tiny(), [f"data.source={tmp_path / 'ids.bin'}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="contains token id 300, but model.vocab_size=256"):
        train(cfg)
    (tmp_path / "short.txt").write_text("x" * 100)
    cfg = apply_overrides(tiny(), [f"data.source={tmp_path / 'short.txt'}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="validation split has 10 tokens"):
        train(cfg)
