"""Reading and writing Hugging Face model folders one tensor at a time.

`Source` reads `model.safetensors` or the shards named by `model.safetensors.index.json` with
`safetensors.safe_open`, opening the file for each tensor: the memory map (whose touched pages
count in the process's resident memory) is dropped after every tensor, so reading a model
never holds more than one tensor of it on the host.

`write_safetensors` streams tensors into files of the safetensors format (an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the raw little-endian
data): the header is known from the shapes before any data exists, so each tensor is built,
written and dropped in turn. Past `max_shard_bytes` it writes `model-0000k-of-0000n.safetensors`
shards and `model.safetensors.index.json`, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_dtypes
import numpy as np

from jaxsys.checkpoint.run_files import read_json
from jaxsys.config import ConfigError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_NAMES = {v: k for k, v in DTYPES.items()}
# Files of a tokenizer that `AutoTokenizer.from_pretrained` reads, copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def _safetensors():
    try:
        import safetensors
    except ImportError:
        raise ConfigError("Hugging Face import/export needs safetensors: pip install -e \".[hf]\"") from None
    return safetensors


class Source:
    """A local Hugging Face model folder: its `config.json` and its tensors by name."""

    def __init__(self, src: str | Path):
        self.dir = Path(src)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir / 'config.json'} not found: give a local Hugging Face model "
                                    "folder (config.json + model.safetensors).")
        self.config = read_json(self.dir / "config.json")
        if (self.dir / INDEX).is_file():
            self.files = {k: self.dir / v for k, v in read_json(self.dir / INDEX)["weight_map"].items()}
        elif (self.dir / SINGLE).is_file():
            with _safetensors().safe_open(self.dir / SINGLE, "numpy") as f:
                self.files = {k: self.dir / SINGLE for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (it has {bins[0]}: save it again with safe_serialization=True)" if bins else ""
            raise FileNotFoundError(f"{self.dir} has no {SINGLE} or {INDEX}{hint}.")

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a host array in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if name not in self.files:
            raise ConfigError(f"{self.dir}: tensor {name!r} is missing; the files do not match config.json.")
        st = _safetensors()
        with st.safe_open(self.files[name], "numpy") as f:
            kind = f.get_slice(name).get_dtype()
            if kind not in DTYPES:
                raise ConfigError(f"{self.dir}: tensor {name!r} has dtype {kind}; jaxsys reads F32, BF16 and F16.")
            if kind != "BF16":
                return f.get_tensor(name)
        with st.safe_open(self.files[name], "flax") as f:  # numpy has no bfloat16 of its own
            return np.asarray(f.get_tensor(name))

    def dtype(self, name: str) -> np.dtype:
        with _safetensors().safe_open(self.files[name], "numpy") as f:
            return DTYPES.get(f.get_slice(name).get_dtype(), np.dtype(np.float32))


def _header(tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        size = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def shards(tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of `tensors` per file: in order, a new file when the next tensor would pass
    `max_shard_bytes` (a tensor larger than the limit gets a file of its own)."""
    out: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(tensors):
        n = int(np.prod(shape)) * dtype.itemsize
        if out[-1] and size + n > max_shard_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def write_safetensors(out_dir: Path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      build: Callable[[str], np.ndarray], max_shard_bytes: int) -> list[Path]:
    """Write `tensors` (name, shape, dtype) into `out_dir`, calling `build(name)` for each one's
    data just before writing it. Returns the files written (the index last, when sharded)."""
    groups = shards(tensors, max_shard_bytes)
    n = len(groups)
    paths, weight_map, total = [], {}, 0
    for k, group in enumerate(groups):
        path = out_dir / (SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
        part = [tensors[i] for i in group]
        with open(path, "wb") as f:
            f.write(_header(part))
            for name, shape, dtype in part:
                x = np.ascontiguousarray(build(name), dtype=dtype)
                if x.shape != tuple(shape):
                    raise ValueError(f"{name}: built shape {x.shape}, header says {tuple(shape)}")
                f.write(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
                weight_map[name] = path.name
                total += x.nbytes
        paths.append(path)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        paths.append(out_dir / INDEX)
    return paths


def copy_tokenizer(src: Path, dest: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy the tokenizer files of a Hugging Face folder `src` that exist, but those named in
    `skip`, into `dest` (created when there is one); returns their names."""
    found = [n for n in TOKENIZER_FILES if (src / n).is_file() and n not in skip]
    if found:
        dest.mkdir(parents=True, exist_ok=True)
        for name in found:
            shutil.copyfile(src / name, dest / name)
    return found


def concurrent_gb(tree: Any) -> int:
    """The smallest whole-GB cap on Orbax's bytes in flight that fits the largest leaf of `tree`
    (arrays or `ShapeDtypeStruct`s): saves and restores then hold about one leaf beyond the tree."""
    largest = max(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
    return max(1, math.ceil(largest / 1e9))


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000`` (decimal units, as
    transformers' max_shard_size)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            t, factor = t[: -len(unit)], scale
            break
    else:
        factor = 1
    try:
        value = int(float(t) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB.")
    return value
