"""Reading documents from the user's files: text, JSONL and Parquet, one or many, or globs.

- ``.txt`` (and any other suffix): UTF-8 text; the whole file is one document, or, with a
  `doc_sep` such as ``"\\n\\n"``, the pieces between separators (empty pieces are dropped);
- ``.jsonl`` / ``.json``: one JSON object per line, the document in `field` (blank lines skipped);
- ``.parquet``: the string column `field`, read in record batches with `pyarrow`.

Every problem (no match, a directory, an empty or non-UTF-8 file, a bad JSONL line, a missing
field) is a `ConfigError` naming the file (and line) and the fix.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from jaxsys.config import ConfigError

GLOB_CHARS = "*?["


def expand_inputs(patterns: list[str]) -> list[Path]:
    """The files named by `patterns` (paths or globs, each glob sorted), in order, without repeats."""
    if not patterns:
        raise ConfigError("no input files given; name text, .jsonl or .parquet files (or globs).")
    out: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ConfigError(f"{pattern!r} matches no file; check the pattern (relative to "
                                  f"{Path.cwd()}) or name the files.")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(pattern)]
        for path in paths:
            check_file(path)
            if path not in out:
                out.append(path)
    return out


def file_problem(path: Path) -> str | None:
    """What keeps `path` from being a readable, non-empty regular file: "missing", "directory",
    "empty", the OS's reason it cannot be read, or None. Callers word the fix."""
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "directory"
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return "empty" if size == 0 else None


def check_file(path: Path) -> None:
    """A readable, non-empty regular file, or a `ConfigError` saying what it is instead."""
    problem = file_problem(path)
    if problem == "missing":
        raise ConfigError(f"{path}: file not found; check the path.")
    if problem == "directory":
        raise ConfigError(f"{path} is a directory; give the files inside it, e.g. '{path}/*.txt'.")
    if problem == "empty":
        raise ConfigError(f"{path} is empty (0 bytes); remove it from the inputs.")
    if problem is not None:
        raise ConfigError(f"{path} cannot be read ({problem}); fix its permissions.")


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; a non-UTF-8 file is a `ConfigError` with the offset of its first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}); "
                          "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out.") from None


def _text_documents(path: Path, doc_sep: str | None) -> Iterator[str]:
    text = read_text(path)
    if not doc_sep:
        yield text
        return
    for piece in text.split(doc_sep):
        if piece:
            yield piece


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path}:{lineno}: not UTF-8; convert the file to UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: not JSON ({str(e).splitlines()[0]}); fix or remove "
                                  "the line (one JSON object per line).") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"{path}:{lineno}: no field {field!r} (has: {keys}); choose the "
                                  "text field with --field NAME.")
            value = row[field]
            if not isinstance(value, str):
                raise ConfigError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a "
                                  "string; choose a text field with --field NAME.")
            if value:
                yield value


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'jaxsys[data]'.") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid (and others) on a bad file
        raise ConfigError(f"{path} is not a Parquet file ({str(e).splitlines()[0]}); check the file.") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no column {field!r} (has: {', '.join(names)}); choose the text "
                          "column with --field NAME.")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{path}: column {field!r} holds {type(value).__name__} (row {row}), "
                                  "not strings; choose a text column with --field NAME.")
            if value:
                yield value


def read_documents(path: Path, field: str = "text", doc_sep: str | None = None) -> Iterator[str]:
    """The documents of one file, in order (see the module docstring for the formats)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_documents(path, field)
    if suffix == ".parquet":
        return _parquet_documents(path, field)
    return _text_documents(path, doc_sep)
