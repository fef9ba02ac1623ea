"""Loss curves from metrics.jsonl (`jaxsys plot`), on synthetic run directories."""

import json
import math

import pytest

from jaxsys.cli.main import main
from jaxsys.config import ConfigError
from jaxsys.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, scale: float, steps: int = 40):
    """A run directory whose metrics.jsonl looks like training's: loss and lr every step,
    val_loss every 10 steps, one step written twice (a resume after a rollback)."""
    path.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": scale * (1 + 4 * math.exp(-s / 10)), "grad_norm": 1.0,
                     "lr": 1e-3 * min(1.0, s / 5)})
        if s % 10 == 0:
            rows.append({"step": s, "val_loss": scale * (1.2 + 4 * math.exp(-s / 10))})
    rows.append({"step": 5, "loss": 99.0, "lr": 1e-3})  # the last value of a step wins
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 41, \"lo")
    return path


def test_read_curves_keeps_the_last_value_of_each_step(tmp_path):
    curves = plot.read_curves(_fake_run(tmp_path / "a", 1.0))
    assert [s for s, _ in curves["loss"]] == list(range(1, 41))  # sorted; the cut-off last line ignored
    assert dict(curves["loss"])[5] == 99.0
    assert [s for s, _ in curves["val_loss"]] == [10, 20, 30, 40]


@pytest.mark.skipif(not plot.have_matplotlib(), reason="needs the plot extra (matplotlib)")
def test_plot_command_compares_runs_in_one_png(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "baseline", 1.0), _fake_run(tmp_path / "wider", 0.8)
    out = tmp_path / "compare.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert f"Wrote {out}" in capsys.readouterr().out
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (880, 715)  # 8 × 6.5 inches at 110 dpi
    assert main(["plot", str(a)]) == 0  # one run: RUN_DIR/curves.png
    assert (a / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[plot\]"'):
        plot.plot_runs([_fake_run(tmp_path / "a", 1.0)], tmp_path / "x.png")
