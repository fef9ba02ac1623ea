"""Bad inputs to every subcommand: one line naming the problem, exit code 2, no traceback; and
the run directories involved still resume and sample afterwards (a refused command must leave
its run directory byte for byte as it was; a damaged one, repaired as the message says, resumes).

Most cases call `jaxsys.cli.main.main` in this process (8 simulated CPU devices; far faster than
a fresh process per case); only what must act before JAX starts runs in a subprocess. One tiny
run is trained per module and copied for each case that touches a run directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from jaxsys.checkpoint import integrity
from jaxsys.cli.main import main, parse_args
from tests.helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0"]


def cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `jaxsys argv` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory and its sha256: what a refused command must not change."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 4 steps with checkpoints at steps 2 and 4 (trained once per module)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "train.steps=4", f"run_dir={run}"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    return run


def resumes_and_samples(capsys, run: Path, steps: int = 6, *extra: str) -> None:
    """The run continues from its last checkpoint (or, with none left, starts again) and
    `jaxsys sample` reads it."""
    had_checkpoints = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    code, out, err = cli(capsys, ["train", *TINY, f"train.steps={steps}", f"run_dir={run}", *extra])
    assert code == 0, out + err
    assert ("Resumed from checkpoint step" in out) == had_checkpoints and "Done:" in out
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--max-new-tokens", "4"])
    assert code == 0, err
    assert f"Loaded checkpoint step {steps} from" in err and out.startswith("ROMEO:")


# ----------------------------------------------------------------------------- the table


def _write(name: str, data: bytes) -> Callable[[Path, Path], None]:
    def setup(run: Path, files: Path) -> None:
        (files / name).write_bytes(data)
    return setup


def _ids(name: str, ids, tokenizer: str | None = None) -> Callable[[Path, Path], None]:
    def setup(run: Path, files: Path) -> None:
        np.asarray(ids, np.uint16).tofile(files / name)
        if tokenizer is not None:
            (files / name).with_suffix(".json").write_text(tokenizer)
    return setup


def _in_run(name: str, text: str | None) -> Callable[[Path, Path], None]:
    def setup(run: Path, files: Path) -> None:
        (run / name).unlink()
        if text is not None:
            (run / name).write_text(text)
    return setup


def _no_checkpoints(run: Path, files: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def _under_a_file(run: Path, files: Path) -> None:
    (files / "a_file").write_text("x")


@dataclass
class Case:
    """`argv` may use {run} (a copy of the trained run), {new} (a fresh run_dir) and {files} (a
    folder for data files made by `setup`). `words` must all be in the one error line."""

    argv: list[str]
    words: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = None
    repair: Callable[[Path], None] | None = None  # what the message told the user to do
    env: dict[str, str] = field(default_factory=dict)


def _delete(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


T = ["train", *TINY]
S = ["sample", "--run-dir", "{run}"]
A = ["sample", "--run-dir", "{files}"]  # refused by argparse: no run needed
TEXT = ("ROMEO: " * 200).encode()
CASES = {
    # config values (jaxsys/config/checks.py), through train and config
    "train lr negative": Case([*T, "optimizer.lr=-1", "run_dir={new}"], ("optimizer.lr", "> 0", "-1")),
    "train b1 above 1": Case([*T, "optimizer.b1=1.5", "run_dir={new}"], ("optimizer.b1", "[0, 1)")),
    "train b2 negative": Case([*T, "optimizer.b2=-0.1", "run_dir={new}"], ("optimizer.b2", "[0, 1)")),
    "train eps zero": Case([*T, "optimizer.eps=0", "run_dir={new}"], ("optimizer.eps", "> 0")),
    "train weight decay negative": Case([*T, "optimizer.weight_decay=-0.1", "run_dir={new}"],
                                        ("optimizer.weight_decay", "≥ 0")),
    "train grad clip negative": Case([*T, "optimizer.grad_clip=-1", "run_dir={new}"], ("optimizer.grad_clip",)),
    "train zero heads": Case([*T, "model.num_heads=0", "run_dir={new}"], ("model.num_heads must be ≥ 1",)),
    "train embed not divisible": Case([*T, "model.embed_dim=37", "run_dir={new}"],
                                      ("model.embed_dim=37", "not divisible by model.num_heads=4")),
    "train zero steps": Case([*T, "train.steps=0", "run_dir={new}"], ("train.steps must be ≥ 1",)),
    "train batch not int": Case([*T, "train.batch_size=abc", "run_dir={new}"], ("train.batch_size='abc'", "int")),
    "train warmup negative": Case([*T, "lr_schedule.warmup_steps=-5", "run_dir={new}"],
                                  ("lr_schedule.warmup_steps",)),
    "train min lr ratio": Case([*T, "lr_schedule.min_lr_ratio=2", "run_dir={new}"], ("lr_schedule.min_lr_ratio", "[0, 1]")),
    "train mesh axis zero": Case([*T, "mesh.data=0", "run_dir={new}"], ("mesh.data=0 is invalid",)),
    "train mesh of 3 on 8": Case([*T, "mesh.data=3", "run_dir={new}"], ("has 3 devices but 8 are available",)),
    "train key typo": Case([*T, "train.stpes=3"], ("Unknown config key 'train.stpes'", "Did you mean 'train.steps'")),
    "train override without =": Case([*T, "steps"], ("'steps' must look like key=value",)),
    "train unknown preset": Case(["train", "--preset", "tiniest"], ("Unknown preset 'tiniest'", "tiny")),
    "train allow_changes typo": Case([*T, "checkpoint.allow_changes=data.sorce", "run_dir={new}"],
                                     ("checkpoint.allow_changes", "data.sorce", "data.source")),
    "train sample tokens negative": Case([*T, "logging.sample_tokens=-1", "run_dir={new}"], ("logging.sample_tokens",)),
    "config embed not divisible": Case(["config", "--preset", "tiny", "model.embed_dim=37"],
                                       ("model.embed_dim=37", "not divisible")),
    "config lr negative": Case(["config", "optimizer.lr=-1"], ("optimizer.lr", "> 0")),
    "config lr infinite": Case(["config", "optimizer.lr=inf"], ("optimizer.lr", "finite", "inf")),
    "config weight decay nan": Case(["config", "optimizer.weight_decay=nan"], ("optimizer.weight_decay", "nan")),
    "config grad clip nan": Case(["config", "optimizer.grad_clip=nan"], ("optimizer.grad_clip", "nan")),
    # data (jaxsys/data/corpus.py)
    "data empty file": Case([*T, "data.source={files}/empty.txt", "run_dir={new}"], ("empty.txt", "is empty"),
                            _write("empty.txt", b"")),
    "data not utf-8": Case([*T, "data.source={files}/latin1.txt", "run_dir={new}"],
                           ("latin1.txt", "not UTF-8", "0xe9"), _write("latin1.txt", "café ".encode("latin-1") * 100)),
    "data a directory": Case([*T, "data.source={files}", "run_dir={new}"], ("is a directory",)),
    "data missing": Case([*T, "data.source={files}/nope.txt", "run_dir={new}"], ("nope.txt", "file not found")),
    "data bin of odd size": Case([*T, "data.source={files}/odd.bin", "run_dir={new}"],
                                 ("odd.bin", "101 bytes", "uint16"), _write("odd.bin", b"\x01" * 101)),
    "data empty bin": Case([*T, "data.source={files}/empty.bin", "run_dir={new}"], ("empty.bin", "is empty"),
                           _write("empty.bin", b"")),
    "data too short": Case([*T, "data.source={files}/short.txt", "run_dir={new}"],
                           ("short.txt", "fewer than model.seq_len+2=18"), _write("short.txt", b"ROMEO: hi")),
    "data id above vocab": Case([*T, "data.source={files}/big.bin", "run_dir={new}"],
                                ("contains token id 300", "model.vocab_size=256"), _ids("big.bin", [300] * 400)),
    "data bin without tokenizer, text prompt": Case(
        [*T, "data.source={files}/ids.bin", "logging.sample_tokens=8", "run_dir={new}"],
        ("logging.sample_prompt='ROMEO:'", "no tokenizer", "logging.sample_tokens=0"), _ids("ids.bin", [i % 200 for i in range(400)])),
    "data broken tokenizer beside bin": Case([*T, "data.source={files}/tok.bin", "run_dir={new}"],
                                             ("tok.json", "not a valid tokenizer file"),
                                             _ids("tok.bin", range(400), tokenizer="{not json")),
    # run directories (jaxsys/train/run_dir.py, checkpoint metadata)
    "run config.json broken (train)": Case([*T, "run_dir={run}"], ("config.json is not valid JSON", "delete it"),
                                           _in_run("config.json", "{\"model\": "), _delete("config.json")),
    "run config.json broken (sample)": Case(S, ("config.json is not valid JSON",),
                                            _in_run("config.json", "{\"model\": "), _delete("config.json")),
    "run config.json not a config (sample)": Case(S, ("config.json does not hold a jaxsys config", "colour"),
                                                  _in_run("config.json", '{"colour": 1}'), _delete("config.json")),
    "run tokenizer.json broken (sample)": Case(S, ("tokenizer.json", "not a tokenizer"),
                                               _in_run("tokenizer.json", '{"kind": "words"}'),
                                               _delete("tokenizer.json")),
    "run other embed_dim": Case([*T, "model.embed_dim=64", "run_dir={run}"],
                                ("model.embed_dim=32, but this run has model.embed_dim=64", "new run_dir")),
    "run other tokenizer": Case([*T, "data.tokenizer=char", "run_dir={run}"],
                                ("data.tokenizer='byte', but this run has data.tokenizer='char'",)),
    "run other embed_dim, no config.json": Case([*T, "model.embed_dim=64", "run_dir={run}"],
                                                ("'params.embed' has shape (256, 32) in the checkpoint but (256, 64)",),
                                                _in_run("config.json", None)),
    "run resume=false": Case([*T, "checkpoint.resume=false", "run_dir={run}"],
                             ("already holds checkpoints and checkpoint.resume=false",)),
    "run dir under a file": Case([*T, "run_dir={files}/a_file/run"], ("is not writable",), _under_a_file),
    # sample (jaxsys/inference/load.py and the CLI's argument ranges)
    "sample missing run dir": Case(["sample", "--run-dir", "{files}/nowhere"], ("nowhere", "not found")),
    "sample no checkpoints": Case(S, ("No checkpoint in",), _no_checkpoints),
    "sample temperature negative": Case([*A, "--temperature", "-1"], ("argument --temperature", "≥ 0")),
    "sample max-new-tokens negative": Case([*A, "--max-new-tokens", "-5"], ("argument --max-new-tokens", "≥ 0")),
    "sample max-new-tokens not int": Case([*A, "--max-new-tokens", "ten"], ("argument --max-new-tokens", "'ten'")),
    "sample top-k negative": Case([*A, "--top-k", "-1"], ("argument --top-k", "≥ 0")),
    "sample top-k above vocab": Case([*S, "--top-k", "1000"], ("top_k=1000", "vocabulary size 256")),
    "sample no run dir given": Case(["sample"], ("--run-dir", "required")),
    # plan
    "plan memory budget negative": Case(["plan", "--preset", "tiny", "--search", "--memory-budget", "-1"],
                                        ("argument --memory-budget", "> 0")),
    "plan unknown accelerator": Case(["plan", "--preset", "tiny", "--accelerator", "tpu9"], ("Unknown accelerator 'tpu9'",)),
    "plan devices zero": Case(["plan", "--preset", "tiny", "--devices", "0"], ("argument --devices", "≥ 1")),
    # devices and processes (refused by argparse, before JAX starts)
    "train devices -1": Case([*T, "--devices", "-1"], ("argument --devices", "≥ 1, got -1")),
    "train devices 0": Case([*T, "--devices", "0"], ("argument --devices", "≥ 1, got 0")),
    "train process id without the others": Case([*T, "run_dir={new}"], ("JAXSYS_PROCESS_ID is set", "jaxsys launch"),
                                                 env={"JAXSYS_PROCESS_ID": "0"}),
    # launch
    "launch zero processes": Case(["launch", "--processes", "0", "--", "train"], ("argument --processes", "≥ 1")),
    "launch no command": Case(["launch", "--processes", "2"], ("give the jaxsys command after --",)),
    "launch not a command": Case(["launch", "--processes", "2", "--", "trian"], ("'trian' is not a jaxsys command",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it(name, trained, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    files = tmp_path / "files"
    files.mkdir()
    run = tmp_path / "run"
    uses_run = any("{run}" in a for a in case.argv)
    if uses_run:
        shutil.copytree(trained, run)
    if case.setup is not None:
        case.setup(run, files)
    before = snapshot(run) if uses_run else {}
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = [a.format(run=run, new=tmp_path / "new", files=files) for a in case.argv]
    code, out, err = cli(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("jaxsys"), err
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    assert "Compiled" not in out  # refused before any compile
    if not uses_run:
        return
    assert snapshot(run) == before  # a refused command writes nothing into the run directory
    if case.repair is not None:  # the damaged run, repaired as the message says, works again
        case.repair(run)
        resumes_and_samples(capsys, run)
    # Otherwise it is byte for byte the trained run, which resumes and samples
    # (test_an_untouched_copy_resumes_and_samples).


def test_an_untouched_copy_resumes_and_samples(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    resumes_and_samples(capsys, run)


def test_devices_and_distributed_errors_before_jax_starts(tmp_path):
    """What needs a fresh process: `--distributed` with no cluster to join."""
    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith(("SLURM_", "OMPI_", "JAXSYS_", "KUBERNETES_"))}
    run = subprocess.run([sys.executable, "-m", "jaxsys", "train", "--distributed", *TINY, "run_dir=x"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert lines[-1].startswith("jaxsys: error: --distributed: no cluster found"), run.stderr
    for word in ("JAXSYS_COORDINATOR", "JAXSYS_NUM_PROCESSES", "JAXSYS_PROCESS_ID", "jaxsys launch"):
        assert word in lines[-1]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- run directories


def test_stuck_run_dir_of_issue_15(trained, tmp_path, capsys):
    """Delete config.json, resume with another model.embed_dim: refused by the checkpoint's
    metadata, and nothing written, so the right command resumes and sample works at once."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "config.json").unlink()
    code, out, err = cli(capsys, [*T, "train.steps=6", "model.embed_dim=64", f"run_dir={run}"])
    assert code == 2 and "'params.embed' has shape (256, 32) in the checkpoint but (256, 64)" in err
    assert not (run / "config.json").exists()  # the refused value was not written down
    resumes_and_samples(capsys, run)
    assert json.loads((run / "config.json").read_text())["model"]["embed_dim"] == 32


def test_resume_with_changed_settings_says_which_and_records_them(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    text = tmp_path / "other.txt"
    text.write_bytes(TEXT)
    code, out, err = cli(capsys, [*T, "train.steps=6", f"data.source={text}", f"run_dir={run}"])
    assert code == 2 and "checkpoint.allow_changes=data.source" in err  # changes what the checkpoints mean
    code, out, err = cli(capsys, [*T, "train.steps=6", "optimizer.lr=0.5", f"data.source={text}",
                                  "checkpoint.allow_changes=data.source", f"run_dir={run}"])
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("Resuming with changed settings"))
    for change in ("optimizer.lr 0.01 -> 0.5", "train.steps 4 -> 6", f"data.source shakespeare -> {text}",
                   "checkpoint.allow_changes () -> data.source", "config_changes.jsonl"):
        assert change in line
    rows = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 4
    assert rows[0]["changes"] == {"checkpoint.allow_changes": [[], ["data.source"]],
                                  "data.source": ["shakespeare", str(text)],
                                  "optimizer.lr": [0.01, 0.5], "train.steps": [4, 6]}
    assert json.loads((run / "config.json").read_text())["optimizer"]["lr"] == 0.5


def test_finished_run_with_new_settings_says_so_without_compiling(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {k: v for k, v in snapshot(run).items() if k != "curves.png"}  # the end-of-run plot
    code, out, err = cli(capsys, [*T, "train.steps=4", "lr_schedule.kind=wsd", f"run_dir={run}"])
    assert code == 0, err
    assert "Nothing to train" in out and "already at step 4 = train.steps; raise train.steps" in out
    assert "lr_schedule.kind constant -> wsd" in out and "not applied" in out
    assert "Compiled" not in out
    after = {k: v for k, v in snapshot(run).items() if k != "curves.png"}  # the end-of-run plot
    assert after == before and not (run / "config_changes.jsonl").exists()


def test_sample_skips_a_corrupt_checkpoint_like_training(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    victim = max((p for p in (run / "checkpoints" / "4").rglob("*") if p.is_file() and "/d/" in str(p)),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--max-new-tokens", "4"])
    assert code == 0 and "Traceback" not in err, err
    assert "Checkpoint step 4" in err and "corrupted data" in err and "Moved to" in err
    assert f"Loaded checkpoint step 2 from {run / 'checkpoints'}" in err
    assert out.startswith("ROMEO:") and "Loaded" not in out  # stdout is only the sample
    assert (run / "rejected_checkpoints" / "4").is_dir()
    resumes_and_samples(capsys, run)


def test_sample_leaves_a_step_without_manifest_in_place(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "4" / integrity.MANIFEST).unlink()  # perhaps a training still finishing it
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--max-new-tokens", "4"])
    assert code == 0, err
    assert "skipped (left in place" in err and "Loaded checkpoint step 2" in err
    assert (run / "checkpoints" / "4").is_dir() and not (run / "rejected_checkpoints").exists()


def test_bin_without_tokenizer_samples_token_ids(tmp_path, capsys):
    np.asarray(list(range(200)) * 4, np.uint16).tofile(tmp_path / "ids.bin")
    run = tmp_path / "run"
    code, out, err = cli(capsys, ["train", "--preset", "tiny", "train.steps=2", "logging.progress=false",
                                  "logging.tensorboard=false", "logging.sample_tokens=4",
                                  "logging.sample_prompt=1 2 3", f"data.source={tmp_path / 'ids.bin'}",
                                  f"run_dir={run}"])
    assert code == 0, err
    sample = out.split("-" * 60 + "\n")[1].strip()
    assert sample.startswith("1 2 3 ") and all(x.isdigit() for x in sample.split())  # ids, not bytes
    assert json.loads((run / "tokenizer.json").read_text()) == {"kind": "ids"}
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--prompt", "7 8", "--max-new-tokens", "3"])
    assert code == 0, err
    assert "no tokenizer" in err and len(out.split()) == 5 and out.startswith("7 8 ")
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--prompt", "ROMEO:"])
    assert code == 2 and "token ids" in err


# ----------------------------------------------------------------------------- the command line


def test_flags_anywhere_among_the_overrides():
    args = parse_args(["train", "train.steps=2", "--devices", "2", "run_dir=x", "--preset", "tiny"])
    assert (args.command, args.devices, args.preset) == ("train", 2, "tiny")
    assert args.overrides == ["train.steps=2", "run_dir=x"]
    launch = parse_args(["launch", "--processes", "2", "--", "train", "--devices", "2", "train.steps=2"])
    assert launch.processes == 2 and launch.command_args == ["--", "train", "--devices", "2", "train.steps=2"]


def test_sample_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # as one line, however argparse wraps it
    for option, words in (("--run-dir", "checkpoint"), ("--prompt", "text"), ("--max-new-tokens", "≥ 0"),
                          ("--temperature", "greedy"), ("--top-k", "likeliest"), ("--seed", "seed")):
        assert option in text and words in text


def test_nanogpt_baseline_without_torch_is_one_line():
    pytest.importorskip("numpy")
    if any((Path(p) / "torch").is_dir() for p in sys.path):
        pytest.skip("torch is installed")
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "nanogpt_baseline.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "pip install torch==2.13.0" in run.stderr


def test_launch_drops_only_gloo_connection_lines(capsys):
    from jaxsys.cli.launch import launch
    script = ("print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1');"
              "print('[Gloo] something else'); print('kept')")
    assert launch(1, [sys.executable, "-c", script]) == 0
    out = capsys.readouterr().out
    assert "is connected to" not in out and "[0] [Gloo] something else" in out and "[0] kept" in out


def test_mesh_hint_counts_every_process():
    from jaxsys.config import ConfigError, MeshConfig
    from jaxsys.parallel.mesh import resolve_mesh_shape
    with pytest.raises(ConfigError, match=r"--devices 8` simulates 8 devices"):
        resolve_mesh_shape(MeshConfig(data=4, fsdp=2), 4)
    with pytest.raises(ConfigError, match=r"jaxsys launch --processes 2 -- train --devices 4` gives 8 devices"):
        resolve_mesh_shape(MeshConfig(data=4, fsdp=2), 4, num_processes=2)
    with pytest.raises(ConfigError, match=r"with 2 processes the device count is a multiple of 2"):
        resolve_mesh_shape(MeshConfig(data=3), 4, num_processes=2)


def test_tensorboard_gets_no_nan_scalars(tmp_path, caplog):
    from jaxsys.train.metrics import MetricWriter
    writer = MetricWriter(tmp_path, tensorboard=True)
    writer.write(3, {"loss": float("nan"), "lr": 0.1})
    writer.close()
    assert "NaN or Inf" not in caplog.text
    assert np.isnan(json.loads((tmp_path / "metrics.jsonl").read_text())["loss"])  # kept in the JSONL
