"""The temporaries' breakdown: live buffers at the peak, read from XLA's live-range dump and the
optimized HLO, sorted by kind; and on a compiled tiny plan, beside the formula's terms."""

from jaxsys.tools import memory_breakdown as mb
from tests.tools.test_planner import zero_plan

HLO = """HloModule jit_train_step
ENTRY %main (param.1: f32[64,8], param.2: s32[2,4]) -> f32[] {
  %param.1 = f32[64,8]{1,0} parameter(0), metadata={op_name="state.params['embed']"}
  %ex = f32[2,4,64]{2,1,0} fusion(%param.1), kind=kLoop, metadata={op_name="jit(train_step)/jvp()/exp"}
  %pr = f32[2,3,4,4]{3,2,1,0} fusion(%ex), kind=kLoop, metadata={op_name="jit(train_step)/jvp(Transformer)/layer_0/attn/div"}
  %h = f32[2,4,32]{2,1,0} fusion(%ex), kind=kLoop, metadata={op_name="jit(train_step)/jvp(Transformer)/layer_0/mlp/tanh"}
  %g = f32[64,8]{1,0} all-gather(%param.1), dimensions={0}, metadata={op_name="jit(train_step)/jvp(Transformer)/all_gather"}
  %dw = f32[64,8]{1,0} fusion(%ex), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/dot_general"}
  ROOT %r = f32[] fusion(%dw), kind=kLoop
}
"""

LIVE = """HloLiveRange (max 9):
  Live ranges at 5 (peak):
    param.1{}: 2048 bytes (cumulative: 2048 bytes)
    ex{}: 2048 bytes (cumulative: 4096 bytes)
    pr{}: 384 bytes (cumulative: 4480 bytes)
    h{}: 1024 bytes (cumulative: 5504 bytes)
    g{}: 2048 bytes (cumulative: 7552 bytes)
    dw{}: 2048 bytes (cumulative: 9600 bytes)
    wide.param.3{1}: 16 bytes (cumulative: 9616 bytes)
  Stack trace breakdown for peak usage: 9 616 bytes
"""


def test_breakdown_sorts_the_live_buffers_by_kind():
    got = mb.breakdown(LIVE, HLO, {"vocab": 64, "embed": 8, "seq": 4, "kv_seq": 4})
    assert got["arguments"] == 2048  # the entry parameter: not a temporary
    assert (got["logits"], got["attention"], got["mlp"]) == (2048, 384, 1024)
    assert (got["gathered weights"], got["weight-shaped"], got["other"]) == (2048, 2048, 16)
    assert got["total temporaries"] == 9616 - 2048
    lines = mb.format_breakdown(got, {"logits": 2**20})
    assert any(line.split()[0] == "logits" and line.split()[-1] == "1.000" for line in lines)


def test_plan_breakdown_adds_up_to_xla_temporaries_and_names_gathered_weights():
    """On the compiled tiny ZeRO plans: the live buffers sum to XLA's temp size (less the heap's
    fragmentation); ZeRO-3 holds gathered weights and its formula counts them, ZeRO-1 neither."""
    for stage in (1, 3):
        p = zero_plan(stage)
        b, f = p.temp_breakdown, p.temp_formula
        assert 0.8 * p.memory["temp"] <= b["total temporaries"] <= p.memory["temp"], (b, p.memory)
        assert (b["gathered weights"] > 0) == (f["gathered weights"] > 0) == (stage == 3)
        terms = sum(v for k, v in f.items() if k != "total temporaries")
        assert f["total temporaries"] == terms == p.memory_formula["temporaries"]
