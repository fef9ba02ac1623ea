"""Tokenizers: bytes (vocabulary 256), characters (one id per distinct character), and plain
token ids (a ``.bin`` corpus with no tokenizer beside it: ids are shown as numbers, not guessed).

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


class IdTokenizer:
    """No tokenizer: the token ids of a ``.bin`` corpus whose tokenizer jaxsys does not have.

    Decoding them as bytes would print garbage, so text is the ids themselves, separated by
    spaces, both ways: a prompt is ``"464 2068"``. `vocab_size` 0 means unknown (the model's)."""

    vocab_size = 0
    HELP = ("this run has no tokenizer (a .bin corpus without one beside it), so text is token ids: "
            "give the prompt as ids separated by spaces, e.g. '0 1 2'")

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.array([int(x) for x in text.split()], dtype=np.int32)
        except ValueError:
            raise ValueError(self.HELP) from None

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def to_json(self) -> dict:
        return {"kind": "ids"}


Tokenizer = ByteTokenizer | CharTokenizer | IdTokenizer


def tokenizer_from_json(data: dict) -> Tokenizer:
    """The tokenizer of a `to_json` dict; raises ValueError on anything else."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "ids":
        return IdTokenizer()
    if kind == "char" and isinstance(data.get("chars"), str) and data["chars"]:
        return CharTokenizer(data["chars"])
    raise ValueError(f"not a tokenizer: expected {{'kind': 'byte' | 'char' | 'ids', ...}}, got {str(data)[:80]}")
