"""The acceptance rule of speculative decoding: modified rejection sampling of draft tokens.

A small draft model proposes γ tokens x_0..x_{γ-1}, drawn autoregressively from its
distributions q_i; the target model scores all of them in one forward pass, giving p_i at each
draft position and p_γ after the last one. Going left to right, x_i is kept with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from the residual
normalise(max(0, p_i − q_i)), and if nothing is rejected it is drawn from p_γ (Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023). The kept
tokens followed by that one token are distributed exactly as if the target had been sampled
token by token: P(first emitted = a) = min(p, q)(a) + (1 − Σ min(p, q)) · residual(a) = p(a).

Why the formulas look the way they do:

- Acceptance is tested as `u · q(x) < p(x)` with u uniform in [0, 1), never as a ratio, so
  q(x) = 0 needs no special case (accepted when p(x) > 0, rejected when p(x) = 0 too). For
  one-hot p and q (temperature 0) this is exactly "accept while the draft token is the target's
  argmax".
- q is padded with a zero row at position γ, so "all accepted, draw from p_γ" is the residual
  max(0, p_γ − 0) = p_γ: one formula for every outcome.
- Where p = q at a rejection the residual is zero everywhere (impossible in exact arithmetic,
  since then the acceptance probability is 1, but float rounding can get there): it falls back
  to p_i rather than dividing 0 by 0.

Random draws. Each row b has its own typed key `keys_B[b]`, split once:
`key_accept, key_next = jax.random.split(keys_B[b])`;
`u_R = jax.random.uniform(key_accept, (γ,))` (float32, [0, 1)) decides the γ acceptances;
`next_token = jax.random.categorical(key_next, jnp.log(dist_V))` draws the one extra token from
the residual (or p_γ) at position num_accepted. Rows never share a draw, and row b's result
depends only on row b's inputs and key (the rule is `vmap`ped over rows).

Shapes: B batch (rows decoded side by side), V vocabulary, and here R the γ draft tokens of a round
(`jaxsys.model.axes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _accept_row(target_probs_RV: jax.Array, draft_probs_RV: jax.Array, draft_tokens_R: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One row of `accept_draft`; `target_probs_RV` has γ + 1 positions, the others γ."""
    num_draft = draft_tokens_R.shape[0]
    key_accept, key_next = jax.random.split(key)
    u_R = jax.random.uniform(key_accept, (num_draft,), jnp.float32)

    tokens_R1 = draft_tokens_R[:, None]
    p_of_draft_R = jnp.take_along_axis(target_probs_RV[:num_draft], tokens_R1, axis=1)[:, 0]
    q_of_draft_R = jnp.take_along_axis(draft_probs_RV, tokens_R1, axis=1)[:, 0]
    accepted_R = u_R * q_of_draft_R < p_of_draft_R  # u < p/q without dividing (q may be 0)
    # Accepted positions before the first rejection: the length of the leading run of Trues.
    num_accepted = jnp.sum(jnp.cumprod(accepted_R.astype(jnp.int32)))

    # A zero draft row at position γ turns "all accepted, draw from p_γ" into the residual rule.
    p_V = target_probs_RV[num_accepted]
    q_V = jnp.concatenate([draft_probs_RV, jnp.zeros_like(draft_probs_RV[:1])])[num_accepted]
    residual_V = jnp.maximum(p_V - q_V, 0.0)
    total = jnp.sum(residual_V)
    dist_V = jnp.where(total > 0, residual_V / jnp.where(total > 0, total, 1.0), p_V)
    next_token = jax.random.categorical(key_next, jnp.log(dist_V))
    return num_accepted.astype(jnp.int32), next_token.astype(jnp.int32)


@jax.jit
def accept_draft(target_probs_BRV: jax.Array, draft_probs_BRV: jax.Array, draft_tokens_BR: jax.Array,
                 keys_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(num_accepted_B int32 in [0, γ], next_token_B int32): verify γ draft tokens per row.

    target_probs_BRV: float32 [B, γ+1, V], the target model's sampling distribution at each of
    the γ draft positions plus the one after the last draft token (p_0..p_γ);
    draft_probs_BRV: float32 [B, γ, V], the draft model's sampling distribution (q_0..q_{γ-1})
    from which draft_tokens_BR [B, γ] (int token ids) were drawn;
    keys_B: one typed PRNG key per row (`jax.random.key`), shape [B].

    For i = 0..γ-1: accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the
    first rejection i, next_token is drawn from normalise(max(0, p_i − q_i)) (p_i if that is all
    zero) and num_accepted = i; if all γ are accepted, next_token is drawn from p_γ and
    num_accepted = γ. The emitted tokens are draft_tokens[:num_accepted] followed by
    next_token; their joint distribution equals sampling the target autoregressively. With
    one-hot p and q this is greedy verification: accept while the draft token is the target's
    argmax, then emit the target's argmax. The draws each key is split into are in the module
    docstring."""
    if not jax.dtypes.issubdtype(keys_B.dtype, jax.dtypes.prng_key):
        raise TypeError("keys_B must be typed PRNG keys (jax.random.key / jax.random.split of one), "
                        f"got dtype {keys_B.dtype}.")
    B, R = draft_tokens_BR.shape
    V = draft_probs_BRV.shape[-1]
    if draft_probs_BRV.shape != (B, R, V) or target_probs_BRV.shape != (B, R + 1, V) or keys_B.shape != (B,):
        raise ValueError(f"Expected target_probs [B, γ+1, V], draft_probs [B, γ, V], draft_tokens "
                         f"[B, γ], keys [B]; got {target_probs_BRV.shape}, {draft_probs_BRV.shape}, "
                         f"{draft_tokens_BR.shape}, {keys_B.shape}.")
    return jax.vmap(_accept_row)(target_probs_BRV.astype(jnp.float32), draft_probs_BRV.astype(jnp.float32),
                                 draft_tokens_BR.astype(jnp.int32), keys_B)
