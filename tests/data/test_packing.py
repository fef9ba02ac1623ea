"""Batches of prepared datasets: a pure function of (seed, step, split), weights honoured, and the
segment keys equal to a plain loop over the document boundaries."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxsys.config import ConfigError, DataConfig, apply_overrides, validate
from jaxsys.config.presets import tiny
from jaxsys.data import batches
from jaxsys.data.corpus import check_corpus, load_corpus, shakespeare_text
from jaxsys.data.packing import SEGMENT_KEYS, Mixture, Stream, segments_BT
from jaxsys.data.prepare import prepare
from jaxsys.data.tokenizers import ByteTokenizer, CharTokenizer

T = 16


def _reference(doc_offsets: np.ndarray, start: int, seq_len: int) -> dict[str, list[int]]:
    """segment_ids, positions, loss_mask of one row, token by token."""
    def doc_of(p: int) -> int:
        d = 0
        while doc_offsets[d + 1] <= p:
            d += 1
        return d
    seg, pos, mask = [], [], []
    for p in range(start, start + seq_len):
        d = doc_of(p)
        seg.append(d - doc_of(start))
        pos.append(p - max(int(doc_offsets[d]), start))
        mask.append(int(doc_of(p + 1) == d))
    return {"segment_ids": seg, "positions": pos, "loss_mask": mask}


def test_segments_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts = rng.integers(0, offsets[-1] - T - 1, size=64)
    got = segments_BT(offsets, starts, T)
    for b, start in enumerate(starts):
        for key, row in _reference(offsets, int(start), T).items():
            assert list(got[key][b]) == row, (key, start)
    assert got["loss_mask"].min() == 0 and got["segment_ids"].max() > 1  # the rows do cross documents


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    text = shakespeare_text()
    (root / "a.txt").write_text(text[:40_000], encoding="utf-8")
    (root / "b.txt").write_text(text[40_000:60_000], encoding="utf-8")
    prepare([root / "a.txt"], ByteTokenizer(), root / "A", doc_sep="\n\n", progress=False)
    prepare([root / "b.txt"], ByteTokenizer(), root / "B", doc_sep="\n\n", progress=False)
    prepare([root / "b.txt"], CharTokenizer.from_text(text), root / "C", doc_sep="\n\n", progress=False)
    return root


def test_batches_of_a_prepared_dir_are_a_pure_function_of_seed_and_step(dirs):
    corpus = load_corpus(DataConfig(source=str(dirs / "A")))
    train = corpus.train
    assert isinstance(train, Mixture) and batches.batch_keys(train) == ("inputs", "targets", *SEGMENT_KEYS)
    tokens, offsets = train.streams[0].tokens, train.streams[0].doc_offsets
    first = batches.local_batch(train, 0, 5, "train", 8, T)
    for step in range(5):  # what came before does not matter: resuming at step 5 sees the same batch
        batches.local_batch(train, 0, step, "train", 8, T)
    again = batches.local_batch(load_corpus(DataConfig(source=str(dirs / "A"))).train, 0, 5, "train", 8, T)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["inputs"], batches.local_batch(train, 0, 6, "train", 8, T)["inputs"])
    assert not np.array_equal(first["inputs"], batches.local_batch(train, 1, 5, "train", 8, T)["inputs"])
    # One source batches like a .bin of its tokens: the same offsets, plus the document keys.
    for b, o in enumerate(batches.batch_offsets(0, 5, "train", 8, len(tokens), T)):
        assert list(first["inputs"][b]) == list(tokens[o:o + T]) and list(first["targets"][b]) == list(tokens[o + 1:o + T + 1])
        for key, row in _reference(offsets, int(o), T).items():
            assert list(first[key][b]) == row
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = batches.global_batch(train, 0, 5, "train", 8, T, one)
    assert set(on_device) == set(first) and all(np.array_equal(np.asarray(on_device[k]), first[k]) for k in first)
    no_segments = load_corpus(DataConfig(source=str(dirs / "A"), segments=False)).train
    assert set(batches.local_batch(no_segments, 0, 5, "train", 8, T)) == {"inputs", "targets"}
    assert set(batches.local_batch(load_corpus(DataConfig()).train, 0, 5, "train", 8, T)) == {"inputs", "targets"}


def test_global_batch_shards_every_key_like_the_inputs(dirs):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "context"))
    train = load_corpus(DataConfig(source=str(dirs / "A"))).train
    sharded = batches.global_batch(train, 3, 2, "train", 8, T, NamedSharding(mesh, P("data", "context")))
    host = batches.local_batch(train, 3, 2, "train", 8, T)
    for key in host:
        assert sharded[key].sharding == sharded["inputs"].sharding
        np.testing.assert_array_equal(np.asarray(sharded[key]), host[key])


def test_weights_are_honoured_and_rows_come_from_the_drawn_source():
    a = Stream(np.arange(0, 1000) % 100, np.array([0, 500, 1000]), "a")
    b = Stream(100 + np.arange(0, 1000) % 100, np.array([0, 1000]), "b")
    mix = Mixture((a, b), (0.7, 0.3))
    steps, rows = 400, 8
    counts = np.zeros(2)
    for step in range(steps):
        which, _ = batches.mixture_rows(mix, 0, step, "train", rows, T)
        counts += np.bincount(which, minlength=2)
        got = batches.local_batch(mix, 0, step, "train", rows, T)
        assert ((got["inputs"] >= 100).all(axis=1) == (which == 1)).all()  # each row from its source
    # 3,200 independent draws: the share of source a is 0.7 ± 0.03 (3.7 standard deviations).
    assert abs(counts[0] / counts.sum() - 0.7) < 0.03
    w1, o1 = batches.mixture_rows(mix, 0, 17, "val", rows, T)
    w2, o2 = batches.mixture_rows(mix, 0, 17, "val", rows, T)
    assert np.array_equal(w1, w2) and np.array_equal(o1, o2)


def test_several_dirs_with_weights_and_their_checks(dirs):
    cfg = apply_overrides(tiny(), [f"data.sources={dirs / 'A'},{dirs / 'B'}", "data.weights=3,1"])
    validate(cfg)
    corpus = load_corpus(cfg.data)
    assert corpus.train.weights == (0.75, 0.25) and len(corpus.val.streams) == 2
    check_corpus(cfg, corpus)
    with pytest.raises(ConfigError, match="was prepared with another tokenizer .*; prepare it again with --tokenizer"):
        load_corpus(dataclasses.replace(cfg.data, sources=(str(dirs / "A"), str(dirs / "C")), weights=()))
    with pytest.raises(ConfigError, match="is not a prepared dataset .*jaxsys data prepare"):
        load_corpus(dataclasses.replace(cfg.data, sources=(str(dirs / "A"), str(dirs))))
    for overrides, message in ((["data.weights=1"], "1 values for 2 data.sources"),
                               (["data.weights=1,0"], "must be finite and > 0"),
                               (["data.source=x.txt"], "are both set")):
        with pytest.raises(ConfigError, match=message):
            validate(apply_overrides(cfg, overrides))
    with pytest.raises(ConfigError, match=r"\(val\) has \d+ tokens, fewer than model.seq_len\+2"):
        check_corpus(apply_overrides(cfg, ["model.seq_len=4096"]), corpus)
