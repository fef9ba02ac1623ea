"""Integrity manifests for checkpoints: sha256 of every file, written last, checked before use.

Orbax makes a save atomic (temporary directory, then rename) but cannot tell a finished
checkpoint from one whose files were later truncated or had a bit flipped on disk; tensorstore
does not checksum array chunks. So once a save is finalised, process 0 writes
`<step>/jaxsys_manifest.json` (JSON: relative path -> size in bytes and sha256), atomically and
last. Before a restore the step's files are checked against it:

- no manifest: the save never finished (or was killed between finalising and the manifest);
- a file missing, of another size (truncated) or with another sha256 (bit flip): corrupt.

Either way the checkpoint is unusable and the caller falls back to the previous one.
Nothing here executes code read from disk: the manifest is plain JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "jaxsys_manifest.json"
_CHUNK = 1 << 20


class CheckpointCorrupt(RuntimeError):
    """A checkpoint step that must not be restored; the message names the step and the file."""

    def __init__(self, step_dir: Path, reason: str, incomplete: bool = False):
        self.step_dir = Path(step_dir)
        self.reason = reason
        self.incomplete = incomplete  # no manifest: unfinished, or a save whose manifest is still due
        super().__init__(f"Checkpoint step {self.step_dir.name} ({self.step_dir}) is unusable: {reason}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST))


def write_manifest(step_dir: str | Path) -> Path:
    """Hash every file of a finalised checkpoint and write the manifest (tmp file + rename)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(step_dir)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)
    return step_dir / MANIFEST


def has_manifest(step_dir: str | Path) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def verify(step_dir: str | Path) -> None:
    """Raise `CheckpointCorrupt` unless every file listed in the manifest is intact."""
    step_dir = Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorrupt(step_dir, f"no {MANIFEST}: the save did not finish (incomplete checkpoint)",
                                incomplete=True)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(step_dir, f"{manifest} is not a valid manifest ({e})") from None
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointCorrupt(step_dir, f"file {path} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointCorrupt(step_dir, f"file {path} has {size} bytes, {want['bytes']} were "
                                              "written (truncated)")
        digest = sha256_file(path)
        if digest != want["sha256"]:
            raise CheckpointCorrupt(step_dir, f"file {path} has sha256 {digest[:12]}…, "
                                              f"{want['sha256'][:12]}… was written (corrupted data)")
