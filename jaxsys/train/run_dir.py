"""The run directory: what may be written there, and what a resume must agree with.

A run directory holds `config.json`, `tokenizer.json`, `metrics.jsonl`, `tensorboard/`,
`checkpoints/` and, after damage or rollbacks, `rejected_checkpoints/` and `rollbacks.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxsys import config as config_lib
from jaxsys.config import Config, ConfigError


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Fail early on an unwritable run dir or a resume with a different model."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: they share run_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({e.strerror}); choose another run_dir.") from None
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoints = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_checkpoints and not cfg.checkpoint.resume:
        # Orbax would silently skip saves at steps it already has; never overwrite or mix runs.
        raise ConfigError(
            f"run_dir={str(run_dir)!r} already holds checkpoints and checkpoint.resume=false. Use a "
            f"new run_dir, or delete {ckpt_dir} yourself to start over."
        )
    saved = run_dir / "config.json"
    if has_checkpoints and saved.exists():
        old, new = json.loads(saved.read_text()), config_lib.to_dict(cfg)
        keys = [("model", k) for k in ("family", "vocab_size", "seq_len", "num_layers", "embed_dim",
                                       "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                                       "scan_layers", "param_dtype")]
        keys += [("data", "source"), ("data", "tokenizer")]
        for section, key in keys:
            before = old.get(section, {}).get(key, new[section][key])
            if before != new[section][key]:
                raise ConfigError(
                    f"run_dir={str(run_dir)!r} holds checkpoints of a run with {section}.{key}={before!r}, "
                    f"but this run has {section}.{key}={new[section][key]!r}. Use a new run_dir."
                )
