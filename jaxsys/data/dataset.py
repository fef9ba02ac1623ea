"""A prepared dataset directory (written by `jaxsys data prepare`, `jaxsys.data.prepare`):

    DIR/dataset.json          metadata: FORMAT, tokenizer (our JSON, with the SHA-256 of an hf
                              one), dtype, vocab_size, per split its token and document counts,
                              the source files, whether an eos token ends each document
    DIR/tokenizer.json        the tokenizer (`tokenizers.save_tokenizer`; hf: + DIR/tokenizer/)
    DIR/{train,val}.bin       the split's documents' tokens, concatenated, raw `dtype` (memory-mapped)
    DIR/{train,val}.idx.npy   int64 [documents + 1]: document d is tokens[idx[d]:idx[d+1]]

`load_prepared` reads it back and checks that the files agree with the metadata; every
problem is a `ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxsys.config import ConfigError
from jaxsys.data.tokenizers import Tokenizer, load_tokenizer

FORMAT = "jaxsys.dataset.v1"
META = "dataset.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
AGAIN = "run `jaxsys data prepare` again into a new --out directory"


def token_file(split: str) -> str:
    return f"{split}.bin"


def index_file(split: str) -> str:
    return f"{split}.idx.npy"


def dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype that holds ids below `vocab_size`: uint16 up to 65,535 tokens."""
    return "uint16" if vocab_size <= 65535 else "uint32"


@dataclass(frozen=True)
class TokenSplit:
    """One split of a prepared dataset: `tokens` (memory-mapped, 1-D) and `doc_offsets`
    (int64 [documents + 1], the start of each document and then the end)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit


def is_prepared(path: str | Path) -> bool:
    """Is `path` a directory holding a `META` file (a prepared dataset)?"""
    return (Path(path) / META).is_file()


def _meta(path: Path) -> dict[str, Any]:
    where = path / META
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid JSON ({str(e).splitlines()[0]}); {AGAIN}.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a jaxsys dataset (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {FORMAT!r}); {AGAIN}.")
    if meta.get("dtype") not in DTYPES:
        raise ConfigError(f"{where}: dtype {meta.get('dtype')!r} is not one of {list(DTYPES)}; {AGAIN}.")
    return meta


def _split(path: Path, meta: dict[str, Any], split: str) -> TokenSplit:
    info = meta["splits"][split]
    dtype = np.dtype(DTYPES[meta["dtype"]])
    tokens_path, index_path = path / token_file(split), path / index_file(split)
    for f in (tokens_path, index_path):
        if not f.is_file():
            raise ConfigError(f"{f} is missing from the dataset {path}; {AGAIN}.")
    size = tokens_path.stat().st_size
    if size != info["tokens"] * dtype.itemsize:
        raise ConfigError(f"{tokens_path} has {size:,} bytes, but {path / META} says {info['tokens']:,} "
                          f"{meta['dtype']} tokens ({info['tokens'] * dtype.itemsize:,} bytes): it was cut "
                          f"short or replaced; {AGAIN}.")
    offsets = np.load(index_path)
    if (offsets.ndim != 1 or len(offsets) != info["documents"] + 1 or (len(offsets) and offsets[0] != 0)
            or offsets[-1] != info["tokens"] or np.any(np.diff(offsets) <= 0)):
        raise ConfigError(f"{index_path} does not hold the {info['documents']:,} document offsets of "
                          f"{tokens_path} that {path / META} describes; {AGAIN}.")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenSplit(tokens, offsets.astype(np.int64))


def load_prepared(path: str | Path) -> PreparedDataset:
    """The prepared dataset in directory `path`, memory-mapped and checked against its metadata
    (file sizes, document offsets, tokenizer hash, vocabulary against the token dtype)."""
    path = Path(path)
    meta = _meta(path)
    tokenizer = load_tokenizer(path)
    if tokenizer.to_json() != meta["tokenizer"]:
        raise ConfigError(f"{path / 'tokenizer.json'} is another tokenizer than the one {path / META} was "
                          f"prepared with; {AGAIN}.")
    limit = np.iinfo(DTYPES[meta["dtype"]]).max + 1
    if tokenizer.vocab_size > limit:
        raise ConfigError(f"{path / META}: the tokenizer has {tokenizer.vocab_size:,} tokens, more than "
                          f"{meta['dtype']} holds ({limit:,}); prepare it again with --dtype uint32.")
    splits = {s: _split(path, meta, s) for s in SPLITS}
    return PreparedDataset(path, meta, tokenizer, splits["train"], splits["val"])
