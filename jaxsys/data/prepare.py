"""`jaxsys data prepare`: the user's files tokenized into a dataset directory (`dataset`).

Documents are read in order (`documents.read_documents`), grouped into chunks of about
`CHUNK_BYTES` of text within one file, and encoded by `workers` processes (`spawn`ed, each with
one tokenizer thread); chunks come back in order, so the output is the same bytes whatever the
number of workers. When the tokenizer has an eos token it ends every document (a model learns
where documents end; `batches` never lets a prediction cross into the next document).

The split is by documents: document i (counted over all files) goes to val when
floor((i+1)·f) > floor(i·f), f = `val_fraction` — every 1/f-th document, spread over the files.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxsys.config import ConfigError
from jaxsys.data import dataset as ds
from jaxsys.data.documents import read_documents
from jaxsys.data.tokenizers import Tokenizer, save_tokenizer

CHUNK_BYTES = 1 << 20  # text per task sent to a worker
_worker_tokenizer: Any = None


def default_workers() -> int:
    """One process per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: workers are the parallelism
    _worker_tokenizer = tokenizer


def encode_chunk(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 concatenated, document lengths) of `docs`, eos appended when there is one."""
    tok = tokenizer or _worker_tokenizer
    encoded = tok.encode_batch(docs) if hasattr(tok, "encode_batch") else [tok.encode(d) for d in docs]
    if tok.eos_id is not None:
        encoded = [np.append(e, np.int32(tok.eos_id)) for e in encoded]
    lengths = np.array([len(e) for e in encoded], np.int64)
    return np.concatenate(encoded).astype(np.int64) if encoded else np.zeros(0, np.int64), lengths


def _chunks(files: list[Path], field: str, doc_sep: str | None) -> Iterator[tuple[int, list[str], int]]:
    """(file index, documents, their UTF-8 bytes), about CHUNK_BYTES each, never across files."""
    for i, path in enumerate(files):
        docs, nbytes, count = [], 0, 0
        for doc in read_documents(path, field, doc_sep):
            docs.append(doc)
            nbytes += len(doc.encode("utf-8"))
            count += 1
            if nbytes >= CHUNK_BYTES:
                yield i, docs, nbytes
                docs, nbytes = [], 0
        if docs:
            yield i, docs, nbytes
        if count == 0:
            what = f"no non-empty field {field!r}" if path.suffix.lower() in (".jsonl", ".json", ".parquet") else "only separators"
            raise ConfigError(f"{path} holds no document ({what}); remove it from the inputs.")


def _encoded(pool: Any, workers: int, chunks: Iterator) -> Iterator:
    """(chunk, encode_chunk(chunk)) in order; a window of 4 chunks per worker in flight at a
    time, so memory stays bounded whatever the corpus size."""
    if pool is None:
        for c in chunks:
            yield c, encode_chunk(c[1])
        return
    while window := list(itertools.islice(chunks, 4 * workers)):
        yield from zip(window, pool.imap(encode_chunk, [c[1] for c in window]))


def is_val(index: int, val_fraction: float) -> bool:
    """Does document `index` (over all files, from 0) go to the val split?"""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new directory for the dataset.")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; give a new directory (or remove this one).")


def _token_dtype(tokenizer: Tokenizer, dtype: str) -> str:
    chosen = ds.dtype_for(tokenizer.vocab_size) if dtype == "auto" else dtype
    if chosen not in ds.DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(ds.DTYPES)}.")
    limit = np.iinfo(ds.DTYPES[chosen]).max + 1
    if tokenizer.vocab_size > limit:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size:,} tokens, more than {chosen} holds "
                          f"({limit:,}); use --dtype uint32 (or auto).")
    return chosen


def prepare(files: list[Path], tokenizer: Tokenizer, out: str | Path, *, field: str = "text",
            doc_sep: str | None = None, val_fraction: float = 0.1, workers: int = 1, dtype: str = "auto",
            progress: bool = True) -> dict[str, Any]:
    """Tokenize the documents of `files` into the dataset directory `out` (new or empty) and
    return its metadata (also written as ``out/dataset.json``, last, once the rest is complete)."""
    out = Path(out)
    _check_out(out)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    chosen = _token_dtype(tokenizer, dtype)
    out.mkdir(parents=True, exist_ok=True)
    try:
        meta = _write(files, tokenizer, out, field, doc_sep, val_fraction, workers, chosen, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written dataset left behind
        raise
    return meta


def _write(files: list[Path], tokenizer: Tokenizer, out: Path, field: str, doc_sep: str | None,
           val_fraction: float, workers: int, dtype: str, progress: bool) -> dict[str, Any]:
    """`prepare`'s work: token files written as chunks come back, then offsets, tokenizer, metadata."""
    from tqdm.auto import tqdm
    np_dtype = ds.DTYPES[dtype]
    streams = {s: open(out / ds.token_file(s), "wb") for s in ds.SPLITS}
    offsets = {s: [0] for s in ds.SPLITS}
    sources = [{"path": str(p), "documents": 0, "tokens": 0, "text_bytes": 0} for p in files]
    index, top = 0, -1
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
            if workers > 1 else None)
    if pool is None:
        _init_worker(tokenizer)
    try:
        bar = tqdm(unit="B", unit_scale=True, desc="tokenizing", disable=not progress, mininterval=0.5)
        for (file_index, _, nbytes), (tokens, lengths) in _encoded(pool, workers, _chunks(files, field, doc_sep)):
            src = sources[file_index]
            src["documents"] += len(lengths)
            src["tokens"] += int(lengths.sum())
            src["text_bytes"] += nbytes
            top = max(top, int(tokens.max(initial=-1)))
            start = 0
            for n in lengths:
                split = "val" if is_val(index, val_fraction) else "train"
                streams[split].write(tokens[start:start + n].astype(np_dtype).tobytes())
                offsets[split].append(offsets[split][-1] + int(n))
                start += n
                index += 1
            bar.update(nbytes)
        bar.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        for f in streams.values():
            f.close()
    for s in ds.SPLITS:
        np.save(out / ds.index_file(s), np.asarray(offsets[s], np.int64))
    if len(offsets["train"]) == 1:
        raise ConfigError(f"all {index} documents went to the val split; lower --val-fraction, or split "
                          "the text into more documents (--doc-sep).")
    if val_fraction > 0 and len(offsets["val"]) == 1:
        raise ConfigError(f"the val split got none of the {index} document(s) (--val-fraction {val_fraction} "
                          f"sends every {1 / val_fraction:g}th); split the text into more documents "
                          "(e.g. --doc-sep '\n\n'), or raise --val-fraction.")
    save_tokenizer(tokenizer, out)
    meta = {"format": ds.FORMAT, "tokenizer": tokenizer.to_json(), "vocab_size": tokenizer.vocab_size,
            "dtype": dtype, "max_token_id": top, "eos_id": tokenizer.eos_id,
            "eos_per_document": tokenizer.eos_id is not None, "val_fraction": val_fraction,
            "field": field, "doc_sep": doc_sep,
            "splits": {s: {"tokens": offsets[s][-1], "documents": len(offsets[s]) - 1} for s in ds.SPLITS},
            "text_bytes": sum(src["text_bytes"] for src in sources), "sources": sources}
    (out / ds.META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta
