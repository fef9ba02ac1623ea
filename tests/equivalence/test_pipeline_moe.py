"""MoE under pipeline parallelism: a uniform MoE stack (every layer MoE) split over `pipe` equals
one device — the cross-entropy, the gradients of the objective (cross-entropy + each layer's
balancing terms, averaged over layers and microbatches as `jaxsys.model.loss.objective` does),
and the sown statistics (aux, z, load, dropped) the metrics and the loss-free bias update read,
with the bias fed from the model state; both dispatch modes; other MoE layouts are refused.

Tolerance: fp32, atol 2e-6 (as tests/equivalence/test_pipeline.py: the pipeline sums the
microbatches in another order).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.model import moe
from jaxsys.model.loss import loss, objective
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.mesh import make_mesh
from jaxsys.parallel.pipeline import program
from jaxsys.parallel.pipeline.executor import pipeline_grads
from jaxsys.train.state import init_state, setup
from tests.helpers import host_batch, layout, max_abs_diff, tiny_cfg


def moe_cfg(dispatch: str, *mesh: str, rows: int = 2):
    """2 layers, both MoE (4 experts of 32, top-2), pipe=2 · 1F1B · M=2 microbatches of `rows`;
    capacity 1.0 drops tokens; every balancing term on, with the loss-free bias."""
    return tiny_cfg("model.num_layers=2", "pipeline.schedule=1f1b", "pipeline.microbatches=2",
                    f"train.batch_size={2 * rows}", "model.moe.num_experts=4", "model.moe.top_k=2",
                    "model.moe.expert_dim=32", f"model.moe.dispatch={dispatch}", "model.moe.capacity_factor=1.0",
                    "model.moe.aux_loss_coef=0.1", "model.moe.z_loss_coef=0.001",
                    "model.moe.bias_update_rate=0.01", *mesh)


@functools.lru_cache(maxsize=None)
def one_device(dispatch: str, rows: int = 2, model: tuple[str, ...] = ()):
    """(params, model state with a random bias, batch, ce, stats, objective grads, ce-only grads)."""
    s = layout(moe_cfg(dispatch, *model, "mesh.data=1", "mesh.pipe=1", rows=rows))
    state = init_state(s, seed=0)
    params = jax.device_get(state.params)
    rng = np.random.RandomState(0)
    ms = jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * rng.randn(*a.shape), a.dtype),
                                jax.device_get(state.model_state))
    batch = host_batch(s.cfg)
    obj = jax.jit(jax.value_and_grad(lambda p: objective(s.model, p, ms, batch, None), has_aux=True))
    (_, (ce, stats)), grads = obj(params)
    ce_grads = jax.jit(jax.grad(lambda p: loss(s.model, p, batch, None, ms)))(params)
    return params, ms, batch, float(ce), jax.device_get(stats), jax.device_get(grads), jax.device_get(ce_grads)


def run_pipeline(cfg, params, model_state, batch):
    s = layout(cfg)
    prog = program.compile_schedule(program.make_schedule(cfg, cfg.mesh.pipe))
    fn = jax.jit(lambda pa, b, ms: pipeline_grads(cfg, s.mesh, prog, pa, b, ms)[:2],
                 in_shardings=(s.state_sharding.params, s.batch_sharding, s.state_sharding.model_state))
    args = (jax.device_put(params, s.state_sharding.params), jax.device_put(batch, s.batch_sharding), model_state)
    with parallelize(s.mesh, s.activation_rules):
        compiled = fn.lower(*args).compile()
    (ce, stats), grads = compiled(*args)
    return float(ce), jax.device_get(stats), jax.device_get(grads), compiled.as_text()


def check_equal(dispatch: str, *mesh: str, rows: int = 2, model: tuple[str, ...] = ()):
    mesh = mesh or ("mesh.data=1",)
    params, ms, batch, ref_ce, ref_stats, ref_grads, ce_grads = one_device(dispatch, rows, model)
    cfg = moe_cfg(dispatch, *model, "mesh.pipe=2", *mesh, rows=rows)
    ce, stats, grads, hlo = run_pipeline(cfg, params, ms, batch)
    if cfg.pipeline.virtual_stages == 1:  # (interleaving reorders the pipe-split layers by all-to-all)
        assert ("all-to-all" in hlo) == (cfg.mesh.expert > 1)  # expert parallel inside the stages
    assert abs(ce - ref_ce) < 2e-6, (ce, ref_ce)
    assert max_abs_diff(grads, ref_grads) < 2e-6
    assert max_abs_diff(grads, ce_grads) > 1e-4  # the balancing terms really are in the gradients
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(ref_stats)
    assert max_abs_diff(stats, ref_stats) < 2e-6
    dropped = float(np.mean(moe.layer_stats(stats)["dropped"]))
    assert (dropped > 0.05) if dispatch == "capacity" else dropped == 0.0
    # What the train step makes of the statistics: its metrics and the bias update.
    for a, b in ((moe.step_metrics(stats), moe.step_metrics(ref_stats)),
                 (moe.update_bias(ms, stats, 0.01), moe.update_bias(ms, ref_stats, 0.01))):
        assert max_abs_diff(jax.device_get(a), jax.device_get(b)) < 2e-6


@pytest.mark.parametrize("dispatch", ["capacity", pytest.param("dropless", marks=pytest.mark.slow)])
def test_moe_pipeline_equals_one_device(dispatch):
    check_equal(dispatch)


@pytest.mark.slow  # long: the default run stays under its time budget
@pytest.mark.parametrize("dispatch,schedule", [
    ("capacity", ("pipeline.schedule=zb-h1",)),
    ("dropless", ("pipeline.schedule=interleaved-1f1b", "pipeline.virtual_stages=2", "model.num_layers=4")),
])
def test_moe_pipeline_other_schedules(dispatch, schedule):
    """ZB-H1 (W apart from B) and interleaved 1F1B (2 chunks per stage, 4 layers)."""
    check_equal(dispatch, model=schedule)


@pytest.mark.slow  # long: the default run stays under its time budget
def test_moe_pipeline_composes_with_expert_and_data():
    """pipe2 × expert2 × data2 on 8 devices: each stage's MoE layers all-to-all over `expert`."""
    check_equal("capacity", "mesh.data=2", "mesh.expert=2", rows=4)


def test_pipeline_feeds_the_bias_to_its_stages():
    """The random bias of `one_device` changes the routing: a pipeline that ignored it would differ."""
    params, ms, batch, ref_ce, _, _, _ = one_device("capacity")
    s = layout(moe_cfg("capacity", "mesh.data=1", "mesh.pipe=1"))
    zero = jax.tree_util.tree_map(jnp.zeros_like, ms)
    assert abs(float(jax.jit(lambda p: loss(s.model, p, batch, None, zero))(params)) - ref_ce) > 1e-4


@pytest.mark.parametrize("overrides,message", [
    (("model.moe.every=2",), "needs every layer MoE .* got first_dense_layers=0, every=2"),
    (("model.moe.first_dense_layers=1",), "needs every layer MoE .* got first_dense_layers=1, every=1"),
])
def test_moe_layouts_the_pipeline_cannot_split_are_clear_errors(overrides, message):
    cfg = moe_cfg("capacity", "mesh.pipe=2", "mesh.data=1", *overrides)
    with pytest.raises(ConfigError, match=message):
        setup(cfg, make_mesh(cfg.mesh, jax.devices()[:2]))


@pytest.mark.slow  # long: the default run stays under its time budget
def test_moe_train_step_through_the_pipeline():
    """One real train step (1F1B, pipe=2) equals one device: the moe_* metrics and the moved bias."""
    from jaxsys.train.step import compile_train_step
    out = {}
    for name, mesh in (("pipe", ("mesh.pipe=2", "mesh.data=1")), ("one", ("mesh.pipe=1", "mesh.data=1"))):
        s = layout(moe_cfg("capacity", *mesh, "optimizer.eps=1e-4"))
        state = init_state(s, seed=0)
        state, metrics = compile_train_step(s)(state, jax.device_put(host_batch(s.cfg), s.batch_sharding))
        out[name] = jax.device_get((metrics, state.model_state))
    assert max_abs_diff(out["pipe"], out["one"]) < 2e-6
    assert float(np.abs(out["one"][1][moe.BIAS]["moe_layers"]["moe"]["bias"]).max()) > 0  # the bias moved
