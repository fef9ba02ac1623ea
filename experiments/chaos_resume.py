"""Chaos test of preemption safety: kill -9 a training run at random moments, restart it each
time, and compare with an uninterrupted run.

    python experiments/chaos_resume.py --kills 20            # the bar in docs/benchmarks.md
    python experiments/chaos_resume.py --kills 3 --seed 1 train.steps=40

1. An uninterrupted reference run (`jaxsys train --preset tiny`, async checkpoints every 2 steps).
2. The same command in another run_dir, SIGKILLed at a random moment after training starts
   (uniform in [0, reference training time / (2·kills)]), restarted, killed again, ... `--kills`
   times, then left to finish. A kill lands anywhere: mid-step, mid-save (Orbax's tmp dir
   present), between a save and its manifest, mid-metrics-line.
3. Compared: the final parameters (bitwise), the loss curve (the last logged value per step,
   metrics.jsonl being appended by every invocation), and every invocation's own logged losses
   (a step re-run after a kill must give the same loss; an invocation that restored a corrupt
   checkpoint would not).

Printed: kills (and how many hit a save in flight), restarts, checkpoints found unusable
(set aside by the integrity check) and corrupt checkpoints used (invocations whose losses
differ from the reference: must be 0), and the max differences. Exit status 1 if any differs.
Restarts share a persistent compilation cache, so each costs process start-up, not a compile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ["--preset", "tiny", "mesh.data=1", "train.steps=60", "train.eval_every=0", "train.log_every=1",
        "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=true", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_tokens=0"]


def _env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per child
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(args: list[str], run_dir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxsys", "train", *args, f"run_dir={run_dir}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"no {text!r} in {log} after {timeout:.0f}s")


def _rows(run_dir: Path) -> tuple[list[dict], int]:
    """metrics.jsonl rows with a loss, and the number of unreadable lines (a kill mid-write)."""
    rows, bad = [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if "loss" in row:
            rows.append(row)
    return rows, bad


def _final_params(run_dir: Path):
    from jaxsys.inference.load import load_for_sampling
    return load_for_sampling(run_dir)[2]


def run(kills: int = 20, seed: int = 0, overrides: list[str] | None = None, workdir: str | None = None,
        timeout: float = 300.0) -> dict:
    """Run the experiment; returns the printed numbers as a dict."""
    rng = random.Random(seed)
    args = BASE + list(overrides or [])
    work = Path(workdir or tempfile.mkdtemp(prefix="chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    env = _env(work / "jax_cache")

    ref_dir, chaos_dir = work / "reference", work / "chaos"
    ref = _start(args, ref_dir, work / "reference.log", env)
    if ref.wait(timeout=timeout) != 0:
        raise RuntimeError(f"reference run failed: {(work / 'reference.log').read_text()[-2000:]}")
    train_s = float(re.search(r"steps in ([\d.]+)s", (work / "reference.log").read_text()).group(1))

    done_kills = during_save = restarts = 0
    logs: list[Path] = []
    while True:
        log = work / f"chaos_{len(logs)}.log"
        logs.append(log)
        proc = _start(args, chaos_dir, log, env)
        try:
            if done_kills < kills and _wait_for(log, "Compiled", proc, timeout):
                time.sleep(rng.uniform(0.0, train_s / (2 * kills)))
                if proc.poll() is None:
                    ckpts = chaos_dir / "checkpoints"
                    during_save += any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()) \
                        if ckpts.exists() else 0
                    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
                    proc.wait(timeout=30)
                    done_kills += 1
                    restarts += 1
                    continue
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if code != 0:
            raise RuntimeError(f"run {log} failed with exit {code}: {log.read_text()[-2000:]}")
        break

    ref_rows, _ = _rows(ref_dir)
    reference = {r["step"]: r["loss"] for r in ref_rows}
    rows, unreadable = _rows(chaos_dir)
    curve = {}
    for r in rows:  # the last value per step: steps re-run after a kill appear more than once
        curve[r["step"]] = r["loss"]
    if sorted(curve) != sorted(reference):
        raise RuntimeError(f"steps logged differ: {sorted(set(curve) ^ set(reference))}")
    curve_diff = max(abs(curve[k] - reference[k]) for k in reference)
    rerun_diff = max(abs(r["loss"] - reference[r["step"]]) for r in rows)
    text = [log.read_text(errors="replace") for log in logs]
    unusable = sum(t.count("is unusable") for t in text)
    # Each invocation appends a block of rows with increasing steps; a block that differs from
    # the reference anywhere means that invocation started from a wrong (corrupt) state.
    blocks, current, last = [], [], 0
    for r in rows:
        if current and r["step"] <= last:
            blocks.append(current)
            current = []
        current.append(r)
        last = r["step"]
    blocks.append(current)
    used_corrupt = sum(any(r["loss"] != reference[r["step"]] for r in b) for b in blocks)

    import jax
    import numpy as np
    a, b = _final_params(chaos_dir), _final_params(ref_dir)
    param_diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                     for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    result = {"kills": done_kills, "kills_during_save": during_save, "restarts": restarts,
              "unusable_checkpoints_found": unusable, "corrupt_checkpoints_used": used_corrupt,
              "unreadable_metric_lines": unreadable, "steps": len(reference),
              "loss_curve_max_diff": curve_diff, "rerun_loss_max_diff": rerun_diff,
              "final_params_max_diff": param_diff, "workdir": str(work)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="added to the tiny preset's run")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    r = run(a.kills, a.seed, a.overrides, a.workdir)
    for key, value in r.items():
        print(f"{key:28s} {value}")
    print(f"{'wall_seconds':28s} {time.perf_counter() - t0:.1f}")
    ok = r["final_params_max_diff"] == 0.0 and r["loss_curve_max_diff"] == 0.0 and r["corrupt_checkpoints_used"] == 0
    print("PASS: bitwise equal to the uninterrupted run" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
