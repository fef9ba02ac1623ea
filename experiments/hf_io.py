"""Hugging Face import and export: wall time and peak host memory against the model's size.

    python experiments/hf_io.py                          # gpt2-small (124M) and llama-1b (1.1B)
    python experiments/hf_io.py --models gpt2-small --workdir /tmp/hf_io --keep

For each model: a random-weight `transformers` model (float32) written with `save_pretrained`
(safetensors, transformers' default shard size); then, each in a fresh process, `jaxsys hf import`
into a run directory and `jaxsys hf export` of it. Printed per step: wall seconds, the process's
peak resident memory (`resource.getrusage` ru_maxrss, which includes Python, JAX and the XLA
CPU client: the `baseline` row is a process that only imports jaxsys and starts JAX), and that
peak over the safetensors size on disk (the target is ≤ 1.5). Files are removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name -> (transformers config class, kwargs)
    "gpt2-small": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "llama-1b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=2048, tie_word_embeddings=False)),
}
_CLASSES = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM"}

_MEASURE = """
import resource, sys, time
t0 = time.perf_counter()
{body}
wall = time.perf_counter() - t0
print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
STEPS = {
    "baseline": "import jax, jaxsys.checkpoint.hf; jax.devices()",
    "import": "from jaxsys.checkpoint.hf import import_to_run_dir; import_to_run_dir({src!r}, {run!r})",
    "export": "from jaxsys.checkpoint.hf import export_hf; export_hf({run!r}, {out!r}, log=lambda m: None)",
}


def write_model(name: str, folder: Path) -> float:
    """Save a random-weight model `name` to `folder`; returns the seconds it took."""
    import torch
    import transformers
    cls, kw = MODELS[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = getattr(transformers, _CLASSES[cls])(getattr(transformers, cls)(**kw))
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return time.perf_counter() - t0


def measure(step: str, **paths: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `step` in a fresh Python process."""
    code = _MEASURE.format(body=STEPS[step].format(**paths))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    wall, rss = proc.stdout.split()[-2:]
    return float(wall), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf_io_"))
    work.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    base_wall, base_rss = measure("baseline")
    rows = [("baseline (import jaxsys, start JAX)", "-", f"{base_wall:.1f}", f"{base_rss / gib:.2f}", "")]
    try:
        for name in args.models.split(","):
            src, run, out = work / f"{name}-hf", work / f"{name}-run", work / f"{name}-export"
            made = write_model(name, src)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            rows.append((f"{name}: save_pretrained", f"{size / gib:.2f}", f"{made:.1f}", "", ""))
            for step in ("import", "export"):
                wall, rss = measure(step, src=str(src), run=str(run), out=str(out))
                rows.append((f"{name}: jaxsys hf {step}", f"{size / gib:.2f}", f"{wall:.1f}",
                             f"{rss / gib:.2f}", f"{rss / size:.2f}"))
            for p in (src, run, out) if not args.keep else ():
                shutil.rmtree(p, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, {sys.executable}")
    print("| step | size on disk GiB | wall s | peak RSS GiB | peak / size |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
