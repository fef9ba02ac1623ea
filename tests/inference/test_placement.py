"""Generation on a data × tensor mesh (`jaxsys.inference.placement`) against one device.

The reference is `Generator` without a mesh, on one device: the same engine with nothing placed,
so a mesh may change only where each array lives and in which order partial sums are added.
Every mesh run also checks that the parameters and caches really are split (their per-device
shard shapes), so a placement that silently replicated everything could not pass.

Models: gpt2 (unscanned layers) and llama with grouped-query attention (4 query heads, 2 KV
heads, scanned layers), context 32, made "lively" with the gains of test_decode.py (weight
matrices scaled up from the initialiser's distribution so that greedy decoding does not sit on
near-ties; there those gains moved logits by at most 2e-6 under a 1-ulp change of the
weights). They are drawn in numpy: a jitted initialiser cost ~5 s of compile per model here.

Tolerances: the tokens must be identical (greedy and sampled rows alike: a sampled row's key
depends only on its seed and token count, never on the layout). Log-probabilities may differ by
LOGPROB_ATOL: tensor parallelism adds the row-parallel partial sums (attention output, MLP
output, the vocabulary-split softmax) in another order than one device does, float32 rounding
of O(1) values, the same budget test_decode.py allows between the cached and the plain path
(logits 1e-5, a log-probability twice that).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxsys.config import ConfigError, MeshConfig
from jaxsys.config.presets import tiny
from jaxsys.inference import placement
from jaxsys.inference.decode import Generator, Request
from jaxsys.inference.quantize import QuantizedWeight, quantize_params
from jaxsys.inference.sampler import SamplingParams
from jaxsys.inference.speculative import speculative_generate
from jaxsys.model.params import path_str
from jaxsys.model.transformer import Transformer, abstract_params
from jaxsys.parallel.mesh import make_mesh

LOGPROB_ATOL = 2e-5
GREEDY = SamplingParams(temperature=0.0)

MODELS = {
    "gpt2": dict(scan_layers=False, seq_len=32),
    "llama-gqa": dict(family="llama", num_heads=4, num_kv_heads=2, scan_layers=True, seq_len=32),
}

# Two greedy rows and two sampled rows (temperature 1, fixed seeds), prompts of 3 to 12 tokens.
REQUESTS = (
    Request([1, 2, 3], 8, GREEDY),
    Request([7, 40, 99, 3, 250, 18, 61, 5, 77, 120, 9, 33], 10, GREEDY),
    Request([5, 6, 7, 8, 9], 9, SamplingParams(temperature=1.0, seed=11)),
    Request([200, 13], 7, SamplingParams(temperature=1.0, seed=12)),
)


def _gain(family: str, name: str) -> float:
    if ".mlp." in f".{name}":
        return 6.0 if family == "llama" else 10.0
    return 2.0 if ".attn." in f".{name}" else 3.0


def lively_params(cfg, seed: int):
    """Float32 parameters of `cfg` drawn in numpy (no compile): the initialiser's distribution
    (normal(0, 0.02), output projections 0.02 / sqrt(2 L)) times `_gain` for weight matrices;
    norm scales 1 and biases 0, each perturbed by N(0, 0.03) so that none is trivial."""
    rng = np.random.default_rng(seed)
    shapes, _ = abstract_params(cfg)

    def one(path, x):
        name = path_str(path)
        leaf = name.split(".")[-1]
        axes = len(x.shape) - name.startswith("layers.")  # not counting scan's stacked layers axis
        if axes >= 2 and not leaf.startswith("b"):  # gpt2's bq [H, E] is a bias
            std = 0.02 / np.sqrt(2 * cfg.num_layers) if leaf == "wo" else 0.02
            return jax.numpy.asarray(rng.normal(0, std * _gain(cfg.family, name), x.shape), np.float32)
        return jax.numpy.asarray((leaf == "scale") + rng.normal(0, 0.03, x.shape), np.float32)
    return jax.tree_util.tree_map_with_path(one, shapes)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
    """(model, lively float32 params on one device) of MODELS[name]."""
    cfg = dataclasses.replace(tiny().model, **MODELS[name])
    return Transformer(cfg), lively_params(cfg, 0)


def _mesh(data: int, tensor: int):
    return make_mesh(MeshConfig(data=data, tensor=tensor), jax.devices()[:data * tensor])


@functools.lru_cache(maxsize=None)
def _reference(name: str, quantized: bool = False):
    """Completions of all REQUESTS on one device (a row depends only on its own request, so
    the first k of them are also the reference of a batch of the first k requests)."""
    model, params = _setup(name)
    if quantized:
        params = quantize_params(params, model.cfg)
    return Generator(model, params).generate(list(REQUESTS))


def _leaf(params, suffix: str):
    """The first leaf of `params` whose path ends with `suffix` (e.g. "attn.wq")."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
    return next(x for p, x in leaves if path_str(p).endswith(suffix))


def assert_placed(gen: Generator, batch: int, data: int, tensor: int) -> None:
    """wq is split by heads over tensor; a cache is split by batch over data (when `batch`
    divides it, else whole) and by KV heads over tensor."""
    wq = _leaf(gen.params, "attn.wq")
    wq = wq.values if isinstance(wq, QuantizedWeight) else wq
    D, H, E = wq.shape
    assert isinstance(wq.sharding, NamedSharding) and "tensor" in tuple(wq.sharding.spec), wq.sharding
    assert wq.sharding.shard_shape(wq.shape) == (D, H // tensor, E)
    K = gen.cfg.num_kv_heads
    for x in jax.tree_util.tree_leaves(gen.empty_caches(batch, gen.cfg.seq_len)):
        b_shard = batch // data if batch % data == 0 else batch
        assert x.sharding.shard_shape(x.shape)[:2] == (b_shard, K // tensor), (x.shape, x.sharding)


def assert_same_generation(out, ref) -> None:
    assert [c.tokens for c in out] == [c.tokens for c in ref]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]
    for c, r in zip(out, ref):
        np.testing.assert_allclose(c.logprobs, r.logprobs, rtol=0, atol=LOGPROB_ATOL)


# (model, data, tensor, number of requests). 3 requests on data=4 do not divide it: the batch
# stays whole. llama-gqa cannot take tensor=4 (2 KV heads; see the refusals below). The default
# run meets data=2 × tensor=4 in the int8 test (one compile per layout is this file's budget).
CASES = [
    pytest.param("gpt2", 4, 2, 4, id="gpt2-data4xtensor2-batch4"),
    pytest.param("gpt2", 2, 4, 4, id="gpt2-data2xtensor4-batch4", marks=pytest.mark.slow),
    pytest.param("llama-gqa", 4, 2, 3, id="llama-gqa-data4xtensor2-batch3"),
    pytest.param("gpt2", 4, 2, 3, id="gpt2-data4xtensor2-batch3", marks=pytest.mark.slow),
    pytest.param("llama-gqa", 4, 2, 4, id="llama-gqa-data4xtensor2-batch4", marks=pytest.mark.slow),
    pytest.param("llama-gqa", 2, 2, 4, id="llama-gqa-data2xtensor2-batch4", marks=pytest.mark.slow),
    pytest.param("gpt2", 8, 1, 4, id="gpt2-data8", marks=pytest.mark.slow),
    pytest.param("llama-gqa", 8, 1, 3, id="llama-gqa-data8-batch3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,data,tensor,batch", CASES)
def test_generation_on_a_mesh_equals_one_device(name, data, tensor, batch):
    model, params = _setup(name)
    ref = _reference(name)[:batch]
    assert {c.finish_reason for c in ref} == {"length"} and len({tuple(c.tokens) for c in ref}) == batch
    gen = Generator(model, params, mesh=_mesh(data, tensor))
    assert_placed(gen, batch, data, tensor)
    assert_same_generation(gen.generate(list(REQUESTS[:batch])), ref)


@pytest.mark.parametrize("name,data,tensor", [
    pytest.param("gpt2", 2, 4, id="gpt2-data2xtensor4", marks=pytest.mark.slow),
    pytest.param("llama-gqa", 4, 2, id="llama-gqa-data4xtensor2", marks=pytest.mark.slow),
])
def test_int8_weights_on_a_mesh_give_the_tokens_of_int8_on_one_device(name, data, tensor):
    model, params = _setup(name)
    qparams = quantize_params(params, model.cfg)
    ref = _reference(name, quantized=True)
    gen = Generator(model, qparams, mesh=_mesh(data, tensor))
    wq = _leaf(gen.params, "attn.wq")
    assert isinstance(wq, QuantizedWeight) and wq.values.dtype == np.int8
    assert_placed(gen, len(REQUESTS), data, tensor)
    # Its scale [1, H, E] is split by heads like the values (one scale per output channel).
    _, H, E = wq.scale.shape
    assert wq.scale.sharding.shard_shape(wq.scale.shape) == (1, H // tensor, E)
    out = gen.generate(list(REQUESTS))
    assert [c.tokens for c in out] == [c.tokens for c in ref]
    np.testing.assert_allclose([lp for c in out for lp in c.logprobs], [lp for c in ref for lp in c.logprobs],
                               rtol=0, atol=LOGPROB_ATOL)
    # int8 is not the float model: the comparison above is of int8 with int8.
    assert [c.logprobs for c in ref] != [c.logprobs for c in _reference(name)]


def _draft(mesh):
    """A one-layer, two-head gpt2 draft (other weights than the target's), on `mesh`."""
    cfg = dataclasses.replace(tiny().model, **MODELS["gpt2"], num_layers=1, embed_dim=16, num_heads=2)
    return Generator(Transformer(cfg), lively_params(cfg, 5), mesh=mesh)


@pytest.mark.slow  # long: the default run stays under its time budget
def test_speculative_decoding_on_a_mesh_is_the_targets_greedy_output():
    model, params = _setup("gpt2")
    mesh = _mesh(4, 2)
    target, draft = Generator(model, params, mesh=mesh), _draft(mesh)
    assert_placed(draft, len(REQUESTS), 4, 2)
    # All four requests (the target's prefill of the mesh test is reused); rows 0 and 1 are
    # greedy and must be the target's own greedy tokens. The sampled rows are only distributed
    # as the target's samples (test_speculative.py), not equal to them.
    out, stats = speculative_generate(target, draft, list(REQUESTS), gamma=3)
    ref = _reference("gpt2")
    assert [r.sampling.temperature for r in REQUESTS[:2]] == [0, 0]
    assert [c.tokens for c in out[:2]] == [c.tokens for c in ref[:2]]
    assert [len(c.tokens) for c in out] == [r.max_new_tokens for r in REQUESTS]
    assert 0 < stats.proposed and stats.accepted < stats.proposed  # the draft disagrees: rejections ran


def test_a_draft_on_another_mesh_is_refused():
    model, params = _setup("gpt2")
    target = Generator(model, params, mesh=_mesh(4, 2))
    for draft in (_draft(_mesh(2, 2)), _draft(None)):
        with pytest.raises(ConfigError, match="same mesh"):
            speculative_generate(target, draft, [REQUESTS[0]], gamma=3)


def _shapes_only(name: str, mesh, **changes) -> Generator:
    model, _ = _setup(name)
    return Generator(Transformer(dataclasses.replace(model.cfg, **changes)), None, mesh=mesh)


@pytest.mark.parametrize("axes,match", [
    (dict(data=4, fsdp=2), r"fsdp.*2.*fsdp=1 and pipe=1"),
    (dict(data=4, pipe=2), r"pipe.*2.*fsdp=1 and pipe=1"),
])
def test_check_mesh_refuses_training_axes(axes, match):
    mesh = make_mesh(MeshConfig(**axes), jax.devices())
    model, _ = _setup("gpt2")
    with pytest.raises(ConfigError, match=match):
        placement.check_mesh(model.cfg, mesh)
    with pytest.raises(ConfigError, match=match):
        _shapes_only("gpt2", mesh)


def test_check_mesh_refuses_a_tensor_size_that_does_not_divide_the_heads():
    # llama-gqa: 4 query heads, 2 KV heads. tensor=4 divides the query heads, not the KV heads.
    with pytest.raises(ConfigError, match=r"tensor=4 must divide .*num_heads=4 and the KV heads 2.*choose a tensor"):
        _shapes_only("llama-gqa", _mesh(2, 4))
    # 6 heads of size 4: tensor=4 divides neither the query nor the KV heads (gpt2: K = H).
    with pytest.raises(ConfigError, match=r"tensor=4 must divide model.num_heads=6"):
        _shapes_only("gpt2", _mesh(2, 4), num_heads=6, embed_dim=24)
    # The same models on a tensor size that divides their heads are accepted.
    _shapes_only("llama-gqa", _mesh(4, 2))
    _shapes_only("gpt2", _mesh(4, 2), num_heads=6, embed_dim=24)
