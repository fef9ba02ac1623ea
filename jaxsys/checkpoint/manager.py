"""Orbax checkpoints of the `TrainState`: async, keep-last-K, atomic, restorable onto any mesh.

Orbax writes each save into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
save interrupted midway is never seen as a checkpoint. Restoring takes a target tree of
`jax.ShapeDtypeStruct`s carrying the *current* shardings, so a checkpoint written on one mesh
(say fsdp=8) loads onto another (data=2 × fsdp=4, or one device).

On top of Orbax: every finalised step gets an integrity manifest (`jaxsys.checkpoint.integrity`), written
last; `select_resume_step` checks the newest steps against theirs and moves unusable ones
(incomplete, truncated, bit-flipped) to `<run_dir>/rejected_checkpoints/`, so the previous good
step is restored. `check_compatible` compares the checkpoint's own metadata with the model
about to be restored (every parameter's path and shape) before any array is read. In a
multi-process job, all processes call these functions; process 0 alone touches the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxsys.checkpoint import integrity
from jaxsys.config import CheckpointConfig, ConfigError
from jaxsys.model.params import path_str

REJECTED = "rejected_checkpoints"


def make_manager(run_dir: str | Path, cfg: CheckpointConfig, read_only: bool = False,
                 concurrent_gb: int | None = None) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `<run_dir>/checkpoints`; `read_only` (sampling, evaluation) leaves
    Orbax's tmp directories alone: a training running beside the reader may be writing one.
    `concurrent_gb` caps the GB Orbax holds in flight while saving or restoring (default 96):
    a low cap keeps host memory near one copy of the arrays (Hugging Face import / export)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of saves killed midway (never restorable)
    )
    # The handler is named up front so `item_metadata` can read a step before any restore.
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_handlers=ocp.StandardCheckpointHandler(**({} if concurrent_gb is None else {
                                     "save_concurrent_gb": concurrent_gb, "restore_concurrent_gb": concurrent_gb})))


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Start saving `state` as `step` (returns before the write finishes when async)."""
    manager.save(step, args=ocp.args.StandardSave(state))


def save_params(run_dir: str | Path, step: int, params: Any, concurrent_gb: int = 96,
                chunk_bytes: int | None = 64 * 2**20, data_file_bytes: int | None = 128 * 2**20) -> None:
    """Save `params` alone, as ``{"params": params}`` (synchronously, with its manifest): a
    starting point without an optimizer (an imported model, `jaxsys.checkpoint.hf`).
    `restore_params` reads it like a train state's params; training starts from it with a fresh
    optimizer (`is_params_only`). `concurrent_gb` caps Orbax's bytes in flight, and 1 GB its
    device-to-host copies; it must fit the largest leaf. Each leaf is written in chunks of
    `chunk_bytes` into OCDBT data files of `data_file_bytes` (Orbax's defaults: one chunk per
    leaf, larger data files): measured on a 1.1B model, the arrays
    being 4.1 GiB, peak host memory 7.9 GiB by default, 6.3 with the caps, 5.2-5.4 with the
    small chunks and files too. Any Orbax reader restores it (the layout is in the metadata)."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=concurrent_gb, save_device_host_concurrent_gb=1)
    manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options, item_handlers=handler)
    try:  # the same files as StandardSave writes (which wraps this handler)
        save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), params)
        manager.save(step, args=ocp.args.PyTreeSave({"params": params}, save_args={"params": save_args},
                                                    ocdbt_target_data_file_size=data_file_bytes))
        manager.wait_until_finished()
    finally:
        manager.close()
    write_missing_manifests(run_dir)


def is_params_only(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint `step` holds parameters only (`save_params`), no optimizer state."""
    meta = manager.item_metadata(step)
    return hasattr(meta, "keys") and set(meta.keys()) == {"params"}


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[int, Any]:
    """Restore `step` (default: the latest complete one) into the layout of `target`.

    Returns (step, state). Raises FileNotFoundError when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))


def restore_params(manager: ocp.CheckpointManager, params_target: Any, step: int | None = None) -> tuple[int, Any]:
    """Restore only what generation needs, the `params` of a saved train state, into the layout
    of `params_target` (a tree of `jax.ShapeDtypeStruct` with shardings). The rest of the state
    (step, optimizer moments) is read onto one device as the checkpoint's metadata describes
    it, so no optimizer has to be built. Returns (step, params)."""
    step, items = restore_items(manager, {"params": params_target}, step)
    return step, items["params"]


def restore_items(manager: ocp.CheckpointManager, targets: dict[str, Any],
                  step: int | None = None) -> tuple[int, dict[str, Any]]:
    """`restore_params` for several top-level items of a saved train state at once (e.g.
    "params" and "model_state", the MoE loss-free bias), each into the layout of its target.
    Returns (step, {name: restored}) for the names of `targets` the checkpoint holds; a name it
    lacks or holds empty (a params-only checkpoint has no "model_state", a dense one an empty
    one) is left out."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = manager.item_metadata(step)
    target = {k: jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), v)
              for k, v in meta.items() if k not in targets}
    held = [k for k in targets if k in meta and jax.tree_util.tree_leaves(meta[k])]
    target.update({k: targets[k] for k in held})
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return step, {k: restored[k] for k in held}


def make_params_reader(run_dir: str | Path, concurrent_gb: int = 96) -> ocp.CheckpointManager:
    """A read-only manager over `<run_dir>/checkpoints` for `restore_param_leaf` (the files of
    `save` and `save_params` alike); `concurrent_gb` caps Orbax's bytes in flight."""
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_handlers=ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb))


def restore_param_leaf(manager: ocp.CheckpointManager, step: int, params_target: Any,
                       path: tuple[str, ...]) -> np.ndarray:
    """One leaf of the `params` of checkpoint `step` (at dict-key `path` in `params_target`, a
    tree of `jax.ShapeDtypeStruct` with shardings), as a host array: an Orbax partial restore
    that reads that leaf's files alone."""
    leaf = params_target
    for k in path:
        leaf = leaf[k]
    item: dict = {}
    tree = item
    for k in ("params", *path[:-1]):
        tree = tree.setdefault(k, {})
    tree[path[-1]] = leaf
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    out = manager.restore(step, args=args)["params"]
    for k in path:
        out = out[k]
    return np.asarray(out)


def step_dirs(run_dir: str | Path) -> dict[int, Path]:
    """The finalised step directories of `<run_dir>/checkpoints` (not Orbax's tmp dirs)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}


def write_missing_manifests(run_dir: str | Path) -> list[int]:
    """Write the manifest of every finalised step lacking one; call only when no save is in
    flight (after `wait_until_finished`, or when `is_saving_in_progress()` is False). Process 0
    writes; returns the steps it wrote."""
    if jax.process_index() != 0:
        return []
    written = []
    for step, path in sorted(step_dirs(run_dir).items()):
        if not integrity.has_manifest(path):
            integrity.write_manifest(path)
            written.append(step)
    return written


def sync(name: str) -> None:
    """Barrier across processes (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def reject(run_dir: str | Path, step: int, reason: str) -> Path:
    """Move checkpoint `step` out of Orbax's sight to `<run_dir>/rejected_checkpoints/` (kept for
    inspection, never deleted) with the reason beside it. Process 0 only."""
    dest_root = Path(run_dir) / REJECTED
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / str(step)
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{step}.{n}", n + 1
    shutil.move(str(Path(run_dir) / "checkpoints" / str(step)), dest)
    (dest_root / f"{dest.name}.reason.txt").write_text(reason + "\n")
    return dest


def select_resume_step(run_dir: str | Path, log: Callable[[str], None] = print,
                       below: int | None = None, keep_incomplete: bool = False) -> tuple[int | None, list[str]]:
    """The newest step (below `below`, if given) whose files match its manifest.

    Each newer step that fails `integrity.verify` is reported through `log` (step, file, reason)
    and moved to `<run_dir>/rejected_checkpoints/`. With `keep_incomplete` (one process only: for
    readers such as `jaxsys sample`, which may run beside a training whose newest manifest is not
    written yet), a step without a manifest is skipped but left in place. Returns (step or None,
    the reports). All processes must call it; process 0 checks and moves, the others wait and then
    read."""
    reports: list[str] = []
    chosen = None
    if jax.process_index() == 0:
        for step, path in sorted(step_dirs(run_dir).items(), reverse=True):
            if below is not None and step >= below:
                continue
            try:
                integrity.verify(path)
                chosen = step
                break
            except integrity.CheckpointCorrupt as e:
                if keep_incomplete and e.incomplete:
                    reports.append(f"{e}; skipped (left in place: a running training may still be "
                                   "finishing it).")
                else:
                    dest = reject(run_dir, step, str(e))
                    reports.append(f"{e}. Moved to {dest}; trying the previous checkpoint.")
                log(reports[-1])
    sync("jaxsys_select_resume_step")
    if jax.process_count() == 1:
        return chosen, reports
    steps = [s for s in step_dirs(run_dir) if below is None or s < below]
    return (max(steps) if steps else None), reports


def check_compatible(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    """Raise `ConfigError` naming the first parameter whose path or shape differs between the
    checkpoint's metadata and `target` (read before any array, whatever config.json says)."""
    _compare(manager, step, manager.item_metadata(step), target, "")


def check_params_compatible(manager: ocp.CheckpointManager, step: int, params_target: Any) -> None:
    """`check_compatible` for the `params` of a saved train state only (what sampling restores)."""
    meta = manager.item_metadata(step)
    _compare(manager, step, meta.get("params") if hasattr(meta, "get") else None, params_target, "params.")


def _compare(manager: ocp.CheckpointManager, step: int, meta: Any, target: Any, prefix: str) -> None:
    saved = {prefix + path_str(p): tuple(m.shape)
             for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]} if meta is not None else {}
    wanted = {prefix + path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    if not saved:
        raise ConfigError(f"Checkpoint step {step} in {manager.directory} has no readable metadata; "
                          "is it a jaxsys checkpoint? Use a new run_dir.")
    where = f"Checkpoint step {step} in {manager.directory}"
    # Parameters first: their optimizer moments repeat the same mismatch further down.
    order = sorted(saved.keys() | wanted.keys(), key=lambda k: (not k.startswith("params."), k))
    for key in order:
        if key not in saved:
            raise ConfigError(f"{where} has no parameter {key!r} (this model has shape {wanted[key]}); "
                              "it was saved by a different model. Use a new run_dir or the same model config.")
        if key not in wanted:
            raise ConfigError(f"{where} has parameter {key!r} of shape {saved[key]} that this model "
                              "lacks; it was saved by a different model. Use a new run_dir or the same model config.")
        if saved[key] != wanted[key]:
            raise ConfigError(f"{where}: parameter {key!r} has shape {saved[key]} in the checkpoint but "
                              f"{wanted[key]} in this model. Use a new run_dir or the same model config.")


def state_bytes(abstract_state: Any) -> int:
    """Bytes of a tree of `ShapeDtypeStruct`s (the size of one checkpoint, before metadata)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(abstract_state))


def check_free_space(run_dir: str | Path, one_checkpoint_bytes: int, keep: int) -> None:
    """Raise `ConfigError` before training when `run_dir`'s disk cannot hold the checkpoints:
    Orbax writes a new step before deleting the oldest, so up to `keep + 1` exist at once."""
    existing = len(step_dirs(run_dir))
    needed = max(1, keep + 1 - existing) * one_checkpoint_bytes
    free = shutil.disk_usage(Path(run_dir)).free
    if free < needed:
        mb = 1 / 2**20
        raise ConfigError(
            f"run_dir={str(run_dir)!r} has {free * mb:,.1f} MiB free, but checkpoints need about "
            f"{needed * mb:,.1f} MiB ({one_checkpoint_bytes * mb:,.1f} MiB each, checkpoint.keep={keep}, "
            "one more while saving). Free some space, choose another run_dir, or lower checkpoint.keep."
        )
