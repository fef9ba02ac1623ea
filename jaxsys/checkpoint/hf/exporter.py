"""A jaxsys run directory -> a Hugging Face model folder that `transformers` loads as it is.

    config.json              GPT2LMHeadModel (gpt2), Qwen2ForCausalLM (llama + qkv_bias), else
                             LlamaForCausalLM; special token ids from an imported run's hf/config.json
    generation_config.json   the imported one, else the special token ids alone
    model.safetensors        the newest usable checkpoint's parameters in their dtype; past
                             --max-shard-size, model-0000k-of-0000n.safetensors + the index
    tokenizer files          an imported run's tokenizer/ as it was; a byte or char tokenizer rebuilt
                             as a `tokenizers` tokenizer.json (`hf_tokenizers`); plain ids: none (warned)

Each Hugging Face tensor is built from its leaves, restored from the checkpoint one at a time
onto one device, written and dropped in turn (`LeafReader`, `files.write_safetensors`): host
memory stays near the largest leaf, not the whole model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxsys.checkpoint import manager as ckpt
from jaxsys.checkpoint import run_files
import jaxsys.checkpoint.hf.config_map as config_map
import jaxsys.checkpoint.hf.hf_tokenizers as hf_tokenizers
import jaxsys.checkpoint.hf.names as names
from jaxsys.checkpoint.hf.files import concurrent_gb, parse_size, write_safetensors
from jaxsys.checkpoint.hf.importer import HF_DIR, TOKENIZER_DIR, _leaf_path
from jaxsys.config import Config
from jaxsys.model.transformer import abstract_params

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class LeafReader:
    """The parameters of checkpoint `step` of `run_dir`, read from it one leaf at a time (an Orbax
    partial restore onto one device), holding only the leaves of the tensor being built: host
    memory stays near the largest leaf instead of the whole tree (measured on a 1.1B Llama: the
    export's peak went from 1.54x the safetensors size with the tree restored at once to the
    figure in docs/huggingface.md)."""

    def __init__(self, run_dir: Path, cfg: Config, step: int):
        abstract, _ = abstract_params(cfg.model)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
        self.step = step
        self.manager = ckpt.make_params_reader(run_dir, concurrent_gb(abstract))
        self.cache: dict[tuple[str, ...], np.ndarray] = {}

    def check(self) -> None:
        ckpt.check_params_compatible(self.manager, self.step, self.target)

    def keep_only(self, paths: list[tuple[str, ...]]) -> None:
        for p in [p for p in self.cache if p not in paths]:
            del self.cache[p]

    def get(self, path: tuple[str, ...]) -> np.ndarray:
        if path not in self.cache:
            self.cache[path] = ckpt.restore_param_leaf(self.manager, self.step, self.target, path)
        return self.cache[path]

    def close(self) -> None:
        self.cache.clear()
        self.manager.close()


def open_params(run_dir: Path, cfg: Config, log: Callable[[str], None]) -> LeafReader:
    """A `LeafReader` of the newest usable checkpoint of `run_dir` (checked against the model)."""
    step, _ = ckpt.select_resume_step(run_dir, log, keep_incomplete=True)
    if step is None:
        raise FileNotFoundError(f"No usable checkpoint in {run_dir / 'checkpoints'}.")
    reader = LeafReader(run_dir, cfg, step)
    try:
        reader.check()
    except BaseException:
        reader.close()
        raise
    return reader


def write_weights(reader: LeafReader, cfg: Config, out: Path, max_shard_bytes: int) -> list[Path]:
    """The Hugging Face safetensors file(s) of the checkpoint `reader` reads (jaxsys layout) in
    `out`. Tensors are written entry by entry (every layer of one stacked leaf, then the next), so
    each leaf is read once; readers find them by the header, whatever their order."""
    m = cfg.model.resolved()
    dtype = np.dtype(jax.tree_util.tree_leaves(reader.target)[0].dtype)
    order = {e.hf: n for n, e in enumerate(names.entries(m))}
    table = {name: (entry, i) for name, entry, i in sorted(names.expanded(m), key=lambda t: (order[t[1].hf], t[2]))}

    def build(name: str) -> np.ndarray:
        entry, i = table[name]
        paths = [_leaf_path(entry, leaf, i, m.scan_layers) for leaf in entry.leaves]
        reader.keep_only(paths)
        leaves = [reader.get(p) for p in paths]
        if entry.per_layer and m.scan_layers:
            leaves = [x[i] for x in leaves]
        return names.to_hf(entry, leaves)

    tensors = [(name, entry.shape, dtype) for name, (entry, _) in table.items()]
    return write_safetensors(out, tensors, build, max_shard_bytes)


def _configs(run_dir: Path, cfg: Config, dtype: str, out: Path) -> None:
    src = run_dir / HF_DIR
    special = run_files.read_json(src / "config.json") if (src / "config.json").is_file() else {}
    hf = config_map.hf_config(cfg.model, dtype, (special.get("architectures") or [""])[0])
    hf.update({k: special.get(k) for k in _SPECIAL})  # None, not transformers' defaults (GPT-2's 50256)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    else:
        gen = {k: hf[k] for k in _SPECIAL if hf.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _tokenizer(run_dir: Path, cfg: Config, out: Path, log: Callable[[str], None]) -> list[str]:
    src = run_dir / TOKENIZER_DIR
    if src.is_dir():
        copied = sorted(p.name for p in src.iterdir() if p.is_file())
        for name in copied:
            shutil.copyfile(src / name, out / name)
        return copied
    tok = run_files.read_json(run_dir / run_files.TOKENIZER) if (run_dir / run_files.TOKENIZER).is_file() else {}
    written = hf_tokenizers.write(tok, cfg.model.seq_len, out)
    if not written:
        log(f"warning: {run_dir} has no tokenizer that Hugging Face can load (tokenizer.json: "
            f"{json.dumps(tok)}); exported the weights without one. Give AutoTokenizer your own.")
    return written


def export_hf(run_dir: str | Path, out: str | Path, max_shard_size: str = "5GB",
              log: Callable[[str], None] = _stderr) -> list[Path]:
    """Write the newest usable checkpoint of `run_dir` as a Hugging Face model folder `out`
    (see the module docstring); returns the files written. `max_shard_size` as transformers'
    (``5GB``, ``500MB``)."""
    run_dir, out = Path(run_dir), Path(out)
    limit = parse_size(max_shard_size)
    cfg = run_files.read_config(run_dir)
    if not ckpt.step_dirs(run_dir):
        raise FileNotFoundError(f"No checkpoint in {run_dir / 'checkpoints'}; train or import first.")
    reader = open_params(run_dir, cfg, log)
    step = reader.step
    try:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("model*.safetensors*"):  # a previous export's shards would mix in
            old.unlink()
        files = write_weights(reader, cfg, out, limit)
    finally:
        reader.close()
    _configs(run_dir, cfg, cfg.model.param_dtype, out)
    tok = _tokenizer(run_dir, cfg, out, log)
    log(f"Exported checkpoint step {step} of {run_dir} to {out} ({len(files)} weight file(s), "
        f"tokenizer: {', '.join(tok) or 'none'})")
    return files + [out / "config.json", out / "generation_config.json"] + [out / t for t in tok]
