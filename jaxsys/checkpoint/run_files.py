"""The JSON files beside a run's checkpoints: `config.json` and `tokenizer.json`.

Read by training (to compare a resume with the run) and by inference (to rebuild the model),
so they live below both: a broken file is a one-line `ConfigError` naming it, and every write
is atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxsys import config as config_lib
from jaxsys.config import Config, ConfigError

CONFIG, TOKENIZER = "config.json", "tokenizer.json"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or
    the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in `path`; a broken file is a one-line `ConfigError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); restore it, or delete "
                          f"it (training rewrites it from the command line once the checkpoints accept "
                          "the model).") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a JSON file; move it away.") from None


def read_config(run_dir: str | Path) -> Config:
    """The `Config` saved in `<run_dir>/config.json`, with errors that name the file."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a jaxsys run directory?")
    data = read_json(path)
    try:
        return config_lib.from_dict(data)
    except (ConfigError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} does not hold a jaxsys config ({str(e).splitlines()[0]}); restore "
                          "it, or delete it and run the training command again.") from None
