"""Several processes, one mesh: `jaxsys launch` runs, each process's data, cross-count restores."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsys.cli.launch import launch as launch_processes

from tests.helpers import subprocess_env

ARGS = ["--preset", "tiny", "mesh.data=2", "mesh.fsdp=2", "train.eval_every=0", "train.log_every=1",
        "checkpoint.every=100000", "logging.progress=false", "logging.tensorboard=false",
        "logging.sample_tokens=0"]


def _env(cache: Path) -> dict[str, str]:
    # A fresh process per run; the compilation cache makes repeated layouts start fast.
    env = subprocess_env()
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _jaxsys(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxsys", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_failure_in_one_process_stops_the_others_and_names_it(capsys):
    script = textwrap.dedent("""
        import os, sys, time
        if os.environ["JAXSYS_PROCESS_ID"] == "1":
            print("process 1 fails", flush=True); sys.exit(3)
        print("process 0 waits", flush=True); time.sleep(120)
    """)
    t0 = time.monotonic()
    code = launch_processes(2, [sys.executable, "-c", script], grace_seconds=2.0)
    assert code == 3 and time.monotonic() - t0 < 60  # process 0 was stopped, not waited for
    captured = capsys.readouterr()
    assert "[1] process 1 fails" in captured.out and "[0] process 0 waits" in captured.out
    assert "process 1 of 2 failed (exit code 3); stopped the others" in captured.err


def test_each_process_reads_only_its_rows(tmp_path):
    script = textwrap.dedent("""
        import json, os, sys
        import numpy as np
        from jaxsys.parallel import runtime
        runtime.initialize(2)
        import jax
        from jaxsys.config import MeshConfig
        from jaxsys.data.batches import global_batch
        from jaxsys.parallel.mesh import make_mesh
        from jaxsys.parallel.rules import batch_sharding

        class Recording(np.ndarray):  # records the window offsets this process reads
            reads = []
            def __getitem__(self, key):
                if isinstance(key, slice):
                    Recording.reads.append(int(key.start))
                return super().__getitem__(key)

        tokens = np.arange(1000, dtype=np.int32)
        mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices())
        batch = global_batch(tokens.view(Recording), 0, 5, "train", 8, 16, batch_sharding(mesh))
        local = {tuple(s.index[0].indices(8)[:2]): np.asarray(s.data).tolist()
                 for s in batch["inputs"].addressable_shards}
        print("RESULT " + json.dumps({"process": jax.process_index(), "reads": Recording.reads,
                                      "local": {f"{a}:{b}": v for (a, b), v in local.items()}}), flush=True)
    """)
    out = tmp_path / "out.txt"
    env = subprocess_env()
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-c", "import sys; from jaxsys.cli.launch import launch; "
                               f"sys.exit(launch(2, [sys.executable, '-c', {script!r}]))"],
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=180)
    text = out.read_text()
    assert proc.returncode == 0, text
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT " in line]
    from jaxsys.data.batches import batch_offsets, local_batch
    offsets = batch_offsets(0, 5, "train", 8, 1000, 16)
    full = local_batch(np.arange(1000, dtype=np.int32), 0, 5, "train", 8, 16)["inputs"]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        rows = range(4 * r["process"], 4 * r["process"] + 4)  # data×fsdp=4 devices per process
        assert sorted(r["reads"]) == sorted(int(offsets[i]) for i in rows)  # only its own windows
        for key, value in r["local"].items():
            a, b = map(int, key.split(":"))
            assert a in rows and np.array_equal(np.asarray(value), full[a:b])


def _assert_same_curve(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    # Equal up to float32 summation order: gloo's all-reduce adds the 4 devices' partial sums in
    # another order than XLA's in-process one (a few ulp per step), so not bitwise.
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=2e-6, atol=0)
    assert want[0][1] != want[-1][1]


@pytest.mark.slow  # long: the default run stays under its time budget
def test_two_processes_equal_one_process_and_restore_across_counts(tmp_path):
    env = _env(tmp_path / "cache")
    launch = ["launch", "--processes", "2", "--", "train", "--devices", "2", *ARGS]
    one = ["train", "--devices", "4", *ARGS]
    two = _jaxsys([*launch, "train.steps=3", "run_dir=two"], tmp_path, env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "mesh data=2 × fsdp=2 (4 × cpu, 2 processes)" in two.stdout
    assert not [x for x in two.stdout.splitlines() if x.startswith("[1] ") and "jaxsys" in x]
    single = _jaxsys([*one, "train.steps=3", "run_dir=one"], tmp_path, env)
    assert single.returncode == 0, single.stderr
    _assert_same_curve(_curve(tmp_path / "two"), _curve(tmp_path / "one"))

    # Each run ended with a checkpoint at step 3: the 2-process one resumes in 1 process, the
    # 1-process one in 2 processes, and both continue the same curve.
    r1 = _jaxsys([*one, "train.steps=5", "run_dir=two"], tmp_path, env)
    assert r1.returncode == 0 and "Resumed from checkpoint step 3" in r1.stdout, r1.stdout + r1.stderr
    r2 = _jaxsys([*launch, "train.steps=5", "run_dir=one"], tmp_path, env)
    assert r2.returncode == 0 and "[0] Resumed from checkpoint step 3" in r2.stdout, r2.stdout + r2.stderr
    got_1, got_2 = _curve(tmp_path / "two"), _curve(tmp_path / "one")
    assert [s for s, _ in got_1] == [s for s, _ in got_2] == [1, 2, 3, 4, 5]
    _assert_same_curve(got_1, got_2)


@pytest.mark.slow  # 5 runs, 3 of them 2-process (55 s on the idle 2-core VM, ~6 min loaded)
def test_sigterm_to_launcher_and_checkpoints_across_process_counts(tmp_path):
    env = _env(tmp_path / "cache")
    launch = ["launch", "--processes", "2", "--", "train", "--devices", "2", *ARGS]
    one = ["train", "--devices", "4", *ARGS]

    # 2 processes × 2 devices, stopped by SIGTERM (forwarded to both; they agree on the step).
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jaxsys", *launch, "train.steps=100000", "run_dir=run"],
                                cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # the launcher's children die with it: they wait on its coordinator
            proc.wait(timeout=30)
    lines = log.read_text().splitlines(keepends=True)
    out = "".join(lines)
    assert "mesh data=2 × fsdp=2 (4 × cpu, 2 processes)" in out
    stopped = int(out.split("Stopped by SIGTERM after step ")[1].split(":")[0])
    assert 1 <= stopped <= 6, out
    # Only process 0 prints progress and writes metrics; process 1 prints no jaxsys lines.
    assert not [x for x in lines if x.startswith("[1] ") and ("step" in x or "jaxsys" in x or "Compiled" in x)]
    assert [s for s, _ in _curve(tmp_path / "run")] == list(range(1, stopped + 1))

    # Saved by 2 processes, restored by 1; then saved by 1, restored by 2.
    r1 = _jaxsys([*one, f"train.steps={stopped + 3}", "checkpoint.every=3", "run_dir=run"], tmp_path, env)
    assert r1.returncode == 0 and f"Resumed from checkpoint step {stopped}" in r1.stdout, r1.stdout + r1.stderr
    r2 = _jaxsys([*launch, f"train.steps={stopped + 6}", "run_dir=run"], tmp_path, env)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr
    assert f"[0] Resumed from checkpoint step {stopped + 3}" in r2.stdout, r2.stdout + r2.stderr

    ref = _jaxsys([*one, f"train.steps={stopped + 6}", "run_dir=ref"], tmp_path, env)
    assert ref.returncode == 0, ref.stderr
    got, want = _curve(tmp_path / "run"), _curve(tmp_path / "ref")
    assert [s for s, _ in want] == list(range(1, stopped + 7))
    _assert_same_curve(got, want)
