"""Tokenizers: round trips, special tokens, the chat template, saving into a run dir, BPE training."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.data.bpe import ENDOFTEXT, train_bpe, write_hf_dir
from jaxsys.data.corpus import shakespeare_text
from jaxsys.data.tokenizers import (ByteTokenizer, CharTokenizer, HFTokenizer, IdTokenizer, load_tokenizer,
                                    save_tokenizer, tokenizer_from_json)

TEXTS = ["ROMEO: But soft, what light", "naïve café — ünïcödé ✓ 日本語", "a\n\n  b\t c", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(shakespeare_text()[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe([corpus], 400, doc_sep="\n\n")


def test_byte_and_char_round_trip():
    byte = ByteTokenizer()
    char = CharTokenizer.from_text("".join(TEXTS))
    for text in TEXTS:
        assert byte.decode(byte.encode(text)) == text
        assert char.decode(char.encode(text)) == text
        assert list(byte.encode(text)) == list(text.encode("utf-8"))
    assert (byte.eos_id, char.bos_id, IdTokenizer().pad_id) == (None, None, None)
    assert IdTokenizer().decode(IdTokenizer().encode("3 1 4")) == "3 1 4"


def test_hf_round_trip_and_special_tokens(bpe):
    assert bpe.vocab_size == 400
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 0, None)
    for text in TEXTS:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and (ids < 400).all()
        assert bpe.decode(ids) == text
    # A merged vocabulary: Shakespeare's words take fewer tokens than bytes.
    assert len(bpe.encode(TEXTS[0])) < len(TEXTS[0].encode("utf-8"))
    ids = bpe.encode(f"the end{ENDOFTEXT}the start")
    assert list(ids).count(0) == 1 and bpe.decode(ids) == f"the end{ENDOFTEXT}the start"
    table = bpe.token_bytes()  # bits per byte: the text bytes behind the ids, exactly
    for text in TEXTS:
        assert table[bpe.encode(text)].sum() == len(text.encode("utf-8"))
    assert table[0] == 0 and table.shape == (400,)
    clone = pickle.loads(pickle.dumps(bpe))  # to data-prepare workers
    assert clone.sha256 == bpe.sha256 and list(clone.encode(TEXTS[1])) == list(bpe.encode(TEXTS[1]))


def test_special_tokens_and_chat_template_from_the_config(bpe):
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    config = {"bos_token": {"content": ENDOFTEXT}, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
              "chat_template": template}
    tok = HFTokenizer({"tokenizer.json": bpe.files["tokenizer.json"],
                       "tokenizer_config.json": json.dumps(config).encode()})
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
    assert tok.chat_template == template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        f"<|user|>Hi{ENDOFTEXT}<|assistant|>Hello{ENDOFTEXT}<|assistant|>")
    with pytest.raises(ValueError, match="no chat template"):
        bpe.apply_chat_template(messages)


def test_save_into_a_run_dir_and_load_back(bpe, tmp_path):
    path = save_tokenizer(bpe, tmp_path / "run")
    data = json.loads(path.read_text())
    assert data == {"kind": "hf", "dir": "tokenizer", "sha256": bpe.sha256}
    assert (tmp_path / "run/tokenizer/tokenizer.json").read_bytes() == bpe.files["tokenizer.json"]
    for again in (load_tokenizer(tmp_path / "run"), tokenizer_from_json(data, base=tmp_path / "run")):
        assert isinstance(again, HFTokenizer) and again.sha256 == bpe.sha256
        assert list(again.encode(TEXTS[0])) == list(bpe.encode(TEXTS[0]))
    save_tokenizer(ByteTokenizer(), tmp_path / "bytes")
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    # Someone edits the HF file: the recorded hash no longer matches.
    hf_file = tmp_path / "run/tokenizer/tokenizer.json"
    hf_file.write_text(hf_file.read_text() + "\n")
    with pytest.raises(ConfigError, match="SHA-256 .* not the recorded"):
        load_tokenizer(tmp_path / "run")


def test_load_tokenizer_from_a_hf_folder_and_bad_specs(bpe, tmp_path):
    folder = write_hf_dir(bpe, tmp_path / "hf")
    assert load_tokenizer(folder).sha256 == bpe.sha256
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="not found; give 'byte', a Hugging Face tokenizer folder"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ConfigError, match="is not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "broken")


def test_bpe_training_is_deterministic(corpus, bpe):
    again = train_bpe([corpus], 400, doc_sep="\n\n")
    assert again.files == bpe.files  # tokenizer.json and tokenizer_config.json, byte for byte
    other = train_bpe([corpus], 300, doc_sep="\n\n")
    assert other.vocab_size == 300 and other.files["tokenizer.json"] != bpe.files["tokenizer.json"]
    with pytest.raises(ConfigError, match="below the 257 tokens"):
        train_bpe([corpus], 200)
