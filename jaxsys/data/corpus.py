"""Training data: the shipped Shakespeare, a text file, or a ``.bin`` of uint16 tokens, split
into train and validation; or prepared dataset directories (`dataset`), mixed by weight
(`packing.Mixture`); and the one place its fitness for a config is checked.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxsys.config import Config, ConfigError, DataConfig
from jaxsys.data.dataset import META, is_prepared, load_prepared
from jaxsys.data.documents import file_problem
from jaxsys.data.packing import Mixture, Stream
from jaxsys.data.tokenizers import ByteTokenizer, CharTokenizer, IdTokenizer, Tokenizer, tokenizer_from_json


def shakespeare_text() -> str:
    """The tiny-Shakespeare corpus shipped in the package (1,115,394 characters)."""
    blob = importlib.resources.files("jaxsys").joinpath("data/assets/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


@dataclass
class Corpus:
    """Token ids split into train and validation (the last `val_fraction`), or, for prepared
    datasets, a `Mixture` of their train and of their val splits."""

    train: np.ndarray | Mixture
    val: np.ndarray | Mixture
    tokenizer: Tokenizer


def _source_file(cfg: DataConfig, what: str) -> Path:
    """`data.source` as a readable, non-empty file, or a `ConfigError` saying what it is instead."""
    path = Path(cfg.source)
    where = f"data.source={cfg.source!r}"
    problem = file_problem(path)
    if problem == "missing":
        raise ConfigError(f"{where}: file not found; use 'shakespeare', a UTF-8 text file, or a .bin "
                          "file of uint16 token ids.")
    if problem == "directory":
        raise ConfigError(f"{where} is a directory without {META}; give {what} file inside it, or a "
                          "dataset directory written by `jaxsys data prepare`.")
    if problem == "empty":
        raise ConfigError(f"{where} is empty (0 bytes); give {what} file with data in it.")
    if problem is not None:
        raise ConfigError(f"{where} cannot be read ({problem}).")
    return path


def _bin_tokens(cfg: DataConfig) -> tuple[np.ndarray, Tokenizer]:
    path = _source_file(cfg, "a .bin")
    size = path.stat().st_size
    if size % 2:
        raise ConfigError(f"data.source={cfg.source!r} has {size:,} bytes, not a whole number of uint16 "
                          "tokens (2 bytes each); is it a nanoGPT-style .bin of uint16 token ids?")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    meta = path.with_suffix(".json")
    if not meta.exists():  # no tokenizer: ids are shown as ids, not decoded as bytes
        return tokens, IdTokenizer()
    try:  # {"kind": "char", "chars": ...} written next to the tokens
        tokenizer = tokenizer_from_json(json.loads(meta.read_text(encoding="utf-8")), base=path.parent)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{meta} (the tokenizer beside data.source) is not a valid tokenizer file "
                          f"({str(e).splitlines()[0]}); fix it, or remove it to train on plain ids.") from None
    if tokenizer.vocab_size > 65536:
        raise ConfigError(f"{meta}: its tokenizer has {tokenizer.vocab_size:,} tokens, more than the uint16 "
                          f"ids of {path} hold (65,536); use `jaxsys data prepare` (uint32 tokens) instead.")
    return tokens, tokenizer


def _text(cfg: DataConfig) -> str:
    if cfg.source == "shakespeare":
        return shakespeare_text()
    path = _source_file(cfg, "a text")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.source={cfg.source!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                          f"offset {e.start:,}); convert it to UTF-8, or give a .bin file of uint16 "
                          "token ids.") from None


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read `cfg.source`: ``shakespeare``, a UTF-8 text file, or a ``.bin`` of uint16 tokens
    (memory-mapped; with the tokenizer in ``<name>.json`` beside it if there is one, else the
    ids stay ids: `IdTokenizer`), or prepared dataset directories (`cfg.sources`, or a
    `cfg.source` holding a dataset.json). Raises `ConfigError` on a missing, empty or unreadable source."""
    if cfg.sources or is_prepared(cfg.source):
        return _prepared(cfg)
    if cfg.source.endswith(".bin"):
        tokens, tokenizer = _bin_tokens(cfg)
    else:
        text = _text(cfg)
        tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else CharTokenizer.from_text(text)
        tokens = tokenizer.encode(text)
    split = int(len(tokens) * (1.0 - cfg.val_fraction))
    return Corpus(train=tokens[:split], val=tokens[split:], tokenizer=tokenizer)


def _prepared(cfg: DataConfig) -> Corpus:
    """The train and val `Mixture`s of the prepared directories `cfg.sources` (or `cfg.source`)."""
    paths = cfg.sources or (cfg.source,)
    sets = []
    for p in paths:
        if not is_prepared(p):
            raise ConfigError(f"data.sources: {p} is not a prepared dataset (no {Path(p) / META}); make one "
                              "with `jaxsys data prepare FILES --tokenizer T --out DIR`.")
        sets.append(load_prepared(p))
    first = sets[0]
    for d in sets[1:]:
        if d.tokenizer.to_json() != first.tokenizer.to_json():
            raise ConfigError(f"data.sources: {d.path} was prepared with another tokenizer "
                              f"({_describe(d.tokenizer)}) than {first.path} ({_describe(first.tokenizer)}); "
                              f"prepare it again with --tokenizer {first.path}.")
    raw = cfg.weights or (1.0,) * len(sets)
    weights = tuple(w / sum(raw) for w in raw)

    def mixture(split: str) -> Mixture:
        streams = tuple(Stream(getattr(d, split).tokens, getattr(d, split).doc_offsets, f"{d.path} ({split})",
                               int(d.meta.get("max_token_id", -1))) for d in sets)
        return Mixture(streams, weights, cfg.segments)

    return Corpus(train=mixture("train"), val=mixture("val"), tokenizer=first.tokenizer)


def _describe(tokenizer: Tokenizer) -> str:
    data = tokenizer.to_json()
    return f"hf sha256 {data['sha256'][:12]}…" if data["kind"] == "hf" else data["kind"]


def _check_mixture(cfg: Config, corpus: Corpus) -> None:
    for mix in (corpus.train, corpus.val):
        for s in mix.streams:
            if len(s.tokens) < cfg.model.seq_len + 2:
                raise ConfigError(f"{s.name} has {len(s.tokens)} tokens, fewer than model.seq_len+2="
                                  f"{cfg.model.seq_len + 2}; prepare more text into it (or a larger "
                                  "--val-fraction), or use a shorter model.seq_len.")
    if cfg.faults.nan_batches:
        raise ConfigError("faults.nan_batches poisons a token array; it needs a text or .bin data.source.")


def check_corpus(cfg: Config, corpus: Corpus) -> None:
    """Data problems that would otherwise surface mid-run (or as a NaN loss) raise `ConfigError`."""
    m = cfg.model
    if corpus.tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.tokenizer.vocab_size}; set model.vocab_size={corpus.tokenizer.vocab_size}.")
    if isinstance(corpus.train, Mixture):
        _check_mixture(cfg, corpus)
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if isinstance(tokens, Mixture):
            continue
        if len(tokens) < m.seq_len + 2:
            raise ConfigError(
                f"The {split} split has {len(tokens)} tokens of data.source={cfg.data.source!r}, fewer "
                f"than model.seq_len+2={m.seq_len + 2}; use more data, a shorter model.seq_len, or "
                "another data.val_fraction."
            )
    top = (max(corpus.train.max_token(), corpus.val.max_token()) if isinstance(corpus.train, Mixture)
           else int(max(corpus.train.max(), corpus.val.max())))
    if top >= m.vocab_size:
        where = ",".join(cfg.data.sources) or cfg.data.source
        raise ConfigError(f"data.source={where!r} contains token id {top}, but "
                          f"model.vocab_size={m.vocab_size}; set model.vocab_size above {top}.")
    if cfg.logging.sample_tokens > 0:
        try:
            corpus.tokenizer.encode(cfg.logging.sample_prompt)
        except ValueError as e:
            off = "; or set logging.sample_tokens=0" if isinstance(corpus.tokenizer, IdTokenizer) else ""
            raise ConfigError(f"logging.sample_prompt={cfg.logging.sample_prompt!r}: {e}{off}.") from None
