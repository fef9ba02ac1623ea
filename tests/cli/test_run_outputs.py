"""What a `jaxsys train` leaves besides checkpoints: JSON or quiet console lines, a profiler
trace, the end-of-run curves.png and the experiment trackers' offline files. One JSON-logged run
(with a profile and every tracker that is installed) and one quiet run, both in this process."""

import contextlib
import importlib.util
import io
import json
import struct

import pytest

from jaxsys.cli.main import main
from jaxsys.config.checks import TRACKERS

INSTALLED = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "json-run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--preset", "tiny", "--log-format", "json", "train.steps=3", "checkpoint.every=3",
                     "logging.profile_steps=2,3", f"logging.trackers={','.join(INSTALLED)}",
                     f"run_dir={run_dir}"])
    assert code == 0
    return run_dir, out.getvalue().splitlines()


def test_json_log_format_prints_one_event_object_per_line(json_run):
    run_dir, lines = json_run
    events = [json.loads(line) for line in lines]  # every stdout line is JSON
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["start", "compiled"] and kinds.count("step") == 3 and kinds.count("eval") == 2
    assert kinds[-4:] == ["done", "plot" if HAVE_MATPLOTLIB else "plot_skipped", "sample", "timings"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["loss"] > 0 and e["lr"] > 0 for e in steps)
    done, last_eval = events[kinds.index("done")], [e for e in events if e["event"] == "eval"][-1]
    assert done["val_loss"] == last_eval["val_loss"] and done["final_step"] == 3 and done["steps"] == 3
    assert events[0]["run_dir"] == str(run_dir) and events[0]["devices"] == 8
    assert events[-2]["message"].startswith("ROMEO:")
    timings = events[-1]  # the breakdown: every phase measured, adding up to the total printed
    phases = ("imports", "data", "setup", "init", "compile", "training", "eval", "checkpoints", "sample")
    assert all(timings[f"{p}_seconds"] > 0 for p in phases)
    total = float(timings["message"].rsplit("total ", 1)[1].rstrip("s"))
    assert total == pytest.approx(sum(v for k, v in timings.items() if k.endswith("_seconds")), abs=0.06)


def test_profile_steps_write_a_trace(json_run):
    run_dir, lines = json_run
    assert list((run_dir / "profile").rglob("*.xplane.pb"))  # TensorBoard's profile plugin reads these
    assert list((run_dir / "profile").rglob("perfetto_trace.json.gz"))
    (event,) = [json.loads(line) for line in lines if '"event": "profile"' in line]
    assert (event["first"], event["last"]) == (2, 3)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs the plot extra (matplotlib)")
def test_the_end_of_a_run_draws_curves_png(json_run):
    run_dir, _ = json_run
    data = (run_dir / "curves.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def _last(run_dir, key: str) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r][-1][key]


@pytest.mark.skipif("wandb" not in INSTALLED, reason="needs the wandb extra")
def test_wandb_offline_run_holds_the_metrics(json_run):
    run_dir, _ = json_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # what `wandb sync` uploads
    (log,) = offline.glob("run-*.wandb")
    data = log.read_bytes()  # W&B's record log stores each value as JSON text
    for key in ("loss", "val_loss", "lr"):
        assert key.encode() in data and json.dumps(_last(run_dir, key)).encode() in data


@pytest.mark.skipif("swanlab" not in INSTALLED, reason="needs the swanlab extra")
def test_swanlab_offline_log_holds_the_metrics(json_run):
    run_dir, lines = json_run
    (log,) = (run_dir / "swanlog").glob("run-*/run-*.swanlab")  # what `swanlab sync` uploads
    data = log.read_bytes()  # SwanLab's record log stores each value as a float64
    for key in ("loss", "val_loss", "lr"):
        assert key.encode() in data and struct.pack("<d", _last(run_dir, key)) in data
    assert not [line for line in lines if line.startswith("swanlab")]  # its notices went to stderr


def test_quiet_from_a_saved_config_prints_only_the_final_line(json_run, tmp_path, capsys):
    run_dir, _ = json_run
    quiet_dir = tmp_path / "quiet"
    assert main(["train", "--config", str(run_dir / "config.json"), "--quiet", "train.steps=2",
                 "logging.format=text", "logging.trackers=", "logging.profile_steps=", f"run_dir={quiet_dir}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [line for line in captured.out.splitlines() if line.startswith("Done: 2 steps")]
    assert len(captured.out.splitlines()) == 1
    assert "it/s" not in captured.err and "step/s" not in captured.err  # no progress bar
    saved = json.loads((quiet_dir / "config.json").read_text())
    assert saved["preset"] == "tiny" and saved["train"]["steps"] == 2 and saved["logging"]["quiet"] is True
    assert saved["logging"]["progress"] is False
    assert (quiet_dir / "curves.png").exists() == HAVE_MATPLOTLIB  # drawn, without a line saying so
