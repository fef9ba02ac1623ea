"""Speculative decoding end to end: greedy output identical to the target's, the sampled output
distributed as the target's (exact distribution from full forward passes), and refusals.

The acceptance rule itself is tested in test_speculative_rule.py; here the models, caches and
positions around it are: a misaligned draft or target position breaks the greedy identity, and
a wrong q (not the one the draft sampled from) breaks the distribution test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.config.presets import tiny
from jaxsys.inference.decode import Generator, Request
from jaxsys.inference.sampler import SamplingParams
from jaxsys.inference.speculative import speculative_generate
from jaxsys.model.transformer import Transformer, init_params


def _pair(family: str, vocab: int = 256, seq_len: int = 48, sharpen: float = 1.0):
    base = tiny().model
    kv = 2 if family == "llama" else 0
    t_cfg = dataclasses.replace(base, family=family, vocab_size=vocab, seq_len=seq_len, num_kv_heads=kv,
                                scan_layers=family == "llama")
    d_cfg = dataclasses.replace(t_cfg, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=kv and 1,
                                scan_layers=False)
    gens = []
    for cfg, seed in ((t_cfg, 0), (d_cfg, 1)):
        params = init_params(cfg, jax.random.key(seed))
        params = jax.tree_util.tree_map(lambda x: x * sharpen, params)  # peakier distributions
        gens.append(Generator(Transformer(cfg), params))
    return gens


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_greedy_speculative_output_is_the_greedy_target_output(family):
    target, draft = _pair(family)
    greedy = SamplingParams(temperature=0)
    requests = [Request([1, 2, 3], 20, greedy), Request(list(range(5, 17)), 25, greedy), Request([9], 7, greedy)]
    expected = target.generate(requests)
    same = Generator(target.model, target.params)
    out, stats = speculative_generate(target, draft, requests, 3)
    assert [c.tokens for c in out] == [c.tokens for c in expected]
    assert [c.finish_reason for c in out] == ["length"] * 3
    assert stats.proposed > 0 and stats.accepted < stats.proposed  # a random draft disagrees
    out, stats = speculative_generate(target, same, requests, 3)  # the draft is the target
    assert [c.tokens for c in out] == [c.tokens for c in expected]
    assert stats.accepted == stats.proposed


def test_sampled_tokens_follow_the_target_distribution_exactly():
    """Two new tokens after a fixed prompt, over 6000 seeds in one batch, against the exact
    target distribution p(a) p(b | a) from full forward passes (temperature 1, 8 tokens)."""
    V = 8
    target, draft = _pair("gpt2", vocab=V, seq_len=16, sharpen=8.0)
    prompt = [3, 1, 4]
    U = 6000
    requests = [Request(prompt, 2, SamplingParams(temperature=1.0, seed=s)) for s in range(U)]
    out, stats = speculative_generate(target, draft, requests, gamma=2)
    pairs_U = np.array([c.tokens[0] * V + c.tokens[1] for c in out])
    apply = lambda seq: jax.nn.softmax(target.model.apply({"params": target.params}, jnp.asarray(seq)[None])[0, -1])  # noqa: E731
    p_a = np.asarray(apply(prompt), np.float64)
    exact = np.concatenate([p_a[a] * np.asarray(apply(prompt + [a]), np.float64) for a in range(V)])
    observed = np.bincount(pairs_U, minlength=V * V) / U
    se = np.sqrt(exact * (1 - exact) / U) + 1e-12
    assert np.max(np.abs(observed - exact) / se) < 5.0  # 64 cells at 5 standard errors: ~4e-5 false alarms
    # The test can fail: the draft's own distribution is far from the target's here.
    d = draft
    q_a = np.asarray(jax.nn.softmax(d.model.apply({"params": d.params}, jnp.asarray(prompt)[None])[0, -1]))
    assert np.max(np.abs(q_a - p_a) / np.sqrt(p_a * (1 - p_a) / U)) > 5.0
    assert 0.0 < stats.acceptance_rate < 1.0


@pytest.mark.slow  # long: the default run stays under its time budget
def test_stop_ids_end_a_row_inside_a_round():
    target, _ = _pair("gpt2")
    greedy = SamplingParams(temperature=0)
    [full] = target.generate([Request([1, 2, 3], 12, greedy)])
    stop = full.tokens[5]
    first = full.tokens.index(stop)
    out, _ = speculative_generate(target, Generator(target.model, target.params),
                                  [Request([1, 2, 3], 12, greedy, stop_ids=(stop,)), Request([7, 8], 9, greedy)], 4)
    assert out[0].tokens == full.tokens[:first] and out[0].finish_reason == "stop"
    assert len(out[1].tokens) == 9 and out[1].finish_reason == "length"


def test_bad_speculative_settings_are_refused_before_compiling():
    target, draft = _pair("gpt2", seq_len=32)
    ok = Request([1, 2], 8)
    with pytest.raises(ConfigError, match="penalt"):
        speculative_generate(target, draft, [Request([1, 2], 8, SamplingParams(repetition_penalty=1.2))], 2)
    with pytest.raises(ConfigError, match="exceeds the context 32"):
        speculative_generate(target, draft, [Request([1, 2], 28)], 4)
    with pytest.raises(ConfigError, match="gamma=0"):
        speculative_generate(target, draft, [ok], 0)
    other, _ = _pair("gpt2", vocab=128, seq_len=32)
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(target, other, [ok], 2)
