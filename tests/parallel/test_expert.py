"""The expert-parallel `hooks.experts` (`jaxsys.parallel.expert`) equals the plain computation.

The plain reference here is a float64 loop: each token through each of its kept experts,
weighted; dropped assignments (slot == capacity, GShard priority: all first choices of a row in
token order, then the second choices) contribute nothing. The all-to-all version runs on 8
simulated devices with expert ∈ {2, 4, 8} (the rest data), and expert2 × tensor4, and must
equal it in the forward; its gradients (by autodiff through the all-to-alls) must equal those of
the model's one-device hook (`jaxsys.model.experts`: buffers, or ragged_dot when dropless),
which the loop checks in the forward.

Tolerance: float32, 1e-5 relative to the outputs' scale (sums of D·F products reordered).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsys.config import MeshConfig
from jaxsys.model.axes import EXPERT_XDF, EXPERT_XFD
from jaxsys.model.experts import experts_reference
from jaxsys.parallel import expert
from jaxsys.parallel.mesh import DATA_AXES, make_mesh
from jaxsys.parallel.rules import ACTIVATION_RULES, logical_to_spec

B, T, D, F, X, I = 8, 8, 16, 8, 8, 2


def gshard_slots(expert_BTI: np.ndarray, capacity: int) -> np.ndarray:
    """Each assignment's slot in its expert's buffer of its row (== capacity: dropped)."""
    slots = np.full(expert_BTI.shape, capacity, np.int32)
    for b in range(expert_BTI.shape[0]):
        count = np.zeros(X, int)
        for i in range(expert_BTI.shape[2]):
            for t in range(expert_BTI.shape[1]):
                e = expert_BTI[b, t, i]
                if count[e] < capacity:
                    slots[b, t, i] = count[e]
                count[e] += 1
    return slots


def problem(act: str, capacity: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    # Skewed routing, so that small capacities drop tokens.
    scores = rng.normal(size=(B, T, X)) + np.linspace(2, 0, X)
    expert_BTI = np.argsort(-scores, axis=-1)[..., :I].astype(np.int32)
    weight = rng.uniform(0.1, 1, size=(B, T, I)).astype(np.float32)
    w = {"w_in": rng.normal(size=(X, D, F)) / 4, "w_out": rng.normal(size=(X, F, D)) / 3}
    if act == "swiglu":
        w["w_gate"] = rng.normal(size=(X, D, F)) / 4
    w = {k: v.astype(np.float32) for k, v in w.items()}
    return x, expert_BTI, gshard_slots(expert_BTI, capacity), weight, w


def loop_reference(x, expert_BTI, slot_BTI, weight, w, act, capacity):
    erf = np.vectorize(math.erf)

    def gelu(h, tanh):
        if tanh:
            return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        return 0.5 * h * (1 + erf(h / np.sqrt(2)))

    y = np.zeros(x.shape, np.float64)
    for b in range(B):
        for t in range(T):
            for i in range(I):
                e, s = expert_BTI[b, t, i], slot_BTI[b, t, i]
                if s == capacity:
                    continue
                h = x[b, t].astype(np.float64) @ w["w_in"][e]
                if act == "swiglu":
                    g = x[b, t].astype(np.float64) @ w["w_gate"][e]
                    h = g / (1 + np.exp(-g)) * h
                else:
                    h = gelu(h, act == "gelu_tanh")
                y[b, t] += weight[b, t, i] * (h @ w["w_out"][e])
    return y


def on_mesh(mesh, args):
    x, e, s, wt, w = args
    rows = NamedSharding(mesh, P(DATA_AXES))
    w_sh = {k: NamedSharding(mesh, logical_to_spec(EXPERT_XFD if k == "w_out" else EXPERT_XDF,
                                                   ACTIVATION_RULES)) for k in w}
    return jax.device_put((x, e, s, wt), rows), jax.device_put(w, w_sh)


slow = pytest.mark.slow
CASES = [
    pytest.param(dict(data=4, expert=2), "swiglu", 3, id="expert2-capacity", marks=slow),
    pytest.param(dict(data=2, expert=4), "gelu_tanh", T, id="expert4-dropless"),  # dropless: U = T
    pytest.param(dict(data=1, expert=8), "gelu_exact", 2, id="expert8-capacity", marks=slow),
    pytest.param(dict(data=1, expert=8), "swiglu", T, id="expert8-dropless", marks=slow),
    pytest.param(dict(data=1, expert=2, tensor=4), "swiglu", 2, id="expert2-tensor4-capacity"),
]


@pytest.mark.parametrize("sizes,act,capacity", CASES)
def test_expert_parallel_equals_the_loop_and_its_gradients_one_device(sizes, act, capacity):
    mesh = make_mesh(MeshConfig(**sizes))
    args = problem(act, capacity)
    x, e, s, wt, w = args
    dispatch = "dropless" if capacity == T else "capacity"
    if dispatch == "capacity":
        assert (s == capacity).any() and (s < capacity).any()  # some dropped, some kept
    ref = loop_reference(*args, act, capacity)

    def parallel(x, wt, w, e, s):
        return expert.expert_parallel(mesh, ACTIVATION_RULES, x, e, s, wt, w, act=act,
                                      capacity=capacity, dispatch=dispatch)

    def plain(x, wt, w, e, s):  # the model's own one-device hook
        return experts_reference(x, e, s, wt, w, act=act, capacity=capacity, dispatch=dispatch)

    (xs, es, ss, wts), ws = on_mesh(mesh, args)
    y = jax.jit(parallel)(xs, wts, ws, es, ss)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(plain(x, wt, w, e, s)), ref, atol=1e-5 * scale)

    ct = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
    grad = lambda f: jax.grad(lambda x, wt, w, e, s: jnp.sum(f(x, wt, w, e, s) * ct), argnums=(0, 1, 2))  # noqa: E731
    g_par = jax.device_get(jax.jit(grad(parallel))(xs, wts, ws, es, ss))
    g_one = jax.device_get(jax.jit(grad(plain))(x, wt, w, e, s))
    for a, b_ in zip(jax.tree_util.tree_leaves(g_par), jax.tree_util.tree_leaves(g_one)):
        assert np.abs(b_).max() > 1e-3
        np.testing.assert_allclose(a, b_, atol=1e-5 * np.abs(b_).max())


@pytest.mark.parametrize("sizes", [dict(data=1, expert=8), dict(data=1, expert=2, tensor=4)])
def test_bfloat16_compute_compiles_and_sums_in_float32(sizes):
    """A bfloat16 model's layer and its gradients on an expert mesh: every cross-device sum is
    float32 (a bfloat16 psum inside shard_map aborted XLA:CPU's compile), so the result equals
    the float32 layer to bfloat16 rounding of its inputs."""
    mesh = make_mesh(MeshConfig(**sizes))
    args = problem("swiglu", T)
    x, e, s, wt, w = args
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731

    def loss(x, wt, w, e, s):
        y = expert.expert_parallel(mesh, ACTIVATION_RULES, x, e, s, wt, w, act="swiglu",
                                   capacity=T, dispatch="dropless")
        return jnp.sum(y.astype(jnp.float32) ** 2)

    (xs, es, ss, wts), ws = on_mesh(mesh, (bf(x), e, s, bf(wt), {k: bf(v) for k, v in w.items()}))
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).lower(xs, wts, ws, es, ss)
    hlo = lowered.as_text()
    reduced = re.findall(r'"stablehlo.all_reduce".*?\}\) : \((tensor<[^>]*>)', hlo, re.S)
    assert "all_to_all" in hlo and reduced and not [t for t in reduced if "bf16" in t], reduced
    value, _ = lowered.compile()(xs, wts, ws, es, ss)
    ref = np.sum(loop_reference(*args, "swiglu", T) ** 2)
    assert abs(float(value) - ref) < 0.05 * abs(ref)  # bfloat16 inputs: ~3 significant digits


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides,message", [
    (("model.moe.num_experts=6", "mesh.expert=4", "mesh.data=2"),
     r"model.moe.num_experts=6 is not divisible by mesh.expert=4 .* use mesh.expert=3 or a multiple of 4"),
    (("model.moe.num_experts=4", "model.moe.expert_dim=24", "mesh.tensor=16", "mesh.data=1"),
     r"hidden size 24 .* not divisible by mesh.tensor=16; use an expert_dim that is a multiple of 16"),
])
def test_refusals_before_compile(overrides, message):
    from jaxsys.config import ConfigError, validate
    from tests.helpers import tiny_cfg
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*overrides))


def test_a_batch_that_does_not_split_over_expert_is_refused():
    from jaxsys.config import ConfigError
    from tests.helpers import layout, tiny_cfg
    with pytest.raises(ConfigError, match=r"not divisible by data × fsdp × expert = 1 × 1 × 8 = 8"):
        layout(tiny_cfg("train.batch_size=12", "mesh.data=1", "mesh.expert=8"))
