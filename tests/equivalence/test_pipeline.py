"""Pipeline executor: loss and every gradient equal the non-pipelined model; the executed table's
bubble equals the closed forms; stash memory from the compiled program; clear errors.

Tolerance: fp32, atol 2e-6 on loss and gradients (as tests/equivalence/test_parallel.py): the
pipeline sums the per-microbatch gradients in a different order than one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import ConfigError
from jaxsys.parallel.mesh import make_mesh
from jaxsys.parallel.pipeline import program
from jaxsys.parallel.pipeline.executor import pipeline_grads
from jaxsys.parallel.rules import with_shardings
from jaxsys.train.state import abstract_state, init_state, setup
from jaxsys.parallel import context
from jaxsys.parallel.install import parallelize
from jaxsys.train.step import compile_train_step
from tests.helpers import host_batch, layout, loss_and_grads, max_abs_diff, tiny_cfg

V = {"interleaved-1f1b": 2}


def pipe_cfg(schedule: str, p: int, m: int, *extra: str, rows: int = 2):
    v = V.get(schedule, 1)
    return tiny_cfg(f"model.num_layers={p * v}", f"mesh.pipe={p}", f"pipeline.schedule={schedule}",
                    f"pipeline.microbatches={m}", f"pipeline.virtual_stages={v}",
                    f"train.batch_size={rows * m}", *extra)


def run_pipeline(cfg, params, batch):
    """(loss, grads, executed ops [ticks, p], program) of the pipelined loss on cfg's mesh."""
    s = layout(cfg)
    prog = program.compile_schedule(program.make_schedule(cfg, cfg.mesh.pipe))
    reorder = lambda b: context.reorder_batch(cfg, s.mesh.shape["context"], b)  # noqa: E731 (zigzag)
    fn = jax.jit(lambda pa, b: pipeline_grads(cfg, s.mesh, prog, pa, reorder(b)),
                 in_shardings=(s.state_sharding.params, s.batch_sharding))
    with parallelize(s.mesh, s.activation_rules, cfg.context_parallel):  # (context's attention)
        loss, grads, ops = fn(jax.device_put(params, s.state_sharding.params),
                              jax.device_put(batch, s.batch_sharding))
    return float(loss), jax.device_get(grads), np.asarray(ops), prog


def check_equal_to_one_device(schedule, p, m, *layout_overrides, rows=2):
    cfg = pipe_cfg(schedule, p, m, *(layout_overrides or ("mesh.data=1",)), rows=rows)
    one = layout(pipe_cfg(schedule, p, m, "mesh.data=1", "mesh.pipe=1", rows=rows))
    params = jax.device_get(init_state(one, seed=0).params)
    batch = host_batch(one.cfg)
    ref_loss, ref_grads = loss_and_grads(one, params, batch)
    loss, grads, ops, prog = run_pipeline(cfg, params, batch)
    assert abs(loss - ref_loss) < 2e-6, (loss, ref_loss)
    assert max_abs_diff(grads, ref_grads) < 2e-6
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3
    # Every tick of the table ran as written, so the bubble counted from what ran is the
    # table's, and equals the closed form.
    assert ops.shape == (prog.ticks, p)
    assert np.array_equal(ops, prog.op)
    v = V.get(schedule, 1)
    bubble = program.executed_bubble(ops)
    if schedule == "zb-h1":
        assert bubble < (p - 1) / (m + p - 1)
    else:
        assert bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


DEFAULT = [("gpipe", 2, 4), ("1f1b", 4, 4), ("zb-h1", 2, 4), ("interleaved-1f1b", 2, 4)]
FULL = [(sch, p, m) for sch in ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b") for p in (2, 4, 8)
        for m in (p, 2 * p, 4 * p) if (sch, p, m) not in DEFAULT]


@pytest.mark.parametrize("schedule,p,m", DEFAULT)
def test_pipeline_equals_one_device(schedule, p, m):
    check_equal_to_one_device(schedule, p, m)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,p,m", FULL)
def test_pipeline_equals_one_device_full_grid(schedule, p, m):
    check_equal_to_one_device(schedule, p, m)


@pytest.mark.parametrize("axes", [("mesh.data=2", "mesh.fsdp=2"),
                                  pytest.param(("mesh.data=1", "mesh.tensor=4"), marks=pytest.mark.slow)])
def test_pipeline_composes_with_data_fsdp_and_tensor(axes):
    check_equal_to_one_device("1f1b", 2, 2, *axes, rows=4)  # 4 rows: 1 per data × fsdp device


@pytest.mark.parametrize("schedule,axes", [
    ("1f1b", ("mesh.data=2", "mesh.tensor=2")),  # data=2 × pipe=2 × tensor=2 on 8 devices
    pytest.param("interleaved-1f1b", ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"), marks=pytest.mark.slow),
])
def test_pipeline_composes_with_data_and_tensor_together(schedule, axes):
    check_equal_to_one_device(schedule, 2, 2, *axes)


def _stash_temp_bytes(schedule, p, m):
    cfg = pipe_cfg(schedule, p, m, "mesh.data=1", rows=8)
    s = layout(cfg)
    prog = program.compile_schedule(program.make_schedule(cfg, p))
    tok = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), jnp.int32, sharding=s.batch_sharding)
    params = with_shardings(s.abstract_params, s.state_sharding.params)
    fn = jax.jit(lambda pa, b: pipeline_grads(cfg, s.mesh, prog, pa, b)[:2])
    compiled = fn.lower(params, {"inputs": tok, "targets": tok}).compile()
    return prog.x_slots, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # long: the default run stays under its time budget
def test_1f1b_memory_is_flat_in_m_while_gpipe_grows():
    p = 2
    slot_bytes = 8 * 16 * 32 * 4  # rows × seq × embed × float32
    (s1, one_p), (s8, one_8p) = _stash_temp_bytes("1f1b", p, p), _stash_temp_bytes("1f1b", p, 8 * p)
    (g1, gp_p), (g8, gp_8p) = _stash_temp_bytes("gpipe", p, p), _stash_temp_bytes("gpipe", p, 8 * p)
    assert (s1, s8, g1, g8) == (p, p, p, 8 * p)  # stash slots: ≤ p for 1F1B, m for GPipe
    assert one_8p <= 1.25 * one_p, (one_p, one_8p)
    # GPipe's temporaries grow by at least the extra stash slots the program must hold.
    assert gp_8p - gp_p >= (8 * p - p) * slot_bytes, (gp_p, gp_8p)


@pytest.mark.parametrize("overrides,message", [
    (("model.scan_layers=false",), "needs stacked layers: set model.scan_layers=true"),
    (("model.num_layers=3",), r"model.num_layers=3 is not divisible by mesh.pipe × pipeline.virtual_stages = 2 × 1"),
    (("pipeline.microbatches=1",), "needs pipeline.microbatches ≥ mesh.pipe, got 1 < 2"),
    (("train.batch_size=6",), "not divisible by pipeline.microbatches=4"),
    (("pipeline.virtual_stages=2",), "needs pipeline.schedule=interleaved-1f1b"),
    (("pipeline.schedule=interleaved-1f1b", "pipeline.virtual_stages=1"), "needs pipeline.virtual_stages ≥ 2"),
])
def test_bad_pipeline_configs_are_clear_errors(overrides, message):
    cfg = pipe_cfg("1f1b", 2, 4, "mesh.data=4", *overrides)
    with pytest.raises(ConfigError, match=message):
        setup(cfg, make_mesh(cfg.mesh))


def test_pipeline_microbatch_must_divide_over_data():
    cfg = pipe_cfg("1f1b", 2, 4, "mesh.data=4", rows=2)  # 2 rows per microbatch over data=4
    with pytest.raises(ConfigError, match="pipeline microbatch of 2 sequences .* not divisible by data × fsdp × expert = 4"):
        setup(cfg, make_mesh(cfg.mesh))


@pytest.mark.slow  # long: the default run stays under its time budget
def test_train_step_with_accumulation_and_checkpoint_across_layouts(tmp_path):
    """The pipelined train step (with train.grad_accum=2) equals the one-device step; its
    checkpoint restores on the non-pipelined layout and back."""
    # optimizer.eps=1e-4: Adam's first update is g / (|g| + eps), whose slope is 1/eps at g = 0;
    # with the default 1e-8, a 1e-10 reordering difference in a gradient of ~1e-8 (mlp.wi has
    # such entries) moves that parameter by ~1e-2·lr. A larger eps keeps the comparison about
    # the pipeline, not about Adam's conditioning (gradients are compared directly above).
    extra = ("train.grad_accum=2", "model.remat=full", "optimizer.eps=1e-4")
    piped = layout(pipe_cfg("1f1b", 2, 2, "mesh.data=1", *extra, rows=4))
    one = layout(pipe_cfg("1f1b", 2, 2, "mesh.data=1", "mesh.pipe=1", *extra, rows=4))
    batch = host_batch(one.cfg)
    results = {}
    for name, s in (("pipe", piped), ("one", one)):
        state = init_state(s, seed=0)
        state, metrics = compile_train_step(s)(state, jax.device_put(batch, s.batch_sharding))
        results[name] = (float(metrics["loss"]), jax.device_get(state.params), state)
    assert abs(results["pipe"][0] - results["one"][0]) < 2e-6
    assert max_abs_diff(results["pipe"][1], results["one"][1]) < 2e-5
    wq = results["pipe"][2].params["layers"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "pipe"  # stacked layers really split into stages

    manager = ckpt.make_manager(tmp_path, piped.cfg.checkpoint)
    ckpt.save(manager, 1, results["pipe"][2])
    manager.wait_until_finished()
    for dst in (one, piped):
        step, restored = ckpt.restore(manager, with_shardings(abstract_state(dst), dst.state_sharding))
        assert step == 1
        assert restored.params["layers"]["attn"]["wq"].sharding == dst.state_sharding.params["layers"]["attn"]["wq"]
        assert max_abs_diff(jax.device_get(restored.params), results["pipe"][1]) == 0.0
