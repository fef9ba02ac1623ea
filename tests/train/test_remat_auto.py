"""`model.remat=auto` picks the first policy (least recompute) whose compiled peak fits the
budget, from the same compiled bytes a table of every policy gives; an impossible budget and
host offload on the CPU are refused before anything trains."""

import re

import jax
import pytest

from jaxsys.cli.main import _resolve, parse_args
from jaxsys.config import ConfigError
from jaxsys.parallel.mesh import make_mesh
from jaxsys.train import remat_auto
from jaxsys.train.loop import train
from tests.helpers import tiny_cfg

_TABLE: dict = {}


def _mesh(cfg):
    return make_mesh(cfg.mesh, jax.devices()[:1])


def peak_table() -> dict[str, int]:
    """The remat table of the tiny model: each policy compiled on its own (the reference)."""
    if not _TABLE:
        for policy in remat_auto.AUTO_ORDER:
            cfg = tiny_cfg(f"model.remat={policy}")
            _, compiled, _ = remat_auto.resolve(cfg, _mesh(cfg))
            _TABLE[policy] = remat_auto.peak_bytes(compiled)
    return _TABLE


def _auto(budget_bytes: int, *overrides: str):
    cfg = tiny_cfg("model.remat=auto", f"train.memory_budget={budget_bytes / 2**30!r}", *overrides)
    return remat_auto.resolve(cfg, _mesh(cfg))


@pytest.mark.slow  # 4 compiles + 3 re-lowerings: ~57 s CPU with the test below (over the ~30 s budget)
def test_auto_picks_the_first_policy_the_table_says_fits():
    table = peak_table()
    assert table["none"] > table["full"], table  # remat must move bytes, or this test means nothing
    expected = lambda budget: next(p for p in remat_auto.AUTO_ORDER if table[p] <= budget)  # noqa: E731
    roomy, tight = table["none"], table["dots"]  # tight: the second candidate (fewer compiles)
    assert expected(roomy) == "none" != expected(tight)
    for budget in (roomy, tight):
        s, compiled, tried = _auto(budget)
        assert s.cfg.model.remat == expected(budget)
        assert remat_auto.peak_bytes(compiled) == table[expected(budget)] <= budget
        # every candidate before the pick was tried and was over the budget
        order = remat_auto.AUTO_ORDER
        assert [t.policy for t in tried] == list(order[:order.index(expected(budget)) + 1])
        assert all(t.peak == table[t.policy] for t in tried) and all(t.peak > budget for t in tried[:-1])


def test_impossible_budget_errors_before_training(tmp_path):
    """A budget of one byte: every candidate is compiled, in order, and the error names the
    smallest of their peaks before anything trains (the peaks equal each policy compiled on its
    own: `test_auto_picks_the_first_policy_the_table_says_fits`)."""
    cfg = tiny_cfg("model.remat=auto", f"train.memory_budget={1 / 2**30!r}", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"no policy fits .*raise --memory-budget") as err:
        train(cfg, jax.devices()[:1])
    msg = str(err.value)
    tried = dict(re.findall(r"(\w+) ([0-9.]+) MiB", msg.split("tried ")[1]))
    assert list(tried) == list(remat_auto.AUTO_ORDER)
    smallest = min(tried, key=lambda p: float(tried[p]))
    assert f"smallest peak: {smallest}, {tried[smallest]} MiB" in msg and len(set(tried.values())) > 1
    assert not (tmp_path / "run" / "config.json").exists()  # nothing was accepted, nothing trained


@pytest.mark.parametrize("overrides, match", [
    (("model.remat=auto",), "needs a per-device budget to fit: pass --memory-budget"),
    (("train.offload=optimizer",), "train.offload=optimizer needs a GPU or TPU"),
    (("model.remat=offload_dots_no_batch",), "offload_dots_no_batch needs a GPU or TPU"),
    (("train.memory_budget=-1",), "train.memory_budget must be ≥ 0"),
])
def test_refused_on_cpu_before_compile(overrides, match):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=match):
        remat_auto.resolve(cfg, _mesh(cfg))


def test_memory_budget_flag_sets_the_budget_auto_uses():
    for command in ("train", "plan"):
        cfg = _resolve(parse_args([command, "--preset", "tiny", "--memory-budget", "1.5", "model.remat=auto"]))
        assert cfg.train.memory_budget == 1.5 and cfg.model.remat == "auto"


@pytest.mark.slow  # 2 compiles and 4 steps (~40 s on the loaded 2-core machine); not asked of the default run
def test_offload_plumbing_trains_like_no_offload_with_the_cpu_refusal_lifted(monkeypatch):
    """The GPU path's plumbing, on the CPU with its refusal lifted (XLA:CPU accepts pinned_host
    but moves nothing, so this checks shardings and numerics, not memory): the AdamW moments live
    in pinned_host before and after a step, the offloading remat policy traces, and 2 steps give
    the losses of the same model without offload, bitwise."""
    from jaxsys.data import batches, corpus as corpus_lib
    from jaxsys.train import state as state_lib, step as step_lib
    monkeypatch.setattr(state_lib, "check_memory_platform", lambda cfg, platform: None)
    runs = {}
    for name, overrides in (("plain", ()), ("offload", ("train.offload=optimizer", "model.remat=offload_dots_no_batch"))):
        cfg = tiny_cfg(*overrides)
        s = state_lib.setup(cfg, _mesh(cfg))
        state, step = state_lib.init_state(s, 0), step_lib.compile_train_step(s)
        corpus = corpus_lib.load_corpus(cfg.data)
        losses = []
        for k in range(2):
            batch = batches.global_batch(corpus.train, 0, k, "train", cfg.train.batch_size, cfg.model.seq_len,
                                         s.batch_sharding)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        kinds = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(state.opt_state) if x.size > 1}
        runs[name] = (losses, kinds)
    assert runs["plain"][1] == {"device"} and runs["offload"][1] == {"pinned_host"}
    assert runs["offload"][0] == runs["plain"][0] and runs["plain"][0][0] != runs["plain"][0][1]
