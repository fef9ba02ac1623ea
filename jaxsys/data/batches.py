"""Deterministic batches: the batch of step k is a pure function of (seed, k, split).

Resuming at step k replays the same batches, whatever happened before. Each process reads only
the rows of the global batch that its own devices hold (`jax.make_array_from_callback`), so the
same code runs on one host or many. `split_microbatches` is the one strided split of a batch
into microbatches (gradient accumulation and pipeline microbatches alike).

The data is a token array (a text or ``.bin``: batches hold ``inputs`` and ``targets``) or a
`packing.Mixture` of prepared datasets, whose rows also carry ``segment_ids``, ``positions``
and ``loss_mask`` (`packing.segments_BT`) unless `Mixture.segments` is off. Every key is int32
[B, T] with the same sharding.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxsys.data.packing import SEGMENT_KEYS, Mixture, segments_BT

Data = np.ndarray | Mixture


def batch_offsets(seed: int, step: int, split: str, global_batch: int, num_tokens: int,
                  seq_len: int) -> np.ndarray:
    """Start offsets of the `global_batch` windows for `step`: a pure function of its inputs."""
    stream = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=global_batch)


def mixture_rows(mix: Mixture, seed: int, step: int, split: str, global_batch: int,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream index, start offset in that stream) of each row of `step`: a pure function of its
    inputs. Each row's stream is drawn independently with probabilities `mix.weights`; with one
    stream the offsets are `batch_offsets` (a prepared dataset batches like a ``.bin`` of it)."""
    if len(mix.streams) == 1:
        offsets = batch_offsets(seed, step, split, global_batch, len(mix.streams[0].tokens), seq_len)
        return np.zeros(global_batch, np.int64), offsets
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], step])
    which_B = rng.choice(len(mix.streams), size=global_batch, p=np.asarray(mix.weights))
    highs = np.array([len(s.tokens) - seq_len - 1 for s in mix.streams])
    return which_B, rng.integers(0, highs[which_B])


def batch_keys(data: Data) -> tuple[str, ...]:
    """The keys of `data`'s batches, in order."""
    extra = SEGMENT_KEYS if isinstance(data, Mixture) and data.segments else ()
    return ("inputs", "targets", *extra)


def _rows_reader(data: Data, seed: int, step: int, split: str, global_batch: int, seq_len: int):
    """rows(start, stop) -> {key: int32 [stop - start, T]} for rows start..stop of `step`."""
    if isinstance(data, Mixture):
        which_B, offsets_B = mixture_rows(data, seed, step, split, global_batch, seq_len)
    else:
        offsets_B = batch_offsets(seed, step, split, global_batch, len(data), seq_len)

    def rows(start: int, stop: int) -> dict[str, np.ndarray]:
        if not isinstance(data, Mixture):
            w_bT = np.stack([np.asarray(data[o:o + seq_len + 1], np.int32) for o in offsets_B[start:stop]])
            return {"inputs": w_bT[:, :-1], "targets": w_bT[:, 1:]}
        out: dict[str, list[np.ndarray]] = {}
        for s, o in zip(which_B[start:stop], offsets_B[start:stop]):
            stream = data.streams[s]
            w_T = np.asarray(stream.tokens[o:o + seq_len + 1], np.int32)
            row = {"inputs": w_T[None, :-1], "targets": w_T[None, 1:]}
            if data.segments:
                row.update(segments_BT(stream.doc_offsets, np.array([o]), seq_len))
            for k, v in row.items():
                out.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in out.items()}

    return rows


def local_batch(tokens: Data, seed: int, step: int, split: str, global_batch: int,
                seq_len: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch: `batch_keys` (``inputs``, ``targets``, ...),
    int32 [b, seq_len] (the corpus is long enough: `corpus.check_corpus`)."""
    per_process = global_batch // process_count
    rows = _rows_reader(tokens, seed, step, split, global_batch, seq_len)
    return rows(process_index * per_process, (process_index + 1) * per_process)


def global_batch(tokens: Data, seed: int, step: int, split: str, batch_size: int,
                 seq_len: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """The global batch for `step` as sharded `jax.Array`s (`batch_keys`, each int32 [B, T]).

    Each process reads only the rows its own devices hold (whatever the mesh: replicas over
    `tensor` get the same rows), so on many hosts no host loads the whole batch."""
    shape = (batch_size, seq_len)
    read = _rows_reader(tokens, seed, step, split, batch_size, seq_len)
    cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # one read per row range, not per device

    def rows(index: tuple[slice, ...]) -> dict[str, np.ndarray]:
        start, stop, _ = index[0].indices(batch_size)
        if (start, stop) not in cache:
            cache[(start, stop)] = read(start, stop)
        return cache[(start, stop)]

    return {key: jax.make_array_from_callback(shape, sharding, lambda i, key=key: rows(i)[key][:, i[1]])
            for key in batch_keys(tokens)}


def split_microbatches(x_BT: jax.Array, m: int) -> jax.Array:
    """[B, T] -> [m, B/m, T], microbatch i = rows i, i + m, ...: strided, so each microbatch
    keeps an equal share of every device's rows (its data sharding)."""
    return x_BT.reshape(x_BT.shape[0] // m, m, *x_BT.shape[1:]).swapaxes(0, 1)
