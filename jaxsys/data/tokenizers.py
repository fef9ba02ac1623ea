"""Tokenizers: bytes (vocabulary 256) and characters (one id per distinct character).

Each has `encode(text) -> int32 ids`, `decode(ids) -> text`, `vocab_size` and a JSON form
(`to_json` / `tokenizer_from_json`) saved in a run directory beside the checkpoints.
"""

from __future__ import annotations

import numpy as np


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
