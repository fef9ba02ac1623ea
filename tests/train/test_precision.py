"""Mixed precision: dynamic loss scaling (`train.loss_scale`), float32 master weights
(`optimizer.master_dtype`) and the gradient-communication dtype (`mesh.grad_comm_dtype`).

Tolerances (measured, not tuned): float16 compute tracks float32 within 2e-3 nats over 5 tiny
steps (float16 keeps 11 significant bits, ~5e-4 relative per rounding); master weights are
the float32 AdamW update exactly (the same float32 operations on the same values); gradients
summed over 8 devices on a bfloat16 wire are within 2**-7 of each leaf's largest gradient of
the float32 sum (bfloat16 keeps 8 significant bits; one rounding of each device's share and of
each partial sum).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import ConfigError, OptimizerConfig, validate
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.mesh import replicated
from jaxsys.parallel.rules import with_shardings
from jaxsys.tools import hlo_stats, planner
from jaxsys.train import step as step_lib
from jaxsys.train.loop import train
from jaxsys.train.optimizer import make_optimizer
from jaxsys.train.state import abstract_state
from tests.helpers import layout, losses_and_params_after_steps, one_device_reference, tiny_cfg

QUIET = ("logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0")
# float16 over 2 accumulation microbatches with a short growth period, and step 9's loss
# poisoned (a NaN loss, not an overflow). The loop test and the tracking test compile the same
# program (the persistent compilation cache serves the second).
FP16 = ("mesh.data=1", "train.grad_accum=2", "model.compute_dtype=float16", "train.loss_scale_period=3",
        "faults.nan_steps=9")


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss_scale" in r]


def _expected(rows: list[dict], scale: float, period: int) -> list[tuple[float, bool, bool]]:
    """(scale, overflow, skipped) per step by the rule in plain Python, fed only the observed
    finiteness of each step's loss and gradient norm."""
    good, out = 0, []
    for r in rows:
        loss_ok, grads_ok = math.isfinite(r["loss"]), math.isfinite(r["grad_norm"])
        over = loss_ok and not grads_ok and scale > 1
        out.append((scale, over, not grads_ok))
        if over:
            scale, good = scale / 2, 0
        elif grads_ok:
            good += 1
            if good == period:
                scale, good = scale * 2, 0
    return out


def test_loss_scale_halves_on_overflow_grows_after_good_steps_and_resumes_bitwise(tmp_path):
    """From 2**20 the float16 backward overflows: those steps are skipped and halve the scale,
    and 3 overflows in a row do not reach train.max_consecutive_skips=2; 3 finite steps double
    it; step 9's NaN loss is an ordinary skip that leaves scale and count alone. The checkpoint
    of step 12 holds the final loss scale bit for bit, and the resumed run continues from it."""
    def cfg(steps):
        return tiny_cfg(*FP16, "train.loss_scale_init=1048576", "train.max_consecutive_skips=2",
                        f"train.steps={steps}", "checkpoint.every=6", "train.eval_every=0", "train.log_every=1",
                        f"run_dir={tmp_path}", *QUIET)
    first = train(cfg(12), jax.devices()[:1])
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [(r["loss_scale"], bool(r["overflow"]), bool(r["skipped"])) for r in rows] == _expected(rows, 2.0**20, 3)
    overflows = [r["step"] for r in rows if r["overflow"]]
    grown = [b["step"] for a, b in zip(rows, rows[1:]) if b["loss_scale"] > a["loss_scale"]]
    assert overflows[:3] == [1, 2, 3] and grown, (overflows, grown)
    nan_step = rows[8]
    assert nan_step["skipped"] and not nan_step["overflow"] and not math.isfinite(nan_step["loss"])
    assert rows[9]["loss_scale"] == nan_step["loss_scale"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # and float16 trains (5.53 -> 3.6 measured)

    s = layout(cfg(12))
    manager = ckpt.make_manager(tmp_path, s.cfg.checkpoint, read_only=True)
    _, restored = ckpt.restore(manager, with_shardings(abstract_state(s), s.state_sharding), step=12)
    manager.close()
    final = jax.device_get(first.state.opt_state)  # loss_scale.LossScaleState
    for key in ("scale", "good_steps"):
        got, want = np.asarray(getattr(restored.opt_state, key)), np.asarray(getattr(final, key))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert train(cfg(13), jax.devices()[:1]).start_step == 12
    assert _rows(tmp_path)[-1]["step"] == 13 and _rows(tmp_path)[-1]["loss_scale"] == float(final.scale)


@pytest.mark.slow  # two compiles (~29 s CPU alone; the float32 one is test_zero's in a full run)
def test_float16_with_loss_scaling_tracks_float32():
    """3 steps of tiny (2 microbatches each) from the default scale 2**15: the float16 losses
    stay near float32's (and differ: another computation)."""
    loss16, _ = losses_and_params_after_steps(*FP16)
    loss32, _ = losses_and_params_after_steps("mesh.data=1", "train.grad_accum=2")
    diffs = [abs(a - b) for a, b in zip(loss16, loss32)]
    assert max(diffs) < 2e-3 and max(diffs) > 0, diffs
    # (Not the parameters leaf by leaf: AdamW's first steps move each by about ±lr = 1e-2
    # whatever the gradient's size, so a near-zero gradient whose sign float16 flips moves its
    # parameter 2·lr the other way; measured 0.023 after 3 steps. The loss is what must track.)
    print("float16 - float32 loss per step:", [a - b for a, b in zip(loss16, loss32)])


def test_master_weights_equal_the_float32_update():
    """AdamW on float32 master copies of bfloat16 parameters is the float32 optimizer on
    float32 parameters, bit for bit, and the parameters are its rounding; without master
    weights the bfloat16 parameters lose the small updates (so the comparison can fail)."""
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": (0.02 * jax.random.normal(keys[0], (64, 64))).astype(jnp.bfloat16),
              "scale": jnp.ones((64,), jnp.bfloat16)}
    grads = [jax.tree_util.tree_map(lambda p, k=k: jax.random.normal(k, p.shape).astype(jnp.bfloat16), params)
             for k in keys[1:]]
    lr = optax.constant_schedule(1e-4)
    tx_master, tx = make_optimizer(OptimizerConfig(master_dtype="float32"), lr), make_optimizer(OptimizerConfig(), lr)
    f32 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)  # noqa: E731

    @jax.jit
    def three_steps(params, grads):
        ref, p_master, p_bf16 = f32(params), params, params
        st_ref, st_master, st_bf16 = tx.init(ref), tx_master.init(params), tx.init(params)
        for g in grads:
            u, st_ref = tx.update(f32(g), st_ref, ref)
            ref = optax.apply_updates(ref, u)
            u, st_master = tx_master.update(g, st_master, p_master)
            p_master = step_lib.optimizer.apply_updates(p_master, u, st_master)
            u, st_bf16 = tx.update(g, st_bf16, p_bf16)
            p_bf16 = optax.apply_updates(p_bf16, u)
        return ref, st_master.inner_state.master, p_master, p_bf16
    ref, master, p_master, p_bf16 = three_steps(params, grads)
    assert _same(master, ref)
    assert _same(p_master, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), ref))
    assert p_master["w"].dtype == jnp.bfloat16
    assert not _same(p_bf16, p_master)  # bfloat16 AdamW alone ends elsewhere


def test_master_weights_are_laid_out_like_the_moments():
    s = layout(tiny_cfg("mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1", "model.param_dtype=bfloat16",
                        "optimizer.master_dtype=float32"))
    shape, D = s.abstract_params["layers"]["attn"]["wq"].shape, s.cfg.model.embed_dim
    inner = s.state_sharding.opt_state.inner_state
    assert inner.master["layers"]["attn"]["wq"].shard_shape(shape)[1] == D // 8
    assert s.state_sharding.params["layers"]["attn"]["wq"].shard_shape(shape)[1] == D
    assert abstract_state(s).opt_state.inner_state.master["embed"].dtype == jnp.float32


def _grads_fn(*overrides: str):
    """(setup, jitted explicit-sync loss and gradients, lowered for the setup's shapes) of
    ZeRO-3 on data 2 × fsdp 4."""
    s = layout(tiny_cfg("mesh.data=2", "mesh.fsdp=4", "mesh.zero_stage=3", *overrides))
    fn = jax.jit(lambda p, b: step_lib._loss_and_grads(s, {})(p, b, None),
                 in_shardings=(s.state_sharding.params, s.batch_sharding),
                 out_shardings=(replicated(s.mesh), s.grad_sharding))
    with parallelize(s.mesh, s.activation_rules):
        lowered = fn.lower(with_shardings(s.abstract_params, s.state_sharding.params),
                           step_lib.abstract_batch(s, s.cfg.train.batch_size))
    return s, lowered


def _wire(hlo: str, s) -> dict[str, float]:
    out = {k: 0.0 for k in hlo_stats.KINDS}
    for c in hlo_stats.collectives(hlo, s.mesh):
        out[c.kind] += c.wire_bytes
    return out


def test_bfloat16_gradient_communication_halves_the_reduction_bytes():
    """ZeRO-3 on data 2 × fsdp 4 (layers unrolled, as the planner compiles): with a bfloat16
    wire the program's reduce-scatters and all-reduces carry half the bytes of float32, the
    planner's closed form; the weights' all-gathers stay float32. Read from the program as
    lowered: XLA:CPU's backend runs 16-bit reductions in float32 (its all-reduce-promotion /
    float-normalization passes), so the CPU's compiled HLO shows float32 bytes (asserted in
    the next test)."""
    s16, low16 = _grads_fn("mesh.grad_comm_dtype=bfloat16", "model.scan_layers=false")
    s32, low32 = _grads_fn("model.scan_layers=false")
    w16, w32 = _wire(low16.as_text(dialect="hlo"), s16), _wire(low32.as_text(dialect="hlo"), s32)
    assert w16["reduce-scatter"] == w32["reduce-scatter"] / 2 and w32["reduce-scatter"] > 0
    assert abs(w16["all-reduce"] - w32["all-reduce"] / 2) <= 8  # (+ the float32 loss's all-reduce)
    assert w16["all-gather"] == w32["all-gather"] > 0
    param_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(s16.abstract_params))
    formula = planner.closed_form_comm(s16.cfg, dict(s16.mesh.shape), param_bytes)
    total = sum(formula.values())
    # (Biases and norms that no rule splits over fsdp are all-reduced instead of reduce-scattered.)
    assert abs(sum(w16.values()) - total) <= 0.01 * total, (w16, formula)
    for kind in ("reduce-scatter", "all-gather"):
        assert abs(w16[kind] - formula[kind]) <= 0.01 * total, (kind, w16, formula)


@pytest.mark.slow  # an 8-device ZeRO-3 compile, ~14 s CPU
def test_bfloat16_gradient_communication_stays_near_float32():
    """The gradients through a bfloat16 wire are the one-device float32 ones within 2**-7 of
    each leaf's largest (and not equal: the float32 sync is within 2e-6, test_zero.py)."""
    params, batch, ref_loss, ref_grads = one_device_reference()
    s, lowered = _grads_fn("mesh.grad_comm_dtype=bfloat16")
    compiled = lowered.compile()
    loss_, grads = jax.device_get(compiled(jax.device_put(params, s.state_sharding.params),
                                           jax.device_put(batch, s.batch_sharding)))
    # XLA:CPU promotes the bfloat16 reductions to float32 (a future XLA that keeps them shows up here).
    scatters = [c.shape for c in hlo_stats.collectives(compiled.as_text(), s.mesh) if c.kind == "reduce-scatter"]
    assert scatters and all(sh.startswith("f32") for sh in scatters), scatters
    assert abs(float(loss_) - ref_loss) < 2e-6  # the loss is not a gradient: summed in float32
    # Per leaf, relative to its largest gradient; not the attention key bias, whose gradient is
    # zero in exact arithmetic (softmax is shift-invariant) and float32 rounding noise here.
    rel = {path: float(np.max(np.abs(a - b))) / float(np.max(np.abs(b)))
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads))
           if "bk" not in jax.tree_util.keystr(path)}
    assert 1e-5 < max(rel.values()) < 2**-7, rel
    print("bfloat16 wire: largest relative gradient difference", max(rel.values()))
    # XLA:CPU sends the reductions in float32 anyway (test above); the rounding to bfloat16 of
    # each device's share is what remains of the wire dtype here.


@pytest.mark.parametrize("overrides,message", [
    (("model.compute_dtype=float16", "mesh.pipe=2"), "not supported with mesh.pipe > 1"),
    (("optimizer.master_dtype=float32",), "would only duplicate them"),
    (("mesh.grad_comm_dtype=bfloat16", "mesh.grad_sync=xla"), "explicit data-parallel sync only"),
    (("train.loss_scale_init=0.5",), "train.loss_scale_init must be a finite number ≥ 1"),
])
def test_precision_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*overrides))
