"""Tokenizers: bytes (vocabulary 256), characters (one id per distinct character), plain token
ids (a ``.bin`` corpus with no tokenizer beside it: ids are shown as numbers, not guessed), and
Hugging Face ``tokenizers`` (a folder with ``tokenizer.json``: BPE, WordPiece, ...).

Each has `encode(text) -> int32 ids`, `decode(ids) -> text`, `vocab_size`, special-token ids
(`bos_id`, `eos_id`, `pad_id`: None when it has none) and a JSON form (`to_json` /
`tokenizer_from_json`) saved as ``tokenizer.json`` in a run directory (or a prepared dataset)
beside the checkpoints. A Hugging Face tokenizer's own files go to ``<dir>/tokenizer/`` and the
JSON records them by the SHA-256 of their ``tokenizer.json``: `save_tokenizer` / `load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxsys.config import ConfigError

TOKENIZER_JSON = "tokenizer.json"  # our JSON form in a run or dataset directory
HF_DIR = "tokenizer"  # the Hugging Face files of an "hf" tokenizer, beside TOKENIZER_JSON
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
INSTALL = "pip install 'jaxsys[data]'"


class ByteTokenizer:
    """UTF-8 bytes; vocabulary 256."""

    vocab_size = 256
    bos_id = eos_id = pad_id = None
    chat_template = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer:
    """One id per distinct character of the training text (sorted)."""

    bos_id = eos_id = pad_id = None
    chat_template = None

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
    bos_id = eos_id = pad_id = None
    chat_template = None
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


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer, built from the bytes of its files (`HF_FILES`:
    ``tokenizer.json`` and, when present, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``chat_template.jinja``), so it pickles (to worker processes) and saves as it was read.

    `encode` adds no special tokens (a prompt is encoded as written); `vocab_size` counts the
    added tokens; `chat_template` is the source's Jinja template or None."""

    def __init__(self, files: dict[str, bytes]):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ConfigError(f"Hugging Face tokenizers need the `tokenizers` package: {INSTALL}.") from None
        self.files = dict(files)
        self.sha256 = hashlib.sha256(files["tokenizer.json"]).hexdigest()
        self._tok = _HF.from_str(files["tokenizer.json"].decode("utf-8"))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        special = json.loads(files.get("special_tokens_map.json", b"{}"))
        self.special_tokens: dict[str, str | None] = {}
        for name in ("bos", "eos", "pad"):
            text = _token_text(config.get(f"{name}_token")) or _token_text(special.get(f"{name}_token"))
            self.special_tokens[name] = text
        self.bos_id, self.eos_id, self.pad_id = (self._id(self.special_tokens[n]) for n in ("bos", "eos", "pad"))
        template = files.get("chat_template.jinja")
        self.chat_template = template.decode("utf-8") if template else config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default") or next(iter(named.values()), None)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFTokenizer":
        """The tokenizer in folder `path` (its ``tokenizer.json`` and the optional files)."""
        path = Path(path)
        main = path / "tokenizer.json"
        if not main.is_file():
            raise ConfigError(f"{path} holds no tokenizer.json; give a Hugging Face tokenizer folder "
                              "(e.g. one written by `jaxsys tokenizer train`), or 'byte'.")
        files = {name: (path / name).read_bytes() for name in HF_FILES if (path / name).is_file()}
        try:
            return cls(files)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions on a bad file
            raise ConfigError(f"{main} is not a Hugging Face tokenizer ({str(e).splitlines()[0]}); "
                              "restore it from its source.") from None

    def __getstate__(self) -> dict:
        return {"files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """`messages` ([{"role": ..., "content": ...}]) rendered by the source's chat template
        (Jinja, sandboxed, as `transformers` renders it). Raises ValueError without a template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.special_tokens["bos"] or "", eos_token=self.special_tokens["eos"] or "")

    def token_bytes(self) -> np.ndarray | None:
        """UTF-8 bytes of text behind each id, int64 [vocab_size] (special tokens: 0), for bits
        per byte; None unless the tokenizer is byte-level (GPT-2 style: one character of a
        token's string per byte), where the count is exact."""
        spec = json.loads(self.files["tokenizer.json"])
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            return None
        out = np.zeros(self.vocab_size, np.int64)
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            out[i] = 0 if i in special else len(token)
        return out

    def to_json(self) -> dict:
        return {"kind": "hf", "dir": HF_DIR, "sha256": self.sha256}


Tokenizer = ByteTokenizer | CharTokenizer | IdTokenizer | HFTokenizer


def tokenizer_from_json(data: dict, base: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a `to_json` dict; raises ValueError on anything else. An ``hf`` one is
    read from ``<base>/<dir>`` (`base`: the run or dataset directory holding the JSON), and its
    tokenizer.json must still have the recorded SHA-256."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "ids":
        return IdTokenizer()
    if kind == "char" and isinstance(data.get("chars"), str) and data["chars"]:
        return CharTokenizer(data["chars"])
    if kind == "hf" and isinstance(data.get("dir"), str) and isinstance(data.get("sha256"), str):
        if base is None:
            raise ValueError("an 'hf' tokenizer needs the directory that holds it")
        folder = Path(base) / data["dir"]
        tok = HFTokenizer.from_dir(folder)
        if tok.sha256 != data["sha256"]:
            raise ValueError(f"{folder / 'tokenizer.json'} has SHA-256 {tok.sha256[:12]}…, not the recorded "
                             f"{data['sha256'][:12]}… (the file changed since)")
        return tok
    raise ValueError(f"not a tokenizer: expected {{'kind': 'byte' | 'char' | 'ids' | 'hf', ...}}, got {str(data)[:80]}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write `tokenizer` into a run (or dataset) directory: ``<directory>/tokenizer.json`` (our
    JSON, `to_json`) and, for an `HFTokenizer`, its files in ``<directory>/tokenizer/`` first.
    Every file is replaced atomically; returns the path of ``tokenizer.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        folder = directory / HF_DIR
        folder.mkdir(exist_ok=True)
        for name in HF_FILES:
            if name in tokenizer.files:
                _write_atomic(folder / name, tokenizer.files[name])
            elif (folder / name).exists():  # a stale file of another tokenizer
                (folder / name).unlink()
    path = directory / TOKENIZER_JSON
    _write_atomic(path, json.dumps(tokenizer.to_json()).encode("utf-8"))
    return path


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer from the command line or a directory: ``byte``; a run or dataset directory
    (its ``tokenizer.json`` is our JSON, `save_tokenizer`); or a Hugging Face tokenizer folder
    (its ``tokenizer.json`` is Hugging Face's). Raises `ConfigError` naming the path and a fix."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        what = "a file" if path.exists() else "not found"
        raise ConfigError(f"tokenizer {str(spec)!r}: {what}; give 'byte', a Hugging Face tokenizer folder "
                          "(with tokenizer.json), or a jaxsys run or dataset directory.")
    main = path / TOKENIZER_JSON
    try:
        data = json.loads(main.read_text(encoding="utf-8")) if main.is_file() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{main} is not valid JSON ({str(e).splitlines()[0]}); restore it.") from None
    if isinstance(data, dict) and "kind" in data:
        try:
            return tokenizer_from_json(data, base=path)
        except ValueError as e:
            raise ConfigError(f"{main}: {str(e).splitlines()[0]}; restore it, or prepare/train again.") from None
    return HFTokenizer.from_dir(path)
