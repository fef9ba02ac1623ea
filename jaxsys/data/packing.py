"""Windows of a document-aware token stream, and the sources a batch row is drawn from.

A batch row is, as for a plain text, a window of T+1 consecutive tokens of the concatenated
documents (inputs = window[:-1], targets = window[1:]) at a random offset: no padding, so a row
may hold the end of one document, whole ones, and the start of another. What the row knows of
its documents, as int32 [B, T] arrays (B rows, T = model.seq_len; `segments_BT`):

- ``segment_ids``: 0 for the document the row starts in, +1 at each document start;
- ``positions``: each input token's position in its document, from 0 at the document's start
  (or at the row's start, for the document the window cuts);
- ``loss_mask``: 1 where the target is the next token of the same document; 0 where the input
  is a document's last token (its target starts the next document: not a prediction to learn).

A `Mixture` is several prepared datasets' splits with weights; which one a row comes from is
a pure function of (seed, step, split) (`batches.mixture_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEGMENT_KEYS = ("segment_ids", "positions", "loss_mask")


@dataclass(frozen=True)
class Stream:
    """One split of one dataset: `tokens` (1-D, memory-mapped) and its `doc_offsets` (int64
    [documents + 1]); `name` for messages."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    name: str = ""
    max_id: int = -1  # the largest token id, when known (prepare records it); -1: read the tokens


@dataclass(frozen=True)
class Mixture:
    """Streams drawn from with probabilities `weights` (summing to 1); `segments`: whether the
    batches carry `SEGMENT_KEYS`."""

    streams: tuple[Stream, ...]
    weights: tuple[float, ...]
    segments: bool = True

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.streams)

    def max_token(self) -> int:
        """The largest token id of any stream."""
        return max(s.max_id if s.max_id >= 0 else int(s.tokens.max(initial=0)) for s in self.streams)


def segments_BT(doc_offsets: np.ndarray, starts_B: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """`SEGMENT_KEYS` of the rows whose windows start at token offsets `starts_B` (see the
    module docstring), each int32 [B, seq_len]."""
    p_BT = starts_B[:, None].astype(np.int64) + np.arange(seq_len)[None, :]  # input token offsets
    doc_BT = np.searchsorted(doc_offsets, p_BT, side="right") - 1
    doc_next_BT = np.searchsorted(doc_offsets, p_BT + 1, side="right") - 1  # the target's document
    row_start_BT = np.maximum(doc_offsets[doc_BT], starts_B[:, None])
    return {"segment_ids": (doc_BT - doc_BT[:, :1]).astype(np.int32),
            "positions": (p_BT - row_start_BT).astype(np.int32),
            "loss_mask": (doc_next_BT == doc_BT).astype(np.int32)}
