"""Speculative decoding's acceptance rule: exact in distribution, greedy at temperature 0.

Shapes: B batch, U simulated runs (one per key), R the γ draft tokens of a round, V vocabulary.

The statistical tests use fixed seeds (so they are deterministic) and a tolerance of 5 standard
errors per cell, the standard error computed from the exact probability and the sample size:
sqrt(p (1 − p) / N). Each also checks that a wrong rule lands outside that tolerance.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.inference.speculative_rule import accept_draft

V = 5  # vocabulary of the toy models
GAMMA = 3  # draft tokens per round
CONTEXT = 0  # the token every simulation starts after
Z_TOL = 5.0  # standard errors


def _tables(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Target P[prev, next] and a different draft Q[prev, next], rows from Dirichlet(1)."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(V), size=V), rng.dirichlet(np.ones(V), size=V)


def _max_z(empirical: np.ndarray, exact: np.ndarray, n: int) -> float:
    """Largest |empirical − exact| in standard errors sqrt(exact (1 − exact) / n)."""
    return float(np.max(np.abs(empirical - exact) / np.sqrt(exact * (1 - exact) / n)))


# Wrong rules with accept_draft's signature: the tests must be able to tell them apart.
def _always_accept(target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B):
    B, R = draft_tokens_BR.shape
    next_B = jax.vmap(jax.random.categorical)(keys_B, jnp.log(target_probs_BRV[:, R]))
    return jnp.full((B,), R, jnp.int32), next_B.astype(jnp.int32)


def _resample_from_target(target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B):
    """The right acceptance test, but after a rejection a fresh draw from p_i (no residual)."""
    B, R = draft_tokens_BR.shape
    keys_B2 = jax.vmap(partial(jax.random.split, num=2))(keys_B)
    u_BR = jax.vmap(lambda k: jax.random.uniform(k, (R,)))(keys_B2[:, 0])
    p_BR = jnp.take_along_axis(target_probs_BRV[:, :R], draft_tokens_BR[..., None], axis=2)[..., 0]
    q_BR = jnp.take_along_axis(draft_probs_BRV, draft_tokens_BR[..., None], axis=2)[..., 0]
    n_B = jnp.sum(jnp.cumprod((u_BR * q_BR < p_BR).astype(jnp.int32), axis=1), axis=1)
    p_BV = target_probs_BRV[jnp.arange(B), n_B]
    next_B = jax.vmap(jax.random.categorical)(keys_B2[:, 1], jnp.log(p_BV))
    return n_B.astype(jnp.int32), next_B.astype(jnp.int32)


@partial(jax.jit, static_argnames=("rule", "num_rounds", "length"))
def _simulate(rule, P_VV: jax.Array, Q_VV: jax.Array, keys_U: jax.Array, *, num_rounds: int,
              length: int) -> tuple[jax.Array, jax.Array]:
    """The first `length` emitted tokens of `num_rounds` speculative rounds per key, int32 [U, length],
    and the first round's num_accepted [U].

    Each round re-drafts γ tokens from Q after the last emitted token (the context at first),
    scores them with P and emits draft[:n] + [next]. Every round emits ≥ 1 token, so
    `num_rounds` ≥ `length` rounds always reach `length` tokens: the statistic is a fixed-length
    prefix of the output stream, with no selection on what the rounds did."""
    U = keys_U.shape[0]
    rows_U = jnp.arange(U)
    buf_UT = jnp.zeros((U, 1 + num_rounds * (GAMMA + 1)), jnp.int32).at[:, 0].set(CONTEXT)
    length_U = jnp.ones((U,), jnp.int32)  # tokens in buf, the context included
    first_accepted_U = None
    for _ in range(num_rounds):
        keys_U3 = jax.vmap(partial(jax.random.split, num=GAMMA + 1))(keys_U)
        keys_U, draft_keys_UR = keys_U3[:, 0], keys_U3[:, 1:]
        prev_U = buf_UT[rows_U, length_U - 1]
        drafts, target_probs, draft_probs = [], [], []
        for i in range(GAMMA):
            target_probs.append(P_VV[prev_U])
            draft_probs.append(Q_VV[prev_U])
            prev_U = jax.vmap(jax.random.categorical)(draft_keys_UR[:, i], jnp.log(Q_VV[prev_U]))
            prev_U = prev_U.astype(jnp.int32)
            drafts.append(prev_U)
        target_probs.append(P_VV[prev_U])
        keys_U2 = jax.vmap(partial(jax.random.split, num=2))(keys_U)
        keys_U, accept_keys_U = keys_U2[:, 0], keys_U2[:, 1]
        draft_tokens_UR = jnp.stack(drafts, 1)
        n_U, next_U = rule(jnp.stack(target_probs, 1), jnp.stack(draft_probs, 1), draft_tokens_UR,
                           accept_keys_U)
        if first_accepted_U is None:
            first_accepted_U = n_U
        slots = jnp.arange(GAMMA + 1)
        tokens_UR1 = jnp.concatenate([draft_tokens_UR, jnp.zeros((U, 1), jnp.int32)], 1)
        tokens_UR1 = jnp.where(slots == n_U[:, None], next_U[:, None], tokens_UR1)
        # Slots after next_U hold junk; the next round overwrites them from length_U on.
        buf_UT = buf_UT.at[rows_U[:, None], length_U[:, None] + slots].set(tokens_UR1)
        length_U = length_U + n_U + 1
    return buf_UT[:, 1:1 + length], first_accepted_U


def _stream_statistics_z(rule, num_samples: int, seed: int) -> float:
    """Largest deviation, in standard errors, of the emitted stream from the target's exact law:
    the first token's distribution, and the joint of tokens (t, t+1) for t = 0..γ−1."""
    P_VV, Q_VV = _tables(seed)
    keys_U = jax.random.split(jax.random.key(seed), num_samples)
    length = GAMMA + 1
    tokens_UT, _ = _simulate(rule, jnp.asarray(P_VV, jnp.float32), jnp.asarray(Q_VV, jnp.float32), keys_U,
                             num_rounds=length, length=length)
    tokens_UT = np.asarray(tokens_UT)
    marginal_V = P_VV[CONTEXT]  # exact law of token 0; token t+1's is marginal_V @ P
    zs = [_max_z(np.bincount(tokens_UT[:, 0], minlength=V) / num_samples, marginal_V, num_samples)]
    for t in range(GAMMA):
        joint_VV = marginal_V[:, None] * P_VV  # exact p(token t = a) p(b | a)
        pairs_U = tokens_UT[:, t] * V + tokens_UT[:, t + 1]
        zs.append(_max_z(np.bincount(pairs_U, minlength=V * V) / num_samples, joint_VV.ravel(), num_samples))
        marginal_V = marginal_V @ P_VV
    return max(zs)


def test_emitted_tokens_are_distributed_as_the_target():
    num_samples, seed = 100_000, 0
    P_VV, Q_VV = _tables(seed)
    assert np.abs(P_VV - Q_VV).max() > 0.2  # the draft really is a different model
    assert _stream_statistics_z(accept_draft, num_samples, seed) <= Z_TOL
    # The same statistic rejects a rule that keeps every draft token, and one that accepts
    # correctly but resamples from p instead of the residual max(0, p − q).
    assert _stream_statistics_z(_always_accept, num_samples, seed) > Z_TOL
    assert _stream_statistics_z(_resample_from_target, num_samples, seed) > Z_TOL


def _num_accepted_law(alpha: float) -> np.ndarray:
    """P(num_accepted = i), i = 0..γ, when each position is accepted independently w.p. alpha."""
    return np.array([alpha ** i * (1 - alpha) for i in range(GAMMA)] + [alpha ** GAMMA])


def test_acceptance_count_matches_the_closed_form():
    num_samples = 200_000
    rng = np.random.default_rng(1)
    p_V, q_V = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    # Position-independent p, q and i.i.d. draft tokens: each position is accepted w.p.
    # Σ_x q(x) min(1, p(x)/q(x)) = Σ min(p, q), independently of the others.
    alpha = float(np.minimum(p_V, q_V).sum())
    keys_U = jax.random.split(jax.random.key(1), num_samples + 1)
    draft_tokens_UR = jax.random.categorical(keys_U[0], jnp.log(jnp.asarray(q_V, jnp.float32)),
                                             shape=(num_samples, GAMMA)).astype(jnp.int32)
    target_probs_URV = jnp.broadcast_to(jnp.asarray(p_V, jnp.float32), (num_samples, GAMMA + 1, V))
    draft_probs_URV = jnp.broadcast_to(jnp.asarray(q_V, jnp.float32), (num_samples, GAMMA, V))
    n_U, _ = accept_draft(target_probs_URV, draft_probs_URV, draft_tokens_UR, keys_U[1:])
    n_U = np.asarray(n_U)

    law = _num_accepted_law(alpha)
    assert _max_z(np.bincount(n_U, minlength=GAMMA + 1) / num_samples, law, num_samples) <= Z_TOL
    # E[num_accepted] = Σ_{i=1..γ} α^i = (1 − α^{γ+1}) / (1 − α) − 1.
    mean = (1 - alpha ** (GAMMA + 1)) / (1 - alpha) - 1
    counts = np.arange(GAMMA + 1)
    assert np.isclose(mean, law @ counts)
    std_error = np.sqrt((law @ counts ** 2 - mean ** 2) / num_samples)
    assert abs(n_U.mean() - mean) <= Z_TOL * std_error
    # Accepting only on an exact match with a sample from p (rate Σ p q) is also exact in
    # distribution, but accepts fewer tokens: this test tells the two apart.
    match_mean = _num_accepted_law(float(p_V @ q_V)) @ counts
    assert abs(n_U.mean() - match_mean) > Z_TOL * std_error


def _one_hot(ids, num_classes: int = 6) -> jax.Array:
    return jax.nn.one_hot(jnp.asarray(ids), num_classes, dtype=jnp.float32)


@pytest.mark.parametrize("soft_draft", [False, True])
def test_one_hot_target_is_greedy_verification(soft_draft: bool):
    target_argmax = [2, 4, 1, 5]  # γ + 1 positions
    cases = {  # draft tokens -> (num_accepted, next_token) of "accept while equal to argmax"
        (2, 4, 1): (3, 5),  # all accepted: next is the argmax after the last draft
        (3, 4, 1): (0, 2),  # first rejected
        (2, 0, 1): (1, 4),  # middle rejected
        (2, 4, 3): (2, 1),  # last rejected
    }
    B = len(cases)
    draft_tokens_BR = jnp.array(list(cases), jnp.int32)
    target_probs_BRV = jnp.broadcast_to(_one_hot(target_argmax), (B, GAMMA + 1, 6))
    if soft_draft:  # the draft sampled at temperature > 0, the target greedy: still greedy
        draft_probs_BRV = 0.5 * _one_hot(draft_tokens_BR) + 0.5 / 6
    else:
        draft_probs_BRV = _one_hot(draft_tokens_BR)
    expected = np.array(list(cases.values()))
    for seed in range(5):
        n_B, next_B = accept_draft(target_probs_BRV, draft_probs_BRV, draft_tokens_BR,
                                   jax.random.split(jax.random.key(seed), B))
        np.testing.assert_array_equal(np.stack([n_B, next_B], 1), expected)
        assert n_B.dtype == jnp.int32 and next_B.dtype == jnp.int32


def test_residual_that_is_all_zero_falls_back_to_the_target():
    # p_0 = q_0 and the draft token has p = q = 0 there: rejected, and max(0, p − q) = 0.
    p_V = jnp.array([0.0, 0.5, 0.5, 0.0])
    B = 256
    target_probs_BRV = jnp.broadcast_to(p_V, (B, 2, 4))
    draft_probs_BRV = jnp.broadcast_to(p_V, (B, 1, 4))
    n_B, next_B = accept_draft(target_probs_BRV, draft_probs_BRV, jnp.zeros((B, 1), jnp.int32),
                               jax.random.split(jax.random.key(0), B))
    assert np.all(np.asarray(n_B) == 0)
    assert set(np.asarray(next_B).tolist()) == {1, 2}  # drawn from p_0, both tokens seen
    # p = q where q > 0: always accepted, and the last token comes from p_γ.
    n_B, next_B = accept_draft(target_probs_BRV, draft_probs_BRV, jnp.ones((B, 1), jnp.int32),
                               jax.random.split(jax.random.key(1), B))
    assert np.all(np.asarray(n_B) == 1) and set(np.asarray(next_B).tolist()) == {1, 2}


def _random_inputs(B: int, seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    target_probs_BRV = jnp.asarray(rng.dirichlet(np.ones(V), size=(B, GAMMA + 1)), jnp.float32)
    draft_probs_BRV = jnp.asarray(rng.dirichlet(np.ones(V), size=(B, GAMMA)), jnp.float32)
    draft_tokens_BR = jnp.asarray(rng.integers(0, V, size=(B, GAMMA)), jnp.int32)
    return target_probs_BRV, draft_probs_BRV, draft_tokens_BR, jax.random.split(jax.random.key(seed), B)


def test_a_row_gives_the_same_result_alone_and_in_a_batch():
    B = 64
    target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B = _random_inputs(B, seed=2)
    n_B, next_B = map(np.asarray, accept_draft(target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B))
    assert len(set(n_B.tolist())) == GAMMA + 1  # the batch exercises every outcome
    for b in (0, 17, B - 1):
        row = slice(b, b + 1)
        n_1, next_1 = accept_draft(target_probs_BRV[row], draft_probs_BRV[row], draft_tokens_BR[row],
                                   keys_B[row])
        assert (int(n_1[0]), int(next_1[0])) == (n_B[b], next_B[b])
    perm = np.random.default_rng(3).permutation(B)
    n_P, next_P = accept_draft(target_probs_BRV[perm], draft_probs_BRV[perm], draft_tokens_BR[perm],
                               keys_B[perm])
    np.testing.assert_array_equal(n_P, n_B[perm])
    np.testing.assert_array_equal(next_P, next_B[perm])


def test_the_documented_draws_reproduce_the_result():
    B = 32
    target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B = _random_inputs(B, seed=4)
    n_B, next_B = accept_draft(target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B)
    p, q, x = map(np.asarray, (target_probs_BRV, draft_probs_BRV, draft_tokens_BR))
    for b in range(B):
        key_accept, key_next = jax.random.split(keys_B[b])
        u_R = np.asarray(jax.random.uniform(key_accept, (GAMMA,)))
        n = 0
        while n < GAMMA and u_R[n] < p[b, n, x[b, n]] / q[b, n, x[b, n]]:
            n += 1
        residual_V = np.maximum(p[b, n] - (q[b, n] if n < GAMMA else 0.0), 0.0)
        dist_V = jnp.asarray(residual_V / residual_V.sum(), jnp.float32)
        assert int(n_B[b]) == n
        assert int(next_B[b]) == int(jax.random.categorical(key_next, jnp.log(dist_V)))


def test_bad_inputs_are_refused():
    target_probs_BRV, draft_probs_BRV, draft_tokens_BR, keys_B = _random_inputs(2, seed=5)
    with pytest.raises(TypeError, match="typed PRNG keys"):
        raw_keys_B2 = jax.random.PRNGKey(0)[None].repeat(2, 0)  # legacy uint32 keys
        accept_draft(target_probs_BRV, draft_probs_BRV, draft_tokens_BR, raw_keys_B2)
    with pytest.raises(ValueError, match="γ\\+1"):
        accept_draft(target_probs_BRV[:, :GAMMA], draft_probs_BRV, draft_tokens_BR, keys_B)
