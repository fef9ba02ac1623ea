"""Orbax checkpoints of the `TrainState`: async, keep-last-K, atomic, restorable onto any mesh.

Orbax writes each save into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
save interrupted midway is never seen as a checkpoint. Restoring takes a target tree of
`jax.ShapeDtypeStruct`s carrying the *current* shardings, so a checkpoint written on one mesh
(say fsdp=8) loads onto another (data=2 × fsdp=4, or one device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxsys.config import CheckpointConfig


def make_manager(run_dir: str | Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `<run_dir>/checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Start saving `state` as `step` (returns before the write finishes when async)."""
    manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[int, Any]:
    """Restore `step` (default: the latest complete one) into the layout of `target`.

    Returns (step, state). Raises FileNotFoundError when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))
