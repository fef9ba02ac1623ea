"""`jaxsys plan` shows what remat and host offload move: model.remat=auto resolved the way
training resolves it, and the optimizer bytes train.offload=optimizer would put on the host."""

import jax

from jaxsys.tools import planner
from tests.helpers import tiny_cfg


def test_plan_shows_the_auto_pick_and_the_offloaded_optimizer_bytes():
    # scan_layers=false: the program auto chooses on is the one the planner compiles (one compile)
    cfg = tiny_cfg("model.remat=auto", "train.memory_budget=1.0", "train.offload=optimizer", "model.scan_layers=false")
    p = planner.plan(cfg, jax.devices()[:1])
    assert p.remat["configured"] == "auto" and p.remat["compiled"] == "none"  # 1 GiB: the first fits
    assert [t["policy"] for t in p.remat["tried"]] == ["none"]  # tried as training compiles it (scanned)
    # the AdamW moments: the optimizer state but its few scalar counters
    assert 0 < p.memory["optimizer"] - p.offload["optimizer"] < 64
    assert p.offload["compiled_host_temp"] == 0  # on the CPU the offload was planned, not compiled
    text = planner.format_plan(p)
    assert "remat: none (auto, first to fit of: none peak" in text and "to host: optimizer" in text
