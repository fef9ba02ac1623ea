"""Training text: the shipped Shakespeare, a text file, or a ``.bin`` of uint16 tokens, split
into train and validation; and the one place its fitness for a config is checked.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxsys.config import Config, ConfigError, DataConfig
from jaxsys.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_json


def shakespeare_text() -> str:
    """The tiny-Shakespeare corpus shipped in the package (1,115,394 characters)."""
    blob = importlib.resources.files("jaxsys").joinpath("data/assets/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


@dataclass
class Corpus:
    """Token ids split into train and validation (the last `val_fraction`)."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read `cfg.source`: ``shakespeare``, a text file, or a ``.bin`` of uint16 tokens (memmapped)."""
    if cfg.source.endswith(".bin"):
        path = Path(cfg.source)
        if not path.exists():
            raise ConfigError(f"data.source={cfg.source!r}: file not found.")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        tokenizer: Tokenizer = ByteTokenizer()
        meta = path.with_suffix(".json")
        if meta.exists():  # optional {"kind": "char", "chars": ...} written next to the tokens
            tokenizer = tokenizer_from_json(json.loads(meta.read_text()))
    else:
        if cfg.source == "shakespeare":
            text = shakespeare_text()
        else:
            path = Path(cfg.source)
            if not path.exists():
                raise ConfigError(f"data.source={cfg.source!r}: file not found; use 'shakespeare', "
                                  "a text file, or a .bin token file.")
            text = path.read_text(encoding="utf-8")
        tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else CharTokenizer.from_text(text)
        tokens = tokenizer.encode(text)
    split = int(len(tokens) * (1.0 - cfg.val_fraction))
    return Corpus(train=tokens[:split], val=tokens[split:], tokenizer=tokenizer)


def check_corpus(cfg: Config, corpus: Corpus) -> None:
    """Data problems that would otherwise surface mid-run (or as a NaN loss) raise `ConfigError`."""
    m = cfg.model
    if corpus.tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.tokenizer.vocab_size}; set model.vocab_size={corpus.tokenizer.vocab_size}.")
    top = int(max(corpus.train.max(), corpus.val.max()))
    if top >= m.vocab_size:
        raise ConfigError(f"data.source={cfg.data.source!r} contains token id {top}, but "
                          f"model.vocab_size={m.vocab_size}; set model.vocab_size above {top}.")
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < m.seq_len + 2:
            raise ConfigError(
                f"The {split} split has {len(tokens)} tokens, fewer than model.seq_len+2={m.seq_len + 2}; "
                "use more data, a shorter model.seq_len, or another data.val_fraction."
            )
    if cfg.logging.sample_tokens > 0:
        try:
            corpus.tokenizer.encode(cfg.logging.sample_prompt)
        except ValueError as e:
            raise ConfigError(f"logging.sample_prompt={cfg.logging.sample_prompt!r}: {e}.") from None
