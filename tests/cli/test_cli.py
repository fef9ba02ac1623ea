"""The command line, end to end in a fresh process (so `--devices` acts before jax starts)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import subprocess_env


def jaxsys(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "jaxsys", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_writes_metrics_tensorboard_checkpoints_and_samples(tmp_path):
    run = jaxsys("train", "--preset", "tiny", "--devices", "2", "mesh.fsdp=2", "mesh.data=1",
                 "train.steps=4", "train.log_every=1", "checkpoint.every=2", "run_dir=run",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "mesh fsdp=2 (2 × cpu)" in run.stdout
    assert "Compiled train and eval steps" in run.stdout and "final val loss" in run.stdout
    assert "ROMEO:" in run.stdout  # the closing sample

    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= row.keys()
        assert row["tokens_per_sec"] > 0 and row["loss"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mesh"]["fsdp"] == 2 and config["train"]["steps"] == 4

    sample = jaxsys("sample", "--run-dir", "run", "--prompt", "JULIET:", "--max-new-tokens", "20",
                    cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("JULIET:") and len(sample.stdout.rstrip("\n")) >= len("JULIET:") + 10

    again = jaxsys("train", "--preset", "tiny", "--devices", "2", "mesh.fsdp=2", "mesh.data=1",
                   "train.steps=6", "run_dir=run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Resumed from checkpoint step 4" in again.stdout


def test_bad_override_is_a_clear_error(tmp_path):
    run = jaxsys("train", "--preset", "tiny", "train.stpes=3", cwd=tmp_path)
    assert run.returncode == 2
    assert "Unknown config key 'train.stpes'. Did you mean 'train.steps'?" in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_mesh_fails_before_compiling(tmp_path):
    run = jaxsys("train", "--preset", "tiny", "--devices", "4", "mesh.data=3", "run_dir=run", cwd=tmp_path)
    assert run.returncode == 2
    assert "has 3 devices but 4 are available" in run.stderr
    assert "Compiled" not in run.stdout


def test_config_command_prints_resolved_config(tmp_path):
    run = jaxsys("config", "--preset", "gpt2-small", "mesh.fsdp=8", cwd=tmp_path)
    assert run.returncode == 0
    cfg = json.loads(run.stdout)
    assert cfg["model"]["embed_dim"] == 768 and cfg["mesh"]["fsdp"] == 8


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigterm_saves_a_checkpoint_and_the_rerun_continues_exactly(tmp_path):
    import signal
    import time

    args = ["train", "--preset", "tiny", "mesh.data=1", "train.eval_every=0", "train.log_every=1",
            "checkpoint.every=100000", "logging.progress=false", "logging.sample_tokens=0"]
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "jaxsys", *args, "train.steps=100000", "run_dir=run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training has started
        if line.startswith("Compiled"):
            break
    # ... and has logged a step, so the signal handler is in place. (A fixed 1 s after
    # "Compiled" was too early on a loaded machine: the loop's setup outlasted it and the default
    # SIGTERM action killed the process.)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "SIGTERM received" in out and "Run the same command again to resume" in out
    stopped = int(out.split("Stopped by SIGTERM after step ")[1].split(":")[0])
    assert 0 < stopped < 100000
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [str(stopped)]

    end = stopped + 3
    resumed = jaxsys(*args, f"train.steps={end}", "run_dir=run", cwd=tmp_path)
    assert resumed.returncode == 0 and f"Resumed from checkpoint step {stopped}" in resumed.stdout
    straight = jaxsys(*args, f"train.steps={end}", "run_dir=straight", cwd=tmp_path)
    assert straight.returncode == 0
    interrupted, reference = _losses(tmp_path / "run"), _losses(tmp_path / "straight")
    assert sorted(interrupted) == list(range(1, end + 1))  # every step logged exactly once
    assert interrupted == reference  # tiny's constant schedule: the same losses, bit for bit
