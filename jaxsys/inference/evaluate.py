"""`jaxsys eval`: a trained run's loss (nats per token), perplexity and bits per byte.

- **The run's validation split**: exactly the batches training evaluates on (batch i of the
  ``"val"`` stream at `train.seed`, `train.batch_size` windows of `model.seq_len` tokens,
  `jaxsys.data.batches.global_batch`), and the loss is their mean per batch, as in
  `jaxsys.train.loop.evaluate`: with the default `train.eval_batches` batches it is the val
  loss training reported at that checkpoint's step.
- **Another text file**, tokenized with the run's tokenizer: all of it. Every token after the
  first is predicted once: the tokens are cut into consecutive, non-overlapping windows of
  `model.seq_len` predictions (a token sees the earlier tokens of its own window only), grouped
  `train.batch_size` windows to a batch; the last window is padded and the padding masked. The
  loss is the mean over all predicted tokens.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens: a byte token is one
byte (so bits per byte = nats per token / ln 2), a character token the bytes of its character.
Runs whose tokens are plain ids have no byte count, and no bits per byte.

Runs on one device (the parameters and model state, e.g. the MoE bias, as `load_run`
restores them). Shapes: B batch, T sequence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxsys.config import ConfigError
from jaxsys.data import batches as batches_lib
from jaxsys.data.corpus import load_corpus
from jaxsys.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from jaxsys.inference.load import LoadedRun, load_run
from jaxsys.model import loss as loss_lib


@dataclass
class EvalResult:
    run_dir: str
    step: int  # the evaluated checkpoint's step
    data: str  # "val" (the run's validation split) or the text file's path
    batches: int
    tokens: int  # predicted tokens
    bytes: int | None  # UTF-8 bytes of the predicted tokens (None: unknown for plain ids)
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float | None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def token_bytes(tokenizer: Tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token id: 1 for byte tokens, the character's for character tokens,
    a byte-level BPE's token lengths (`HFTokenizer.token_bytes`), None when tokens are plain
    ids (no text behind them) or another Hugging Face tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.ones(256, np.int64)
    if isinstance(tokenizer, CharTokenizer):
        return np.array([len(c.encode("utf-8")) for c in tokenizer.chars], np.int64)
    if isinstance(tokenizer, HFTokenizer):  # byte-level BPE: exact; other HF tokenizers: None
        return tokenizer.token_bytes()
    return None


def _count_bytes(table: np.ndarray | None, targets: np.ndarray, mask: np.ndarray | None = None) -> int | None:
    if table is None or int(targets.max(initial=0)) >= len(table):
        return None
    counts = table[targets]
    return int(counts.sum() if mask is None else counts[mask].sum())


def _result(run_dir: Path, run: LoadedRun, data: str, batches: int, tokens: int, nbytes: int | None,
            total_nats: float, loss: float) -> EvalResult:
    bpb = total_nats / math.log(2) / nbytes if nbytes else None
    return EvalResult(str(run_dir), run.step, data, batches, tokens, nbytes, loss,
                      math.exp(loss) if loss < 700 else math.inf, bpb)


def _on_val_split(run_dir: Path, run: LoadedRun, num_batches: int | None) -> EvalResult:
    cfg = run.cfg
    corpus = load_corpus(cfg.data)
    if corpus.tokenizer.to_json() != run.tokenizer.to_json():
        raise ConfigError(f"{run_dir}: data.source={cfg.data.source!r} no longer gives the tokenizer the run "
                          "was trained with (the file changed?); evaluate on a file with --data instead.")
    n = num_batches or cfg.train.eval_batches
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loss_fn = jax.jit(lambda p, b, state: loss_lib.loss(run.model, p, b, None, state))
    table = token_bytes(run.tokenizer)
    losses, nbytes = [], 0
    for i in range(n):
        batch = batches_lib.global_batch(corpus.val, cfg.train.seed, i, "val", cfg.train.batch_size,
                                         cfg.model.seq_len, one)
        losses.append(float(loss_fn(run.params, batch, run.model_state)))  # one at a time, like training's eval
        counted = _count_bytes(table, np.asarray(batch["targets"]))
        nbytes = None if counted is None or nbytes is None else nbytes + counted
    loss = sum(losses) / n  # the same sum, in the same order, as jaxsys.train.loop.evaluate
    tokens = n * cfg.train.batch_size * cfg.model.seq_len
    total_nats = sum(losses) * cfg.train.batch_size * cfg.model.seq_len
    return _result(run_dir, run, "val", n, tokens, nbytes, total_nats, loss)


def windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask), each [N, B, T]: `tokens` as consecutive windows of T predictions,
    B windows per batch; padding (the end of the last window, whole windows of the last batch)
    has mask False."""
    predicted = len(tokens) - 1
    num_windows = -(-predicted // seq_len)
    num_batches = -(-num_windows // batch_size)
    padded = np.zeros(num_batches * batch_size * seq_len + 1, np.int32)
    padded[:len(tokens)] = tokens
    shape = (num_batches, batch_size, seq_len)
    mask = (np.arange(padded.size - 1) < predicted).reshape(shape)
    return padded[:-1].reshape(shape), padded[1:].reshape(shape), mask


def _on_file(run_dir: Path, run: LoadedRun, path: Path, num_batches: int | None) -> EvalResult:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--data {path} is not UTF-8 text.") from None
    try:
        tokens = run.tokenizer.encode(text)
    except ValueError as e:
        raise ConfigError(f"--data {path}: the run's tokenizer cannot encode it: {e}.") from None
    if len(tokens) < 2:
        raise ConfigError(f"--data {path} has {len(tokens)} tokens; at least 2 are needed to predict one.")
    if int(tokens.max()) >= run.cfg.model.vocab_size:
        raise ConfigError(f"--data {path} holds token id {int(tokens.max())}, outside the model's "
                          f"vocabulary of {run.cfg.model.vocab_size}.")
    inputs_NBT, targets_NBT, mask_NBT = windows(tokens, run.cfg.model.seq_len, run.cfg.train.batch_size)
    n = min(num_batches or len(inputs_NBT), len(inputs_NBT))

    @jax.jit
    def nats(params, model_state, inputs_BT, targets_BT, mask_BT):
        losses_BT = loss_lib.token_losses(run.model, params, inputs_BT, targets_BT, model_state=model_state)
        return (losses_BT * mask_BT).sum()

    total_nats = sum(float(nats(run.params, run.model_state, inputs_NBT[i], targets_NBT[i], mask_NBT[i]))
                     for i in range(n))
    tokens_done = int(mask_NBT[:n].sum())
    nbytes = _count_bytes(token_bytes(run.tokenizer), targets_NBT[:n], mask_NBT[:n])
    return _result(run_dir, run, str(path), n, tokens_done, nbytes, total_nats, total_nats / tokens_done)


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 num_batches: int | None = None) -> EvalResult:
    """Evaluate the newest checkpoint of `run_dir` on its validation split (`data` None) or on
    the text file `data`; `num_batches` limits the batches (default: `train.eval_batches` on the
    split, the whole file otherwise)."""
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"--batches must be ≥ 1, got {num_batches}.")
    run_dir = Path(run_dir)
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: no such file.")
    run = load_run(run_dir)
    if data is None:
        return _on_val_split(run_dir, run, num_batches)
    return _on_file(run_dir, run, Path(data), num_batches)


def format_result(r: EvalResult) -> str:
    """A small table of `r`."""
    where = "the val split" if r.data == "val" else r.data
    rows = [("tokens", f"{r.tokens:,}"),
            ("bytes", f"{r.bytes:,}" if r.bytes is not None else "unknown (token ids)"),
            ("loss", f"{r.loss:.4f} nats/token"),
            ("perplexity", f"{r.perplexity:.3f}"),
            ("bits per byte", f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "—")]
    head = f"{r.run_dir} at step {r.step}, on {where} ({r.batches} batches)"
    return "\n".join([head] + [f"  {k:<14} {v}" for k, v in rows])
