"""What a run prints: plain text or one JSON object per line, all of it or only what matters.

`logging.format=json` turns every line into ``{"event": ..., "message": ..., **fields}`` on
stdout (and each logged step into an ``"event": "step"`` line with its metrics), for tools that
read a run's output; `logging.quiet` keeps only warnings and the final line (errors go to stderr
from the command line either way). Only process 0 prints.
"""

from __future__ import annotations

import json
import math
from typing import Any

from jaxsys.config import LoggingConfig

LEVELS = ("info", "warn", "final")  # quiet prints "warn" and "final" only


def _plain(value: Any) -> Any:
    """JSON-safe: numpy / JAX scalars as Python numbers, non-finite floats as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


class Console:
    """Prints the loop's lines as text or JSON; `bar` (a tqdm bar, when one is shown) gets them
    through `bar.write` so the bar is not broken."""

    def __init__(self, cfg: LoggingConfig = LoggingConfig()):
        self.json = cfg.format == "json"
        self.quiet = cfg.quiet
        self.bar: Any = None

    def shows_progress(self, cfg: LoggingConfig) -> bool:
        """A progress bar only in text mode and not quiet."""
        return cfg.progress and not self.json and not self.quiet

    def log(self, message: str, event: str = "log", level: str = "info", **fields: Any) -> None:
        if self.quiet and level == "info":
            return
        if self.json:
            fields = {k: _plain(v) for k, v in fields.items()}
            line = json.dumps({"event": event, "message": message.strip(), **fields}, ensure_ascii=False)
        else:
            line = message
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
