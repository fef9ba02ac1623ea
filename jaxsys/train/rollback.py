"""Rolling back after repeated non-finite steps, and the data schedule that moves past them.

The batch of step k is a pure function of (seed, data index), and the data index is k until a
rollback happens. Rolling back to the checkpoint of step S after a streak of bad steps ending
at step F and then replaying batches S+1..F would hit the same bad batches again (the stream is
deterministic) and loop forever, so jaxsys does what large runs do by hand (PaLM, §5.1: restart
before the spike, skip the batches around it): it restores step S and feeds it the batches that
come *after* the bad ones. Each rollback is appended to `<run_dir>/rollbacks.json` (JSON) as
``{"step": S, "data_index": D, "from_step": F}``: from step S on, step k reads batch D + (k - S).
A resumed run reads the same file, so the curve after a rollback is reproducible like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

LOG = "rollbacks.json"


def load(run_dir: str | Path) -> list[dict[str, int]]:
    path = Path(run_dir) / LOG
    return json.loads(path.read_text()) if path.exists() else []


def batch_index(log: list[dict[str, int]], step: int) -> int:
    """The data index of loop step `step` (0-based) under the rollbacks in `log` (in order:
    a later rollback supersedes earlier ones from its step on)."""
    index = step
    for r in log:
        if step >= r["step"]:
            index = r["data_index"] + step - r["step"]
    return index


def record(run_dir: str | Path, log: list[dict[str, int]], step: int, failed_step: int) -> dict[str, int]:
    """Append the rollback from `failed_step` (the last bad step, 1-based count of steps done)
    to checkpoint `step`; the data resumes with the batch after the one of `failed_step`."""
    entry = {"step": step, "data_index": batch_index(log, failed_step - 1) + 1, "from_step": failed_step}
    log.append(entry)
    if jax.process_index() == 0:
        path = Path(run_dir) / LOG
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log, indent=1))
        tmp.replace(path)
    return entry
