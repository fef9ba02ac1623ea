"""The run directory: what may be written there, and what a resume must agree with.

A run directory holds `config.json`, `tokenizer.json`, `metrics.jsonl`, `tensorboard/`,
`checkpoints/`, `config_changes.jsonl` (the settings changed at each resume) and, after damage
or rollbacks, `rejected_checkpoints/` and `rollbacks.json`.

The order matters: a resume is first checked (`check_run_dir`, then the checkpoint's own
metadata in `checkpoint.manager.check_compatible`) and only then `accept`ed, which writes the
files that describe the checkpoints. A refused resume writes nothing, so the run directory
never starts describing a run that did not happen. Files are replaced atomically (tmp + rename).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxsys import config as config_lib
from jaxsys.checkpoint.run_files import CONFIG, TOKENIZER, read_json, write_atomic
from jaxsys.config import Config, ConfigError
from jaxsys.data.tokenizers import Tokenizer, save_tokenizer

CHANGES = "config_changes.jsonl"

# Keys that change what a saved checkpoint means: its parameters' shapes and layout, or the
# tokens it was trained to predict. Changing one on resume is refused unless it is listed in
# `checkpoint.allow_changes` (the shape keys are then still checked against the checkpoint).
MEANING_KEYS = tuple(f"model.{k}" for k in ("family", "vocab_size", "seq_len", "num_layers", "embed_dim",
                                            "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                                            "scan_layers", "param_dtype", "attention_kind", "q_lora_rank",
                                            "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")
                     ) + ("data.source", "data.tokenizer", "data.sources")
# Not a setting of the run: a copied or moved run directory resumes without a word.
IGNORED_KEYS = ("run_dir",)


@dataclass(frozen=True)
class Change:
    """One setting that differs from the run's saved config.json."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return (",".join(map(str, value)) or "()") if isinstance(value, list) else str(value)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def has_checkpoints(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def check_run_dir(run_dir: Path, cfg: Config, tokenizer_json: dict | None = None) -> list[Change]:
    """Fail early on an unwritable run dir or a resume that changes what the checkpoints mean;
    return the other settings that differ from the saved config.json (to report and record).

    Reads only; `accept` writes once the checkpoint itself has agreed (`check_compatible`)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: they share run_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({e.strerror}); choose another run_dir.") from None
    if not has_checkpoints(run_dir):
        return []  # a new run (or one that never saved): nothing to agree with
    if not cfg.checkpoint.resume:
        # Orbax would silently skip saves at steps it already has; never overwrite or mix runs.
        raise ConfigError(
            f"run_dir={str(run_dir)!r} already holds checkpoints and checkpoint.resume=false. Use a "
            f"new run_dir, or delete {run_dir / 'checkpoints'} yourself to start over."
        )
    new = _flat(json.loads(config_lib.to_json(cfg)))  # tuples as lists, as in the file
    saved = run_dir / CONFIG
    old = _flat(read_json(saved)) if saved.exists() else {}  # missing: the checkpoint metadata decides
    allowed = set(cfg.checkpoint.allow_changes)
    changes = [Change(k, old[k], v) for k, v in new.items()
               if k in old and old[k] != v and k not in IGNORED_KEYS]
    for c in changes:
        if c.key in MEANING_KEYS and c.key not in allowed:
            data = (f", or set checkpoint.allow_changes={c.key} to continue these checkpoints on it"
                    if c.key.startswith("data.") else "")
            raise ConfigError(
                f"run_dir={str(run_dir)!r} holds checkpoints of a run with {c.key}={c.old!r}, "
                f"but this run has {c.key}={c.new!r}. Use a new run_dir{data}."
            )
    tok = run_dir / TOKENIZER
    saved_tok = read_json(tok) if tokenizer_json is not None and tok.exists() else tokenizer_json
    # Before plain ids existed, a .bin run without a tokenizer saved "byte": the same ids.
    same = saved_tok == tokenizer_json or (saved_tok == {"kind": "byte"} and tokenizer_json == {"kind": "ids"})
    # Other data may come with another byte/char tokenizer (allow_changes=data.source); a Hugging
    # Face tokenizer's ids mean nothing under another, so only data.tokenizer waives that check.
    hf = "hf" in ((saved_tok or {}).get("kind"), (tokenizer_json or {}).get("kind"))
    waived = "data.tokenizer" in allowed or (not hf and allowed & {"data.source", "data.sources"})
    if not same and not waived:
        source = ",".join(cfg.data.sources) or cfg.data.source
        prepared = Path(cfg.data.sources[0] if cfg.data.sources else cfg.data.source) / "dataset.json"
        fix = (f"prepare the data again with `jaxsys data prepare ... --tokenizer {run_dir}`"
               if prepared.is_file() else "use the run's data")
        raise ConfigError(
            f"run_dir={str(run_dir)!r} holds checkpoints trained with the tokenizer in {tok} "
            f"({_kind(saved_tok)}), but data.source={source!r} gives another one ({_kind(tokenizer_json)}). "
            f"Use a new run_dir, {fix}, or set checkpoint.allow_changes={'data.tokenizer' if hf else 'data.source'} "
            "if you mean it."
        )
    return changes


def _kind(tokenizer_json: dict | None) -> str:
    data = tokenizer_json or {}
    return f"hf sha256 {data.get('sha256', '')[:12]}…" if data.get("kind") == "hf" else str(data.get("kind"))


def describe(changes: list[Change]) -> str:
    """``optimizer.lr 0.001 -> 0.5, train.steps 4 -> 8``."""
    return ", ".join(map(str, changes))


def accept(run_dir: Path, cfg: Config, tokenizer: Tokenizer, changes: list[Change], step: int) -> None:
    """The resume (or new run) is accepted: write config.json and the tokenizer (tokenizer.json,
    and tokenizer/ for a Hugging Face one: `save_tokenizer`; atomically) and append the changed
    settings to config_changes.jsonl. Call on one process only."""
    if changes:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
               "changes": {c.key: [c.old, c.new] for c in changes}}
        with open(run_dir / CHANGES, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    write_atomic(run_dir / CONFIG, config_lib.to_json(cfg))
    save_tokenizer(tokenizer, run_dir)
