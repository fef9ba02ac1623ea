"""Deterministic batches: the batch of step k is a pure function of (seed, k, split).

Resuming at step k replays the same batches, whatever happened before. Each process reads only
the rows of the global batch that its own devices hold (`jax.make_array_from_callback`), so the
same code runs on one host or many. `split_microbatches` is the one strided split of a batch
into microbatches (gradient accumulation and pipeline microbatches alike).
"""

from __future__ import annotations

import jax
import numpy as np


def batch_offsets(seed: int, step: int, split: str, global_batch: int, num_tokens: int,
                  seq_len: int) -> np.ndarray:
    """Start offsets of the `global_batch` windows for `step`: a pure function of its inputs."""
    stream = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=global_batch)


def local_batch(tokens: np.ndarray, seed: int, step: int, split: str, global_batch: int,
                seq_len: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch: ``inputs`` and ``targets``, int32 [b, seq_len]
    (the corpus is long enough: `corpus.check_corpus`)."""
    offsets = batch_offsets(seed, step, split, global_batch, len(tokens), seq_len)
    per_process = global_batch // process_count
    mine = offsets[process_index * per_process:(process_index + 1) * per_process]
    windows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int32) for o in mine])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def global_batch(tokens: np.ndarray, seed: int, step: int, split: str, batch_size: int,
                 seq_len: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """The global batch for `step` as sharded `jax.Array`s.

    Each process reads only the rows its own devices hold (whatever the mesh: replicas over
    `tensor` get the same rows), so on many hosts no host loads the whole batch."""
    shape = (batch_size, seq_len)
    offsets = batch_offsets(seed, step, split, batch_size, len(tokens), seq_len)
    rows: dict[tuple[int, int], np.ndarray] = {}  # one window read per row range, not per device

    def windows(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(batch_size)
        if (start, stop) not in rows:
            rows[(start, stop)] = np.stack(
                [np.asarray(tokens[o:o + seq_len + 1], dtype=np.int32) for o in offsets[start:stop]])
        return rows[(start, stop)]

    return {
        "inputs": jax.make_array_from_callback(shape, sharding, lambda i: windows(i)[:, :-1][:, i[1]]),
        "targets": jax.make_array_from_callback(shape, sharding, lambda i: windows(i)[:, 1:][:, i[1]]),
    }


def split_microbatches(x_BT: jax.Array, m: int) -> jax.Array:
    """[B, T] -> [m, B/m, T], microbatch i = rows i, i + m, ...: strided, so each microbatch
    keeps an equal share of every device's rows (its data sharding)."""
    return x_BT.reshape(x_BT.shape[0] // m, m, *x_BT.shape[1:]).swapaxes(0, 1)
