"""The planner's numbers: Megatron collectives per block, ZeRO memory per device, layout errors,
the `jaxsys plan` command and the layout search."""

import json

import jax
import pytest

from jaxsys.cli.main import main as cli_main
from jaxsys.config import ConfigError, apply_overrides
from jaxsys.tools import hlo_stats, planner
from tests.helpers import grad_hlo, layout, tiny_cfg

TP4 = ("mesh.data=2", "mesh.tensor=4", "model.num_heads=8")


def _per_block(sp: bool):
    """Collectives of one transformer block, by kind: (count, wire bytes). The 3 layers are a
    `scan`, so a collective of the block sits in the loop body and runs 3 times per step."""
    cfg = tiny_cfg(*TP4, "model.num_layers=3", "model.scan_layers=true", f"mesh.sequence_parallel={sp}")
    s = layout(cfg)
    b = cfg.train.batch_size // s.mesh.shape["data"]
    act = b * cfg.model.seq_len * cfg.model.embed_dim * 4  # one [b, T, D] fp32 activation
    by_kind: dict = {}
    for c in hlo_stats.collectives(grad_hlo(s), s.mesh):
        if c.axes == ("tensor",) and c.payload_bytes == act and c.count == 3:
            n, w = by_kind.get(c.kind, (0, 0.0))
            by_kind[c.kind] = (n + 1, w + c.wire_bytes)
    return by_kind, act


def test_megatron_collectives_per_block_tensor4():
    """Megatron: one all-reduce of [b, T, D] per sub-layer forward and one backward (4 per
    block); with SP the same wire bytes as 4 all-gathers + 4 reduce-scatters."""
    plain, act = _per_block(sp=False)
    assert plain == {"all-reduce": (4, pytest.approx(4 * 2 * 3 / 4 * act))}
    sp, _ = _per_block(sp=True)
    assert set(sp) == {"all-gather", "reduce-scatter"}
    assert sp["all-gather"][0] == 4 and sp["reduce-scatter"][0] == 4
    assert sp["all-gather"][1] + sp["reduce-scatter"][1] == pytest.approx(plain["all-reduce"][1])


_PLANS: dict = {}


def zero_plan(stage: int) -> planner.Plan:
    # embed_dim 64: the few parameters without an embed axis (biases) stay replicated.
    if stage not in _PLANS:
        _PLANS[stage] = planner.plan(tiny_cfg("mesh.data=1", "mesh.fsdp=8", f"mesh.zero_stage={stage}",
                                              "model.embed_dim=64", "model.num_layers=1"))
    return _PLANS[stage]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_state_bytes_within_10_percent_of_formula(stage):
    p = zero_plan(stage)
    assert abs(p.state_bytes - p.state_formula) <= 0.10 * p.state_formula, (p.memory, p.memory_formula)
    # The shardings' params + moments are what the compiled step takes as arguments (plus int32
    # step counters).
    assert 0 <= p.memory["state_compiled"] - p.memory["params"] - p.memory["optimizer"] < 64
    n = p.layout["params"]
    assert p.state_formula == pytest.approx({1: 4 * n + 4 * n + 8 * n / 8, 2: 4 * n + (4 + 8) * n / 8,
                                             3: 16 * n / 8}[stage])


def test_rank_orders_by_step_time_and_drops_over_budget():
    plans = [zero_plan(stage) for stage in (1, 2, 3)]
    assert plans[0].state_bytes > plans[1].state_bytes > plans[2].state_bytes
    kept, over = planner.rank(plans, budget=float("inf"))
    assert [p.roofline["step_s"] for p in kept] == sorted(p.roofline["step_s"] for p in plans)
    # ZeRO-3 holds the least; with one microbatch, stages 1 and 2 compile to the same program
    # (both reduce-scatter once), so they may tie.
    budget = min(p.memory["peak"] for p in plans)
    assert plans[2].memory["peak"] == budget < max(p.memory["peak"] for p in plans)
    kept, over = planner.rank(plans, budget)
    assert plans[2] in kept and len(kept) + len(over) == 3 and len(over) >= 1
    assert all("> budget" in why for _, why in over)
    assert all(p.memory["peak"] <= budget for p in kept)


def test_candidate_layouts_for_8_devices():
    names = {planner.layout_name(apply_overrides(tiny_cfg(), o))
             for o in planner.candidate_layouts(8, tiny_cfg())}
    # tensor 1: data=8 + 3 fsdp sizes × 4 stages; tensor 2: 1 + 2 × 4, ×2 for SP; tensor 4:
    # (1 + 4) × 2; tensor 8: 2.
    assert len(names) == 13 + 18 + 10 + 2
    assert "fsdp=2 × tensor=4 zero=1 sp" in names and "data=8" in names


@pytest.mark.parametrize("overrides,message", [
    (("mesh.data=2", "mesh.tensor=4", "model.num_heads=2"), "model.num_heads=2 is not divisible by the tensor axis"),
    (("mesh.data=2", "mesh.tensor=4", "model.num_heads=8", "model.family=llama", "model.num_kv_heads=2"),
     "model.num_kv_heads=2 is not divisible by the tensor axis"),
    (("mesh.data=1", "mesh.tensor=8", "model.num_heads=8", "model.vocab_size=260"),
     "model.vocab_size=260 is not divisible by the tensor axis"),
    (("mesh.data=2", "mesh.tensor=4", "model.num_heads=8", "model.seq_len=14", "mesh.sequence_parallel=true"),
     "model.seq_len=14 is not divisible by mesh.tensor=4"),
    (("mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=4"), "mesh.zero_stage=4 is not one of 0, 1, 2, 3"),
    # ZeRO-1 splits the moments over fsdp, so embed must divide even though params do not split.
    (("mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1", "model.embed_dim=36", "model.num_heads=4"),
     r"'embed', size 36\) is not divisible by mesh axis fsdp=8"),
])
def test_invalid_layouts_rejected(overrides, message):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        planner.plan(cfg)


def test_zero0_allows_any_embed_width():
    """Stage 0 shards nothing over fsdp, so a width fsdp does not divide is fine."""
    s = layout(tiny_cfg("mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=0", "model.embed_dim=36",
                        "model.num_heads=4"))
    assert s.state_sharding.params["layers"]["attn"]["wq"].spec[1] is None


def test_cli_plan_json(capsys):
    assert cli_main(["plan", "--preset", "tiny", "--json", "mesh.data=2", "mesh.fsdp=4",
                     "mesh.zero_stage=2", "model.num_layers=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["fsdp"] == 4 and out["layout"]["zero_stage"] == 2
    assert out["memory"]["grads"] < out["memory"]["params"]  # ZeRO-2: grads split, params not
    kinds = {(r["kind"], tuple(r["axes"])) for r in out["collectives"]}
    assert ("all-gather", ("fsdp",)) in kinds  # updated parameters gathered over fsdp
    assert out["roofline"]["step_s"] > 0 and out["flops"] > 0


@pytest.mark.slow
def test_search_ranks_layouts_and_applies_budget():
    cfg = tiny_cfg("model.num_layers=1", "model.num_heads=8")
    plans, rejected = planner.search(cfg, jax.devices()[:2])
    names = [p.layout["name"] for p in plans]
    assert len(names) == len(set(names)) == 7 and not rejected  # data=2; fsdp=2 × zero 0–3; tensor=2 ± SP
    steps = [p.roofline["step_s"] for p in plans]
    assert steps == sorted(steps)


def test_hlo_stats_reads_all_replica_group_spellings_and_loop_counts():
    """XLA writes replica groups three ways; each must map back to the same mesh axes."""
    from jaxsys.config import MeshConfig
    from jaxsys.parallel.mesh import make_mesh
    mesh = make_mesh(MeshConfig(data=2, tensor=4))  # positions: data-major, tensor-minor
    hlo = """
%body (p: f32[4]) -> f32[4] {
  %a = f32[8,16]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %b = f32[8,16]{1,0} all-reduce(%p), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %w = f32[4] while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = (f32[2,4]{1,0}, f32[]) all-reduce(%x, %y), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %d = f32[4,8]{1,0} reduce-scatter(%x), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %e = f32[16]{0} all-gather(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}
}
"""
    got = [(c.kind, c.axes, c.count, c.payload_bytes, c.combined) for c in hlo_stats.collectives(hlo, mesh)]
    assert got == [("all-reduce", ("tensor",), 3, 512, 1), ("all-reduce", ("data",), 3, 512, 1),
                   ("all-reduce", ("tensor",), 1, 32, 2), ("all-reduce", ("tensor",), 1, 4, 2),
                   ("reduce-scatter", ("tensor",), 1, 4 * 8 * 4 * 4, 1),
                   ("all-gather", ("tensor",), 1, 64, 1)]


def _fake_plan(name: str, peak: float, step_s: float, axes: tuple[str, ...]) -> planner.Plan:
    kinds = {k: 0.0 for k in hlo_stats.KINDS}
    return planner.Plan(
        layout={"name": name, "devices": 2, "params": 10, "accelerator": "H100 SXM", "grad_sync": "explicit"},
        memory={"params": 40.0, "grads": 40.0, "optimizer": 80.0, "state_compiled": 160.0, "temp": 1.0, "peak": peak},
        memory_formula={"params": 40.0, "grads": 40.0, "optimizer": 80.0, "activations": 1.0},
        collectives=[{"kind": "all-reduce", "axes": list(axes), "count": 1, "payload_bytes": 40, "wire_bytes": 40.0}],
        comm_bytes={**kinds, "all-reduce": 40.0}, comm_formula=kinds, flops=1e6, flops_formula=1e6,
        roofline={"step_s": step_s, "compute_s": 0.0, "memory_s": 0.0, "comm_s": 0.0, "step_overlapped_s": 0.0},
        compile_s=0.1)


def test_search_table_shows_equal_layouts_as_one_row_and_plan_shows_grad_sync():
    """fsdp=2 zero=0 compiles to what data=2 does (its all-reduce only runs over another axis
    name): one row naming both; a layout that differs keeps its own row."""
    plans = [_fake_plan("data=2", 200.0, 1e-3, ("data",)), _fake_plan("fsdp=2 zero=0", 200.0, 1e-3, ("fsdp",)),
             _fake_plan("fsdp=2 zero=3", 120.0, 2e-3, ("fsdp",))]
    rows = planner.format_search(plans, []).splitlines()
    assert len(rows) == 4 and "data=2 = fsdp=2 zero=0" in rows[1] and "fsdp=2 zero=3" in rows[2]
    assert rows[2].split()[0] == "2" and rows[3].startswith("(a = b")
    assert "grad_sync explicit" in planner.format_plan(plans[0]).splitlines()[0]


def test_search_reports_progress_and_refuses_a_bad_budget(monkeypatch):
    with pytest.raises(ConfigError, match="memory budget must be > 0"):
        planner.search(tiny_cfg(), jax.devices()[:2], memory_budget=-1.0)
    seen = []
    monkeypatch.setattr(planner, "plan", lambda c, devices, accelerator: _fake_plan(planner.layout_name(c), 1.0, 1.0, ()))
    planner.search(tiny_cfg(), jax.devices()[:2], progress=seen.append)
    assert seen[0] == "planning 1/7: data=2 ..." and len(seen) == 7  # data; fsdp × zero 0–3; tensor ± SP


MLA = ("model.family=llama", "model.attention_kind=mla", "model.kv_lora_rank=16", "model.qk_nope_dim=4",
       "model.qk_rope_dim=4", "model.v_head_dim=6")


@pytest.mark.parametrize("q_lora", [20, pytest.param(0, marks=pytest.mark.slow)])
def test_mla_tensor_all_reduces_equal_the_closed_form(q_lora):
    """MLA at data=2 × tensor=4: the tensor all-reduces of loss + gradients (3 layers in a scan)
    equal the closed form, whose latent cotangents replace (query latent) or add to (none)
    an all-reduce of x per block. Q + U + Y = 40 != D = 32, so the two forms differ."""
    cfg = tiny_cfg(*TP4, *MLA, f"model.q_lora_rank={q_lora}", "model.num_layers=3", "model.scan_layers=true")
    s = layout(cfg)
    measured = sum(c.wire_bytes * c.count for c in hlo_stats.collectives(grad_hlo(s), s.mesh)
                   if c.axes == ("tensor",) and c.kind == "all-reduce")
    formula = planner.closed_form_comm(cfg, dict(s.mesh.shape), tp_param_bytes=0.0)["all-reduce"]
    mha = planner.closed_form_comm(apply_overrides(cfg, ["model.attention_kind=mha", "model.kv_lora_rank=0",
                                                         "model.q_lora_rank=0", "model.qk_nope_dim=0",
                                                         "model.qk_rope_dim=0", "model.v_head_dim=0"]),
                                   dict(s.mesh.shape), tp_param_bytes=0.0)["all-reduce"]
    assert measured == pytest.approx(formula) and formula != pytest.approx(mha)
