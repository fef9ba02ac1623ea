"""The sampler against plain references: numpy float64, one Python loop per row and per token.

Float32 (the sampler) and float64 (the references) may disagree only where a decision sits on
a boundary, so the random cases assert that they are clear of every boundary first
(`_assert_clear_of_boundaries`), and the boundary cases are hand-made with values that are
exact in both precisions (ties, uniform rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.inference.sampler import (SamplerArrays, SamplingParams, processed_logits,
                                      request_keys, sample_tokens, stack_params)

NEG_INF = -math.inf
_processed = jax.jit(processed_logits, static_argnames="num_tokens")
_sample = jax.jit(sample_tokens, static_argnames="num_tokens")
# Row by row, as the docstring promises: categorical of one key and one row, no batching.
_categorical = jax.jit(lambda keys_B, x_BV: jnp.stack(
    [jax.random.categorical(keys_B[b], x_BV[b]) for b in range(x_BV.shape[0])]))


# ----------------------------------------------------------------------------- references
def ref_mask(logits, num_tokens):
    return [x if num_tokens == 0 or i < num_tokens else NEG_INF for i, x in enumerate(logits)]


def ref_repetition(logits, seen, r):
    return [(x / r if x > 0 else x * r) if s else x for x, s in zip(logits, seen)]


def ref_presence(logits, seen, penalty):
    return [x - penalty if s else x for x, s in zip(logits, seen)]


def ref_temperature(logits, t):
    if t > 0:
        return [x / t for x in logits]
    best = 0
    for i, x in enumerate(logits):
        if x > logits[best]:  # strict: the lowest id wins a tie
            best = i
    return [0.0 if i == best else NEG_INF for i in range(len(logits))]


def ref_softmax(logits):
    m = max(logits)
    e = [math.exp(x - m) if x != NEG_INF else 0.0 for x in logits]
    total = sum(e)
    return [v / total for v in e]


def ref_top_k(logits, k):
    if k == 0:
        return list(logits)
    kth = sorted(logits, reverse=True)[min(k, len(logits)) - 1]
    return [x if x >= kth else NEG_INF for x in logits]


def ref_top_p(logits, top_p):
    if top_p >= 1:
        return list(logits)
    probs = ref_softmax(logits)
    total, last = 0.0, None
    for p in sorted(probs, reverse=True):
        total += p
        last = p
        if total >= top_p:
            break
    return [x if p >= last else NEG_INF for x, p in zip(logits, probs)]


def ref_min_p(logits, min_p):
    probs = ref_softmax(logits)
    p_max = max(probs)
    return [x if p >= min_p * p_max else NEG_INF for x, p in zip(logits, probs)]


def ref_processed(logits, params: SamplingParams, seen, num_tokens=0):
    x = ref_mask([float(v) for v in logits], num_tokens)
    x = ref_repetition(x, seen, params.repetition_penalty)
    x = ref_presence(x, seen, params.presence_penalty)
    x = ref_temperature(x, params.temperature)
    x = ref_top_k(x, params.top_k)
    x = ref_top_p(x, params.top_p)
    return np.array(ref_min_p(x, params.min_p))


def ref_batch(logits_BV, params, seen_BV, num_tokens=0):
    return np.stack([ref_processed(logits_BV[b], params[b], seen_BV[b], num_tokens)
                     for b in range(len(params))])


def _assert_clear_of_boundaries(logits_BV, params, seen_BV, num_tokens, margin=1e-4):
    """No top-p cumulative sum and no min-p ratio lies within `margin` of its setting, so
    float32 rounding cannot flip a decision that float64 makes."""
    for b, p in enumerate(params):
        x = ref_mask([float(v) for v in logits_BV[b]], num_tokens)
        x = ref_temperature(ref_presence(ref_repetition(x, seen_BV[b], p.repetition_penalty),
                                         seen_BV[b], p.presence_penalty), p.temperature)
        x = ref_top_k(x, p.top_k)
        if p.top_p < 1:
            cums = np.cumsum(sorted(ref_softmax(x), reverse=True))
            assert np.min(np.abs(cums - p.top_p)) > margin, (b, p)
        x = ref_top_p(x, p.top_p)
        if p.min_p > 0:
            probs = np.array(ref_softmax(x))
            assert np.min(np.abs(probs / probs.max() - p.min_p)) > margin, (b, p)


def _assert_matches(got_BV, want_BV):
    got_BV = np.asarray(got_BV, np.float64)
    np.testing.assert_array_equal(np.isfinite(got_BV), np.isfinite(want_BV))
    np.testing.assert_allclose(got_BV, want_BV, rtol=2e-6, atol=2e-6)


# -------------------------------------------------------------------------------- fixtures
B, V, NUM_TOKENS = 6, 50, 45


def _random_batch(seed, quantize):
    rng = np.random.default_rng(seed)
    logits_BV = rng.normal(0.0, 2.0, (B, V))
    if quantize:  # multiples of 1/4 are exact in float32: ties by the dozen at every threshold
        logits_BV = np.round(logits_BV * 4) / 4
    seen_BV = rng.random((B, V)) < 0.3
    return logits_BV.astype(np.float32), seen_BV


# Per-row different settings, every row with some off values; row 0 is all off.
MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3),
    SamplingParams(temperature=1.5, top_p=0.8, presence_penalty=0.5),
    SamplingParams(temperature=0.0, top_k=3, repetition_penalty=1.2, presence_penalty=-0.3),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.6, min_p=0.05, repetition_penalty=0.8,
                   presence_penalty=1.0),
    SamplingParams(temperature=1.2, min_p=0.2),
]

# Each step alone, so a wrong step is named by the row that fails.
ALONE = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(temperature=0.4),
    SamplingParams(top_k=7),
    SamplingParams(top_p=0.55),
    SamplingParams(min_p=0.15),
]


# ------------------------------------------------------------------------ processed_logits
@pytest.mark.parametrize("params", [MIXED, ALONE], ids=["mixed", "alone"])
@pytest.mark.parametrize("quantize", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("num_tokens", [0, NUM_TOKENS])
def test_processed_logits_equals_the_reference(params, quantize, num_tokens):
    logits_BV, seen_BV = _random_batch(seed=1 + quantize, quantize=quantize)
    _assert_clear_of_boundaries(logits_BV, params, seen_BV, num_tokens)
    want_BV = ref_batch(logits_BV, params, seen_BV, num_tokens)
    got_BV = _processed(jnp.asarray(logits_BV), stack_params(params), jnp.asarray(seen_BV),
                        num_tokens=num_tokens)
    assert got_BV.dtype == jnp.float32 and got_BV.shape == (B, V)
    _assert_matches(got_BV, want_BV)
    # Every row but the all-off one must really change, or the comparison proves nothing.
    raw_BV = np.array([ref_mask(row, num_tokens) for row in logits_BV.astype(np.float64)])
    for b, p in enumerate(params):
        changed = not np.array_equal(want_BV[b], raw_BV[b])
        assert changed == (p != SamplingParams()), (b, p)


def test_off_values_leave_a_row_bit_for_bit_unchanged_at_a_real_vocabulary_size():
    # 50257 tokens with a long tail: the float32 cumulative sum reaches 1 before its end, so
    # a top_p = 1 that ran the nucleus cut would drop tokens.
    rng = np.random.default_rng(0)
    logits_BV = rng.normal(0.0, 4.0, (2, 50257))
    logits_BV[:, :3] = [80.0, -1e4, NEG_INF]  # exp(-1e4 - 80) underflows: off min-p keeps it
    logits_BV = jnp.asarray(logits_BV, jnp.float32)
    seen_BV = jnp.asarray(rng.random((2, 50257)) < 0.1)
    off = stack_params([SamplingParams(), SamplingParams(seed=3)])
    got_BV = _processed(logits_BV, off, seen_BV)
    np.testing.assert_array_equal(np.asarray(got_BV), np.asarray(logits_BV))
    cut = _processed(logits_BV, stack_params([SamplingParams(top_p=0.999)] * 2), seen_BV)
    assert int(jnp.sum(jnp.isinf(cut))) > 0  # the same rows do change when it is on


def _one_row(logits, params, seen=None, num_tokens=0):
    seen = np.zeros(len(logits), bool) if seen is None else np.asarray(seen)
    got = _processed(jnp.asarray([logits], jnp.float32), stack_params([params]),
                     jnp.asarray([seen]), num_tokens=num_tokens)[0]
    want = ref_processed(logits, params, seen, num_tokens)
    _assert_matches(got[None], want[None])
    return np.isfinite(np.asarray(got))


def test_penalties_by_hand():
    seen = [True, True, False, False, True]
    logits = [2.0, -2.0, 2.0, -2.0, 0.0]
    got = _processed(jnp.asarray([logits] * 2), stack_params(
        [SamplingParams(repetition_penalty=2.0), SamplingParams(presence_penalty=0.5)]),
        jnp.asarray([seen] * 2))
    np.testing.assert_array_equal(np.asarray(got), [[1.0, -4.0, 2.0, -2.0, 0.0],
                                                    [1.5, -2.5, 2.0, -2.0, -0.5]])
    assert ref_repetition(logits, seen, 2.0) == [1.0, -4.0, 2.0, -2.0, 0.0]
    assert ref_presence(logits, seen, 0.5) == [1.5, -2.5, 2.0, -2.0, -0.5]


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = [1.0, 3.0, 2.0, 2.0, 0.0, 2.0]
    assert _one_row(logits, SamplingParams(top_k=2)).tolist() == [0, 1, 1, 1, 0, 1]
    assert _one_row(logits, SamplingParams(top_k=1)).tolist() == [0, 1, 0, 0, 0, 0]
    assert _one_row(logits, SamplingParams(top_k=6)).all()  # k = V keeps all
    # k beyond the real tokens (num_tokens = 3): every real token survives, padding does not.
    assert _one_row(logits, SamplingParams(top_k=5), num_tokens=3).tolist() == [1, 1, 1, 0, 0, 0]


def test_top_p_boundaries_and_ties():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted cumulative sums: 0.5, 0.8, 0.95, 1
    logits = np.log(probs).tolist()
    assert _one_row(logits, SamplingParams(top_p=0.799)).tolist() == [0, 1, 0, 1]
    assert _one_row(logits, SamplingParams(top_p=0.801)).tolist() == [0, 1, 1, 1]
    assert _one_row(logits, SamplingParams(top_p=0.3)).tolist() == [0, 1, 0, 0]
    assert _one_row(logits, SamplingParams(top_p=1e-6)).tolist() == [0, 1, 0, 0]  # never empty
    # Uniform over four ids: probabilities exactly 1/4, so top_p = 0.5 sits exactly on the sum
    # of two. The nucleus stops at two tokens and widens to the two tied with them.
    uniform = [0.0, NEG_INF, 0.0, 0.0, NEG_INF, 0.0]
    assert _one_row(uniform, SamplingParams(top_p=0.5)).tolist() == [1, 0, 1, 1, 0, 1]
    # Two levels, each tied: [a, a, b, b] with top_p inside the first pair's mass keeps the pair.
    pairs = [1.0, 1.0, 0.0, 0.0]
    assert _one_row(pairs, SamplingParams(top_p=0.6)).tolist() == [1, 1, 0, 0]
    assert _one_row(pairs, SamplingParams(top_p=0.8)).tolist() == [1, 1, 1, 1]


def test_exact_boundaries_stop_the_nucleus_and_keep_the_min_p_ratio():
    # ln 4, ln 2, 0, 0 in float32 differ by exactly float32(ln 2), whose float32 exp is 0.5 on
    # CPU: probabilities 1/2, 1/4, 1/8, 1/8 with no rounding, so top_p = 3/4 is met exactly by
    # two tokens that are not tied with the third. (In float64 those logits are not exactly
    # ln 2 apart, so this case is checked against the rule, not the reference.)
    row = np.log([4.0, 2.0, 1.0, 1.0]).astype(np.float32)
    if jax.jit(jax.nn.softmax)(row).tolist() != [0.5, 0.25, 0.125, 0.125]:
        pytest.skip("this backend's float32 exp is not exact at ln 2")
    arrays = stack_params([SamplingParams(top_p=0.75), SamplingParams(min_p=0.5)])
    got = _processed(jnp.asarray([row, row]), arrays, jnp.zeros((2, 4), bool))
    assert np.isfinite(np.asarray(got)).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_min_p_and_greedy_by_hand():
    logits = np.log([1.0, 0.5, 0.2, 0.1]).tolist()
    assert _one_row(logits, SamplingParams(min_p=0.3)).tolist() == [1, 1, 0, 0]
    assert _one_row(logits, SamplingParams(min_p=0.99)).tolist() == [1, 0, 0, 0]
    tied = [1.0, 3.0, 3.0, 2.0]
    assert _one_row(tied, SamplingParams(temperature=0.0)).tolist() == [0, 1, 0, 0]
    # Greedy follows the penalised logits: seen id 1 loses to id 2.
    assert _one_row(tied, SamplingParams(temperature=0.0, presence_penalty=0.1),
                    seen=[False, True, False, False]).tolist() == [0, 0, 1, 0]


def test_settings_are_traced_so_new_settings_do_not_recompile():
    traces = []

    @jax.jit
    def f(logits_BV, arrays, seen_BV):
        traces.append(1)
        return processed_logits(logits_BV, arrays, seen_BV)

    logits_BV, seen_BV = _random_batch(seed=3, quantize=False)
    a = f(logits_BV, stack_params(MIXED), seen_BV)
    b = f(logits_BV, stack_params(ALONE), seen_BV)
    assert len(traces) == 1 and not np.array_equal(np.asarray(a), np.asarray(b))


def test_stack_params_dtypes_and_request_keys():
    arrays = stack_params(MIXED)
    assert isinstance(arrays, SamplerArrays)
    for name, leaf in vars(arrays).items():
        assert leaf.shape == (B,), name
        assert leaf.dtype == (jnp.int32 if name == "top_k_B" else jnp.float32), name
    np.testing.assert_array_equal(arrays.top_k_B, [p.top_k for p in MIXED])
    keys = request_keys([SamplingParams(seed=5), SamplingParams(seed=9)])
    np.testing.assert_array_equal(jax.random.key_data(keys[1]),
                                  jax.random.key_data(jax.random.key(9)))


# --------------------------------------------------------------------------- sample_tokens
def _mixed_inputs(seed=4):
    logits_BV, seen_BV = _random_batch(seed=seed, quantize=False)
    # Make row 3's (greedy) penalty move its argmax, so "argmax of the raw logits" fails.
    top = int(np.argmax(logits_BV[3]))
    seen_BV[3] = False
    seen_BV[3, top] = True
    logits_BV[3, (top + 1) % V] = logits_BV[3, top] - 0.1
    return jnp.asarray(logits_BV), jnp.asarray(seen_BV)


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    logits_BV, seen_BV = _mixed_inputs()
    arrays = stack_params(MIXED)
    row = ref_mask(np.asarray(logits_BV[3], np.float64).tolist(), NUM_TOKENS)
    want = int(np.argmax(ref_presence(ref_repetition(row, seen_BV[3], 1.2), seen_BV[3], -0.3)))
    assert want != int(np.argmax(logits_BV[3]))
    for seed in range(3):  # any key
        tokens_B, _ = _sample(logits_BV, arrays, seen_BV, jax.random.split(jax.random.key(seed), B),
                              num_tokens=NUM_TOKENS)
        assert int(tokens_B[3]) == want


def test_rows_sample_with_categorical_of_their_own_key_and_batching_changes_nothing():
    logits_BV, seen_BV = _mixed_inputs()
    arrays = stack_params(MIXED)
    keys_B = jax.random.split(jax.random.key(7), B)
    tokens_B, logprobs_B = _sample(logits_BV, arrays, seen_BV, keys_B, num_tokens=NUM_TOKENS)
    assert tokens_B.dtype == jnp.int32 and logprobs_B.dtype == jnp.float32
    again_B, _ = _sample(logits_BV, arrays, seen_BV, keys_B, num_tokens=NUM_TOKENS)
    np.testing.assert_array_equal(tokens_B, again_B)  # a fixed key reproduces
    x_BV = _processed(logits_BV, arrays, seen_BV, num_tokens=NUM_TOKENS)
    for b in range(B):
        alone = stack_params([MIXED[b]])
        tok, lp = _sample(logits_BV[b:b + 1], alone, seen_BV[b:b + 1], keys_B[b:b + 1],
                          num_tokens=NUM_TOKENS)
        assert int(tok[0]) == int(tokens_B[b]) and float(lp[0]) == float(logprobs_B[b]), b
        np.testing.assert_array_equal(
            _processed(logits_BV[b:b + 1], alone, seen_BV[b:b + 1], num_tokens=NUM_TOKENS)[0],
            x_BV[b])
    np.testing.assert_array_equal(tokens_B, _categorical(keys_B, x_BV))
    assert int(tokens_B.max()) < NUM_TOKENS


def test_different_keys_give_different_draws():
    uniform_BV = jnp.zeros((B, V), jnp.float32)  # 6 uniform draws out of 45 agree w.p. 45^-6
    arrays = stack_params([SamplingParams()] * B)
    seen_BV = jnp.zeros((B, V), bool)
    a, _ = _sample(uniform_BV, arrays, seen_BV, jax.random.split(jax.random.key(0), B),
                   num_tokens=NUM_TOKENS)
    b, _ = _sample(uniform_BV, arrays, seen_BV, jax.random.split(jax.random.key(1), B),
                   num_tokens=NUM_TOKENS)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_logprobs_are_the_models_raw_distribution():
    logits_BV, seen_BV = _mixed_inputs()
    arrays = stack_params(MIXED)
    tokens_B, logprobs_B = _sample(logits_BV, arrays, seen_BV,
                                   jax.random.split(jax.random.key(2), B), num_tokens=NUM_TOKENS)
    raw = np.asarray(logits_BV, np.float64)[:, :NUM_TOKENS]
    log_softmax = raw - raw.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    want_B = log_softmax[np.arange(B), np.asarray(tokens_B)]
    np.testing.assert_allclose(logprobs_B, want_B, rtol=1e-5, atol=1e-5)
    # The processed distribution's log-probabilities are far from these (greedy row: 0).
    processed = ref_batch(np.asarray(logits_BV), MIXED, np.asarray(seen_BV), NUM_TOKENS)
    processed -= np.log(np.exp(processed).sum(-1, keepdims=True))
    assert np.max(np.abs(processed[np.arange(B), np.asarray(tokens_B)] - want_B)) > 0.1


def test_empirical_frequencies_match_the_reference_distribution():
    N = 20_000
    logits_V = np.array([1.0, 0.5, 0.0, -0.5, 2.0], np.float32)
    seen_V = np.array([False, True, False, True, True])
    settings = [SamplingParams(temperature=0.6),
                SamplingParams(temperature=1.3, top_k=3),
                SamplingParams(top_p=0.75, presence_penalty=-0.4),
                SamplingParams(temperature=0.8, min_p=0.2, repetition_penalty=1.5),
                SamplingParams(top_k=4, top_p=0.9, min_p=0.1, presence_penalty=0.7)]
    S = len(settings)
    logits_BV = jnp.asarray(np.tile(logits_V, (S * N, 1)))
    seen_BV = jnp.asarray(np.tile(seen_V, (S * N, 1)))
    arrays = stack_params([p for p in settings for _ in range(N)])
    tokens_B, _ = _sample(logits_BV, arrays, seen_BV, jax.random.split(jax.random.key(11), S * N))
    counts_SV = np.stack([np.bincount(np.asarray(tokens_B[s * N:(s + 1) * N]), minlength=5)
                          for s in range(S)])
    raw_V = np.array(ref_softmax(logits_V.astype(np.float64).tolist()))
    for s, p in enumerate(settings):
        want_V = np.array(ref_softmax(ref_processed(logits_V, p, seen_V).tolist()))
        freq_V = counts_SV[s] / N
        # Five standard errors of a frequency, sqrt(p (1 - p) / N) <= 0.0036 here: a false
        # failure has probability ~6e-7 per token (25 comparisons in all), while a sampler that
        # ignored a setting would be off by many errors (checked on the raw distribution).
        tol_V = 5 * np.sqrt(want_V * (1 - want_V) / N)
        np.testing.assert_array_less(np.abs(freq_V - want_V), tol_V + 1e-12, err_msg=str(p))
        assert np.any(np.abs(raw_V - want_V) > 3 * tol_V + 0.01), p  # the test can fail


# ---------------------------------------------------------------------------------- check
@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_k", 51), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("min_p", -0.01), ("min_p", 1.0), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("presence_penalty", math.nan), ("presence_penalty", math.inf), ("presence_penalty", -math.inf),
    ("seed", -1),
])
def test_check_names_the_bad_field(field, value):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**{field: value}).check(vocab_size=50)
    message = str(e.value)
    assert f"{field}={value!r}" in message and "\n" not in message, message


def test_check_accepts_every_edge_of_the_valid_ranges():
    for p in [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=50),
              SamplingParams(top_p=1.0), SamplingParams(top_p=1e-9), SamplingParams(min_p=0.999),
              SamplingParams(repetition_penalty=1e-3), SamplingParams(presence_penalty=-2.0),
              SamplingParams(seed=2**40)]:
        p.check(vocab_size=50)
