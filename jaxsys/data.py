"""Tokenizers, the shipped Shakespeare corpus, and a deterministic batch sampler.

The batch for step k is a pure function of (seed, k, split): resuming at step k replays the
same batches, whatever happened before. Each process reads only the rows of the global batch
that its own devices hold (`jax.make_array_from_callback`), so the same code runs on one host
or many.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxsys.config import ConfigError, DataConfig


class ByteTokenizer:
    """UTF-8 bytes; vocabulary 256."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer:
    """One id per distinct character of the training text (sorted)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            raise ValueError(f"Characters not in the vocabulary: {unknown[:10]!r}")
        return np.array([self._index[c] for c in text], dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


Tokenizer = ByteTokenizer | CharTokenizer


def tokenizer_from_json(data: dict) -> Tokenizer:
    return ByteTokenizer() if data["kind"] == "byte" else CharTokenizer(data["chars"])


def shakespeare_text() -> str:
    """The tiny-Shakespeare corpus shipped in the package (1,115,394 characters)."""
    blob = importlib.resources.files("jaxsys").joinpath("data/tinyshakespeare.txt.gz").read_bytes()
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


def batch_offsets(seed: int, step: int, split: str, global_batch: int, num_tokens: int,
                  seq_len: int) -> np.ndarray:
    """Start offsets of the `global_batch` windows for `step`: a pure function of its inputs."""
    stream = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=global_batch)


def local_batch(tokens: np.ndarray, seed: int, step: int, split: str, global_batch: int,
                seq_len: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch: ``inputs`` and ``targets``, int32 [b, seq_len]."""
    if len(tokens) <= seq_len + 1:
        raise ConfigError(f"The {split} split has {len(tokens)} tokens, fewer than model.seq_len+2="
                          f"{seq_len + 2}; use more data or a shorter model.seq_len.")
    offsets = batch_offsets(seed, step, split, global_batch, len(tokens), seq_len)
    per_process = global_batch // process_count
    mine = offsets[process_index * per_process:(process_index + 1) * per_process]
    windows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int32) for o in mine])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def global_batch(tokens: np.ndarray, seed: int, step: int, split: str, batch_size: int,
                 seq_len: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """The global batch for `step` as sharded `jax.Array`s.

    Each process reads only the rows its own devices hold (whatever the mesh: replicas over
    `tensor` get the same rows), so on many hosts no host loads the whole batch."""
    shape = (batch_size, seq_len)
    offsets = batch_offsets(seed, step, split, batch_size, len(tokens), seq_len)
    rows: dict[tuple[int, int], np.ndarray] = {}  # one window read per row range, not per device

    def windows(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(batch_size)
        if (start, stop) not in rows:
            rows[(start, stop)] = np.stack(
                [np.asarray(tokens[o:o + seq_len + 1], dtype=np.int32) for o in offsets[start:stop]])
        return rows[(start, stop)]

    return {
        "inputs": jax.make_array_from_callback(shape, sharding, lambda i: windows(i)[:, :-1][:, i[1]]),
        "targets": jax.make_array_from_callback(shape, sharding, lambda i: windows(i)[:, 1:][:, i[1]]),
    }
