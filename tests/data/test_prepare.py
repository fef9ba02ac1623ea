"""`data prepare`: token counts, document boundaries and the split against a plain loop, worker
counts giving the same bytes, and every bad input refused with the file and the fix."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsys.config import ConfigError
from jaxsys.data import dataset as ds
from jaxsys.data.bpe import train_bpe
from jaxsys.data.corpus import shakespeare_text
from jaxsys.data.documents import expand_inputs
from jaxsys.data.prepare import is_val, prepare
from jaxsys.data.tokenizers import ByteTokenizer

TEXT = shakespeare_text()[:60_000]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    return train_bpe([path], 300)


def _expected(docs: list[str], tok, val_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(tokens, offsets) per split, computed plainly: each document's ids (+ eos), in order."""
    out = {"train": ([], [0]), "val": ([], [0])}
    for i, doc in enumerate(docs):
        ids = list(tok.encode(doc)) + ([tok.eos_id] if tok.eos_id is not None else [])
        tokens, offsets = out["val" if is_val(i, val_fraction) else "train"]
        tokens += ids
        offsets.append(offsets[-1] + len(ids))
    return {s: (np.array(t, np.int64), np.array(o, np.int64)) for s, (t, o) in out.items()}


def _check(out, docs, tok, val_fraction):
    data = ds.load_prepared(out)
    for split, (tokens, offsets) in _expected(docs, tok, val_fraction).items():
        got = getattr(data, split)
        np.testing.assert_array_equal(np.asarray(got.tokens, np.int64), tokens)
        np.testing.assert_array_equal(got.doc_offsets, offsets)
        assert data.meta["splits"][split] == {"tokens": len(tokens), "documents": len(offsets) - 1}
    return data


def test_text_files_split_into_documents(tmp_path, bpe):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:30_000], encoding="utf-8")
    b.write_text(TEXT[30_000:], encoding="utf-8")
    docs = [d for t in (TEXT[:30_000], TEXT[30_000:]) for d in t.split("\n\n") if d]
    meta = prepare([a, b], bpe, tmp_path / "out", doc_sep="\n\n", val_fraction=0.1, progress=False)
    data = _check(tmp_path / "out", docs, bpe, 0.1)
    assert data.meta["dtype"] == "uint16" and data.train.tokens.dtype == np.uint16
    assert meta["splits"]["val"]["documents"] == sum(is_val(i, 0.1) for i in range(len(docs))) > 0
    assert [s["documents"] for s in meta["sources"]] == [len([d for d in t.split("\n\n") if d])
                                                         for t in (TEXT[:30_000], TEXT[30_000:])]
    assert meta["text_bytes"] == sum(len(d.encode()) for d in docs)
    # Without --doc-sep each file is one document: 2 documents, the second (index 1) to val at 0.5.
    prepare([a, b], ByteTokenizer(), tmp_path / "whole", val_fraction=0.5, progress=False)
    _check(tmp_path / "whole", [TEXT[:30_000], TEXT[30_000:]], ByteTokenizer(), 0.5)


def test_jsonl_and_parquet_fields(tmp_path, bpe):
    docs = [d for d in TEXT.split("\n\n") if d][:120]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" + ("\n" if i % 7 == 0 else "")
                             for i, d in enumerate(docs[:60])), encoding="utf-8")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": docs[60:], "n": list(range(60))}), parquet, row_group_size=16)
    prepare([jsonl, parquet], bpe, tmp_path / "out", field="body", val_fraction=0.25, progress=False)
    _check(tmp_path / "out", docs, bpe, 0.25)


def test_one_and_two_workers_write_the_same_bytes(tmp_path, bpe, monkeypatch):
    import jaxsys.data.prepare as prep
    monkeypatch.setattr(prep, "CHUNK_BYTES", 4096)  # many chunks, so the order across workers matters
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    for workers in (1, 2):
        prepare([path], bpe, tmp_path / f"w{workers}", doc_sep="\n", workers=workers, progress=False)
    names = sorted(p.name for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert names == sorted(p.name for p in (tmp_path / "w2").rglob("*") if p.is_file())
    assert "train.bin" in names and "dataset.json" in names and "tokenizer.json" in names
    for name in names:
        one, two = next((tmp_path / "w1").rglob(name)), next((tmp_path / "w2").rglob(name))
        assert one.read_bytes() == two.read_bytes(), name


def test_val_split_is_every_nth_document():
    assert [i for i in range(12) if is_val(i, 0.25)] == [3, 7, 11]
    assert not any(is_val(i, 0.0) for i in range(100))


class _BigVocab(ByteTokenizer):
    vocab_size = 70_000


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, bpe):
    good = tmp_path / "good.txt"
    good.write_text(TEXT[:2000], encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    cases = {
        "empty.txt": r"empty\.txt is empty \(0 bytes\); remove it from the inputs",
        "latin1.txt": r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3\); convert it to UTF-8",
        "dir": r"dir is a directory; give the files inside it, e\.g\. '.*dir/\*\.txt'",
        "missing*.txt": r"'.*missing\*\.txt' matches no file; check the pattern",
        "bad.jsonl": r"bad\.jsonl:2: not JSON \(.*\); fix or remove the line",
        "nofield.jsonl": r"nofield\.jsonl:2: no field 'text' \(has: body\); choose the text field with --field",
        "nocol.parquet": r"nocol\.parquet: no column 'text' \(has: body\); choose the text column with --field",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            prepare(expand_inputs([str(tmp_path / name)]), bpe, tmp_path / f"out-{name[:3]}", progress=False)
        assert not (tmp_path / f"out-{name[:3]}").exists()  # nothing half-written left behind
    with pytest.raises(ConfigError, match="70,000 tokens, more than uint16 holds .*; use --dtype uint32"):
        prepare([good], _BigVocab(), tmp_path / "big", dtype="uint16", progress=False)
    with pytest.raises(ConfigError, match=r"the val split got none of the 1 document\(s\) .*--doc-sep"):
        prepare([good], ByteTokenizer(), tmp_path / "one-doc", progress=False)
    prepare([good], ByteTokenizer(), tmp_path / "used", doc_sep="\n", progress=False)
    with pytest.raises(ConfigError, match="is not empty; give a new directory"):
        prepare([good], ByteTokenizer(), tmp_path / "used", progress=False)


def test_a_damaged_dataset_is_refused_on_load(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(TEXT[:5000], encoding="utf-8")
    prepare([good], ByteTokenizer(), tmp_path / "out", doc_sep="\n", progress=False)
    with open(tmp_path / "out/train.bin", "ab") as f:
        f.write(b"\0")  # odd size: not whole uint16 tokens
    with pytest.raises(ConfigError, match=r"train\.bin has [\d,]+ bytes, but .*dataset\.json says .* run `jaxsys data prepare` again"):
        ds.load_prepared(tmp_path / "out")
    meta = json.loads((tmp_path / "out/dataset.json").read_text())
    meta["tokenizer"] = {"kind": "char", "chars": "ab"}
    (tmp_path / "out/dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="another tokenizer than the one .*dataset.json was prepared with"):
        ds.load_prepared(tmp_path / "out")
