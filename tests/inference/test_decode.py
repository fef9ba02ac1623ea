"""KV-cache generation (`jaxsys.inference.decode`) against plain recomputation.

The reference everywhere is the model's plain forward pass, `model.apply({"params": p},
tokens_BT)`, which knows nothing of caches, buckets or padding. To keep the number of compiles
(nearly all of this file's run time) down, it runs on the sequence right-padded to `seq_len` and
is read at the sequence's last real index: the forward pass is causal, so that is the forward
pass of the sequence so far (`test_padded_reference_is_the_forward_pass_of_the_sequence_so_far`).
For the same reason the tests share two models and a few batch shapes.

Models: gpt2 with unscanned layers (context 16) and llama with grouped-query attention (4 query
heads, 2 KV heads) and scanned layers (context 32, so a prompt of 14 tokens starts in prefill
bucket 16 and decodes into 32 cache slots). They are "lively" (`_setup`): weight matrices scaled
up from their init, so that greedy decoding does not repeat one token, but not so far that the
model becomes ill-conditioned: scaled 10x everywhere, a 1-ulp perturbation of the weights moved
some logits by 3e-3, more than any float32 comparison can tolerate; with the gains below by at
most 1e-6 (gpt2) and 2e-6 (llama), measured over 16 random sequences.

Tolerances: float32 logits of two paths agree to ATOL = 1e-5 absolute (logits are O(1): about
100 ulps; the cached and uncached paths only sum in other orders). A log-probability,
logit - logsumexp(logits), moves by at most twice the largest logit error: LOGPROB_ATOL.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import ConfigError
from jaxsys.config.presets import tiny
from jaxsys.inference import decode
from jaxsys.inference.decode import MIN_BUCKET, TRACES, Generator, Request, bucket, empty_caches, prefill
from jaxsys.inference.quantize import QuantizedWeight, quantize_params
from jaxsys.inference.sampler import SamplingParams
from jaxsys.model import kv_cache
from jaxsys.model.params import path_str
from jaxsys.model.transformer import Transformer, init_params

ATOL = 1e-5
LOGPROB_ATOL = 2 * ATOL
GREEDY = SamplingParams(temperature=0.0)

# ModelConfig overrides of the tiny preset (gpt2, context 16, 2 layers, 32 wide, 4 heads).
MODELS = {
    "gpt2-unscanned": dict(scan_layers=False),
    "llama-gqa-scanned": dict(family="llama", num_kv_heads=2, scan_layers=True, seq_len=32),
}
GPT2, LLAMA = MODELS


def _gain(family: str, name: str) -> float:
    """How much `_setup` scales a weight matrix: embeddings 3x; attention 2x (sharper attention
    is what makes the model ill-conditioned); MLP 10x, or 6x for llama's gated MLP, which
    multiplies two projections."""
    if ".mlp." in f".{name}":
        return 6.0 if family == "llama" else 10.0
    return 2.0 if ".attn." in f".{name}" else 3.0


@functools.lru_cache(maxsize=None)
def _setup(name: str):
    """(model, lively float32 params) of MODELS[name]: weight matrices scaled by `_gain`, vectors
    (norm scales, biases) perturbed by N(0, 0.03) so that none is trivial (at 0.1, greedy gpt2
    fell into repeating one or two tokens)."""
    cfg = dataclasses.replace(tiny().model, **MODELS[name])

    def lively(path, x, k):
        name = path_str(path)
        axes = x.ndim - name.startswith("layers.")  # not counting scan's stacked layers axis
        if axes >= 2 and not name.split(".")[-1].startswith("b"):  # gpt2's bq [H, E] is a bias
            return x * _gain(cfg.family, name)
        return x + 0.03 * jax.random.normal(k, x.shape)

    @jax.jit  # one compile instead of hundreds of eager ops
    def make(key):
        params = init_params(cfg, key)
        keys = jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params)))
        keys = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(keys))
        return jax.tree_util.tree_map_with_path(lively, params, keys)
    return Transformer(cfg), make(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _jit_forward(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def ref_logits(model, params, seq) -> np.ndarray:
    """Plain forward logits [len(seq), V]: row t is the next-token logits after seq[:t + 1]."""
    padded = np.zeros((1, model.cfg.seq_len), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_jit_forward(model)(params, jnp.asarray(padded))[0, :len(seq)])


def log_softmax(x) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1))


def window(context: list[int], seq_len: int, keep: int | None = None) -> list[int]:
    """The documented rule: a context of seq_len tokens, once it has predicted the next token,
    is cut to its last seq_len // 2 (or `keep`) before that token is appended; the forward pass
    restarts its positions at 0."""
    return context[-(seq_len // 2 if keep is None else keep):] if len(context) == seq_len else context


def ref_greedy(model, params, prompt, n, keep=None):
    """(tokens, logprobs) of a plain greedy loop: one full forward per new token."""
    context, tokens, logprobs = list(prompt), [], []
    while len(tokens) < n:
        logits = ref_logits(model, params, context)[-1]
        tokens.append(int(np.argmax(logits)))
        logprobs.append(float(log_softmax(logits)[tokens[-1]]))
        context = window(context, model.cfg.seq_len, keep) + [tokens[-1]]
    return tokens, logprobs


def ref_forced(model, params, prompt, tokens) -> np.ndarray:
    """Plain forward logits [len(tokens), V] that predicted each of `tokens` after `prompt`
    (teacher-forced), under the window rule."""
    context, out = list(prompt), []
    for tok in tokens:
        out.append(ref_logits(model, params, context)[-1])
        context = window(context, model.cfg.seq_len) + [tok]
    return np.stack(out)


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


@functools.lru_cache(maxsize=None)
def _jit_decode(model):
    return jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, pos, c, method="decode"))


def cached_logits(model, params, prompts, steps, kv_dtype="float32", feed=None, skip=0, slots=0):
    """Drive the cache by hand: `decode.prefill` of the right-padded prompts into a cache of
    `slots` (default: as the generator sizes it), then `steps` single-token `Transformer.decode`
    calls, each row at its own next position (+ `skip`), feeding its greedy token (or
    feed[b][i]). Returns (per row: its sequence, and its logits [steps + 1, V] at positions
    len(prompt) - 1 ..)."""
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    S = slots or bucket(int(lengths.max()) + steps, model.cfg.seq_len)
    T = bucket(int(lengths.max()), S)  # the prompt bucket
    tokens_BT = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, :len(p)] = p
    caches = empty_caches(model, B, S, kv_dtype)
    logits_BV, caches = prefill(model, params, jnp.asarray(tokens_BT), jnp.asarray(lengths, jnp.int32), caches)
    seqs, out = [list(p) for p in prompts], [[np.asarray(logits_BV[b])] for b in range(B)]
    for i in range(steps):
        tok_B = [int(np.argmax(out[b][-1])) if feed is None else feed[b][i] for b in range(B)]
        for b in range(B):
            seqs[b].append(tok_B[b])
        pos_B1 = jnp.asarray(lengths + i + skip, jnp.int32)[:, None]
        logits_BTV, caches = _jit_decode(model)(params, jnp.asarray(tok_B, jnp.int32)[:, None], pos_B1, caches)
        for b in range(B):
            out[b].append(np.asarray(logits_BTV[b, 0]))
    return seqs, [np.stack(o) for o in out]


def _assert_consecutive_logits_differ(logits_TV):
    # Equality with the reference is not trivial: the logits change from position to position.
    gaps = np.abs(np.diff(logits_TV, axis=0)).max(axis=-1)
    assert gaps.min() > 1000 * ATOL, gaps


def _assert_same(got, want):
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=LOGPROB_ATOL)


# ----------------------------------------------------------------------------- the reference
@pytest.mark.slow  # long: the default run stays under its time budget
def test_padded_reference_is_the_forward_pass_of_the_sequence_so_far():
    for name, n in ((GPT2, 3), (LLAMA, 11)):
        model, params = _setup(name)
        seq = _prompt(model.cfg.seq_len, seed=3)
        padded = ref_logits(model, params, seq)
        plain = np.asarray(_jit_forward(model)(params, jnp.asarray(seq[:n])[None])[0, -1])
        np.testing.assert_allclose(padded[n - 1], plain, rtol=0, atol=ATOL)
        assert np.abs(padded[n - 1] - padded[n]).max() > 1000 * ATOL


# ----------------------------------------------------------------------------- 1. cache == recompute
# (model, prompt lengths of the rows, decode steps). The llama rows start in prefill bucket 16
# and decode into 32 slots: 14 + 16 = 30 tokens crosses the bucket boundary.
CACHE_CASES = [(GPT2, (5, 2, 9, 1), 7), (LLAMA, (14, 9, 3, 15), 16)]


@pytest.mark.parametrize("name,lengths,steps", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_cached_decoding_equals_full_recomputation_at_every_position(name, lengths, steps):
    model, params = _setup(name)
    if name == LLAMA:
        assert bucket(max(lengths), 32) == MIN_BUCKET < bucket(14 + steps, 32) == 32
    prompts = [_prompt(n, seed=n) for n in lengths]
    seqs, logits = cached_logits(model, params, prompts, steps)
    for prompt, seq, got in zip(prompts, seqs, logits):
        ref = ref_logits(model, params, seq)[len(prompt) - 1:]
        assert ref.shape == got.shape == (steps + 1, model.cfg.vocab_size)
        _assert_consecutive_logits_differ(ref)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_the_comparison_catches_a_cache_read_at_the_wrong_position(name):
    # The same drive with every decode one slot too far (a stale padding slot left visible, a
    # wrong position): the comparison above must reject it, by far.
    model, params = _setup(name)
    [(lengths, steps)] = [(lengths, steps) for n, lengths, steps in CACHE_CASES if n == name]
    prompts = [_prompt(n, seed=n) for n in lengths]
    slots = bucket(max(lengths) + steps, model.cfg.seq_len)  # the shapes of the test above
    seqs, logits = cached_logits(model, params, prompts, 1, skip=1, slots=slots)
    for prompt, seq, got in zip(prompts, seqs, logits):
        ref = ref_logits(model, params, seq)[len(prompt) - 1:]
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=ATOL)  # the prefill is right
        assert np.abs(got[1] - ref[1]).max() > 1000 * ATOL


# (model, prompt length, new tokens): the llama case crosses from prefill bucket 16 into 32
# slots, and both run past the context (test 4 below checks the window rule on its own).
GREEDY_CASES = [(GPT2, 5, 40), (LLAMA, 14, 40)]


@pytest.mark.parametrize("name,n_prompt,n_new", GREEDY_CASES, ids=[c[0] for c in GREEDY_CASES])
def test_generator_greedy_equals_a_plain_greedy_loop(name, n_prompt, n_new):
    model, params = _setup(name)
    prompt = _prompt(n_prompt, seed=n_prompt)
    want, want_lp = ref_greedy(model, params, prompt, n_new)
    assert len(set(want)) >= 5, want  # not one token repeated
    [got] = Generator(model, params).generate([Request(prompt, n_new, GREEDY)])
    assert got.tokens == want and got.finish_reason == "length"
    np.testing.assert_allclose(got.logprobs, want_lp, rtol=0, atol=LOGPROB_ATOL)


# ----------------------------------------------------------------------------- 2. batch == alone
def _mixed_llama_requests():
    return [Request(_prompt(3, 1), 40, SamplingParams(temperature=1.0, top_k=20, seed=1)),
            Request(_prompt(9, 2), 9, GREEDY),
            Request(_prompt(15, 3), 40, SamplingParams(temperature=1.0, top_p=0.9, seed=2)),
            Request(_prompt(9, 4), 9, SamplingParams(temperature=0.8, top_k=40, top_p=0.95,
                                                     repetition_penalty=1.3, seed=3))]


def test_batched_requests_equal_each_request_alone():
    # Prompts of 3, 9, 15 and 9 tokens, 40 or 9 new tokens (rows 0 and 2 slide past the
    # context of 32, rows 1 and 3 do not), greedy and sampled with top-k / top-p / penalty.
    model, params = _setup(LLAMA)
    requests = _mixed_llama_requests()
    gen = Generator(model, params)
    batched = gen.generate(requests)
    for r, got in zip(requests, batched):
        assert len(got.tokens) == r.max_new_tokens
        [alone] = gen.generate([r])
        _assert_same(got, alone)
    # The seed is used: the first request with another seed draws other tokens...
    r0 = requests[0]
    [reseeded] = gen.generate([dataclasses.replace(r0, sampling=dataclasses.replace(r0.sampling, seed=7))])
    assert reseeded.tokens != batched[0].tokens
    # ... and it really samples: greedy gives yet other tokens.
    [greedy0] = gen.generate([dataclasses.replace(r0, sampling=GREEDY)])
    assert greedy0.tokens != batched[0].tokens


def test_logprobs_are_the_models_log_probabilities_of_the_sampled_tokens():
    model, params = _setup(LLAMA)
    r = _mixed_llama_requests()[0]  # sampled, and past the context
    [got] = Generator(model, params).generate([r])
    ref = log_softmax(ref_forced(model, params, r.prompt_ids, got.tokens))
    np.testing.assert_allclose(got.logprobs, ref[np.arange(len(got.tokens)), got.tokens], rtol=0,
                               atol=LOGPROB_ATOL)


# ----------------------------------------------------------------------------- 3. stop ids
def test_stop_ids_end_their_row_only():
    model, params = _setup(GPT2)
    gen = Generator(model, params)
    prompts = [_prompt(3, 10), _prompt(4, 11), _prompt(2, 12), _prompt(6, 13)]
    budgets = (40, 40, 8, 0)
    free = gen.generate([Request(p, m, GREEDY) for p, m in zip(prompts, budgets)])
    # Row 0 stops at the first occurrence of its 4th token; row 2 at its 8th and last token,
    # given with a second stop id that never comes; row 3 has no budget at all.
    stop0, stop2 = free[0].tokens[3], free[2].tokens[7]
    cut0 = free[0].tokens.index(stop0)
    other2 = next(t for t in range(256) if t not in free[2].tokens)
    assert free[2].tokens.index(stop2) == 7, free[2].tokens
    requests = [Request(prompts[0], 40, GREEDY, stop_ids=(stop0,)),
                Request(prompts[1], 40, GREEDY),
                Request(prompts[2], 8, GREEDY, stop_ids=(other2, stop2)),
                Request(prompts[3], 0, GREEDY, stop_ids=(stop0,))]
    out = gen.generate(requests)
    assert (out[0].tokens, out[0].finish_reason) == (free[0].tokens[:cut0], "stop")
    np.testing.assert_allclose(out[0].logprobs, free[0].logprobs[:cut0], rtol=0, atol=LOGPROB_ATOL)
    _assert_same(out[1], free[1])  # the other rows continue, past the context
    assert len(out[1].tokens) == 40 and out[1].finish_reason == "length"
    assert (out[2].tokens, out[2].finish_reason) == (free[2].tokens[:7], "stop")
    assert (out[3].tokens, out[3].logprobs, out[3].finish_reason) == ([], [], "length")
    assert (free[2].finish_reason, free[3].tokens) == ("length", [])


def test_a_stop_id_in_the_prompt_does_not_stop_generation():
    model, params = _setup(GPT2)
    prompt = _prompt(4, 10)
    gen = Generator(model, params)
    [free] = gen.generate([Request(prompt, 40, GREEDY)])
    stop = next(t for t in prompt if t not in free.tokens)
    [got] = gen.generate([Request(prompt, 40, GREEDY, stop_ids=(stop,))])
    _assert_same(got, free)


# ----------------------------------------------------------------------------- 4. past the context
@pytest.mark.parametrize("name,n_prompt", [(GPT2, 5), (GPT2, 16), (LLAMA, 9)])
def test_generation_past_the_context_follows_the_documented_window(name, n_prompt):
    # 40 new tokens: gpt2 (context 16) slides 4 or 5 times, llama (context 32) twice; a prompt of
    # exactly seq_len tokens slides before its first new token.
    model, params = _setup(name)
    T = model.cfg.seq_len
    prompt = _prompt(n_prompt, seed=20 + n_prompt)
    want, want_lp = ref_greedy(model, params, prompt, 40)
    assert len(set(want)) >= 5, want
    # The rule is observable: keeping the last seq_len - 1 tokens instead predicts otherwise.
    other, other_lp = ref_greedy(model, params, prompt, 40, keep=T - 1)
    assert other != want and np.abs(np.subtract(other_lp, want_lp)).max() > 1000 * ATOL
    [got] = Generator(model, params).generate([Request(prompt, 40, GREEDY)])
    assert got.tokens == want and got.finish_reason == "length"
    np.testing.assert_allclose(got.logprobs, want_lp, rtol=0, atol=LOGPROB_ATOL)


def _sliding_gpt2_requests():
    return [Request(_prompt(10, 30), 40, GREEDY),
            Request(_prompt(3, 31), 40, SamplingParams(temperature=1.0, top_k=50, seed=4)),
            Request(_prompt(7, 32), 40, SamplingParams(temperature=1.0, top_p=0.8, seed=5)),
            Request(_prompt(2, 33), 40, GREEDY, stop_ids=(_prompt(3, 10)[0],))]


def test_a_row_that_slides_does_not_disturb_the_others():
    model, params = _setup(GPT2)
    requests = _sliding_gpt2_requests()
    gen = Generator(model, params)
    batched = gen.generate(requests)
    for r, got in zip(requests, batched):
        [alone] = gen.generate([r])
        _assert_same(got, alone)
    assert batched[0].tokens == ref_greedy(model, params, requests[0].prompt_ids, 40)[0]


def test_chunked_generation_equals_one_loop_and_can_finish_rows_early():
    model, params = _setup(GPT2)
    requests = _sliding_gpt2_requests()
    gen = Generator(model, params)
    whole = gen.generate(requests)
    seen = []
    chunked = gen.generate(requests, chunk=4, on_chunk=lambda rows: seen.append(rows))
    for got, want in zip(chunked, whole):
        _assert_same(got, want)
    assert seen[-1] == [c.tokens for c in whole]
    # Chunks of 4 steps, but a row that fills the 16 slots ends its chunk early for its slide:
    # row 0 (prompt 10) after 6 tokens, row 2 (prompt 7) after 9.
    assert [len(s[0]) for s in seen[:3]] == [4, 6, 9]
    early = gen.generate(requests, chunk=4, on_chunk=lambda rows: [0] if len(rows[0]) >= 4 else [])
    assert (early[0].tokens, early[0].finish_reason) == (whole[0].tokens[:4], "stop")
    for got, want in zip(early[1:], whole[1:]):
        _assert_same(got, want)


# ----------------------------------------------------------------------------- 5. compiles
@pytest.mark.slow  # long: the default run stays under its time budget
def test_one_prefill_trace_per_batch_prompt_bucket_and_cache_size():
    # A model no other test uses (one layer, context 32, an MLP of unusual width), so every shape
    # here is new. T is the prompt bucket, S the cache slots, O the new-token slots (decode's
    # docstring).
    cfg = dataclasses.replace(tiny().model, num_layers=1, seq_len=32, mlp_dim=48)
    gen = Generator(Transformer(cfg), jax.jit(functools.partial(init_params, cfg))(jax.random.key(0)))

    def run(lengths_and_new):
        before = dict(TRACES)
        gen.generate([Request(_prompt(n, n), m) for n, m in lengths_and_new])
        return {k: TRACES[k] - before.get(k, 0) for k in ("prefill", "decode")}

    #                                                               prefill (B, T, S)  decode (B, S, O)
    assert run([(3, 4), (9, 4)]) == {"prefill": 1, "decode": 1}   # (2, 16, 16)        (2, 16, 4)
    assert run([(12, 4), (5, 3)]) == {"prefill": 0, "decode": 0}  # the same shapes: reused
    assert run([(14, 4), (3, 4)]) == {"prefill": 1, "decode": 1}  # (2, 16, 32)        (2, 32, 4)
    assert run([(17, 4), (2, 4)]) == {"prefill": 1, "decode": 0}  # (2, 32, 32)        (2, 32, 4)
    assert run([(15, 1), (11, 4)]) == {"prefill": 0, "decode": 0}  # (2, 16, 16)       (2, 16, 4)
    assert gen.compiles == dict(TRACES)


# ----------------------------------------------------------------------------- 6. int8 KV cache
def test_int8_quantize_round_trip_is_within_half_a_scale_step():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * jnp.logspace(-3, 2, 5)[None, :, None, None]
    x = x.at[1, 2, 1].set(0.0)  # an all-zero vector stays zero
    q, scale = kv_cache.quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3) and scale.dtype == jnp.float32
    x, q, scale = np.asarray(x), np.asarray(q).astype(np.float32), np.asarray(scale)
    err = np.abs(q * scale[..., None] - x)
    # scale / 2 from rounding, plus float32 rounding of x / scale and of q * scale.
    bound = scale[..., None] / 2 + 4 * np.finfo(np.float32).eps * np.abs(x)
    assert (err <= bound).all(), (err - bound).max()
    np.testing.assert_array_equal(np.abs(q).max(axis=-1)[scale > 0], 127)  # the grid is used fully
    assert scale[1, 2, 1] == 0 and (q[1, 2, 1] == 0).all()
    assert (err / np.where(scale > 0, scale / 2, np.inf)[..., None]).max() > 0.95  # and tight


@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_int8_cache_bytes_are_a_quarter_plus_the_scales(head_dim):
    f32 = kv_cache.nbytes(kv_cache.empty(2, 64, 4, head_dim, "float32", layers=3))
    i8 = kv_cache.nbytes(kv_cache.empty(2, 64, 4, head_dim, "int8", layers=3))
    # int8 values (1 byte each) plus one float32 scale per E values: (E + 4) / (4E) of float32,
    # 0.3125 at E = 16, 0.28 at 32.
    assert i8 / f32 == (head_dim + 4) / (4 * head_dim)
    assert (i8 <= 0.3 * f32) == (head_dim >= 20)


def _rel_rms(got, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(got) - ref) ** 2) / np.mean(np.asarray(ref) ** 2)))


# Logits tolerance of the int8 KV cache, as rms(int8 - fp32) / rms(fp32). A cached K/V element is
# off by at most scale/2 = max|row| / 254, uniformly: rms max|row| / (127 sqrt(12)), ~0.5% of the
# row's rms for Gaussian-like rows (max ~ 2-3 rms). The logits see that error diluted by the
# residual stream (measured: 0.08-0.12%), so the undiluted 0.5% bounds it; a wrong scale or slot
# is off by the K/V values themselves, ~100%.
KV_INT8_TOLERANCE = 0.005
# test_quantize's logits tolerance for int8 weights (measured there: 0.8% at random init).
WEIGHT_INT8_TOLERANCE = 0.02


def assert_close_to_float32(model, params, prompt, got, want, tolerance):
    """`got`, a greedy completion of a model whose logits are within `tolerance` (rms, relative)
    of the float32 model's, against `want`, the float32 completion of the same request.

    The largest error over V of logits off by `tolerance` rms is taken as 4x that (err below).
    Then, judged by float32's logits (teacher-forced on `got`'s tokens), each of its tokens is at
    most 2 err from float32's argmax, and each logprob at most 2 err from float32's (logit minus
    logsumexp). The two completions may part only where float32's own top two are within 2 err
    (a near-tie either may break); here they agree on at least 8 tokens (measured: all). The
    log-probabilities are not float32's (> 1000 ulps away): the quantized model really runs."""
    ref = ref_forced(model, params, prompt, got.tokens)
    err = 4 * tolerance * np.sqrt(np.mean(ref ** 2))
    n = np.arange(len(got.tokens))
    assert (ref.max(axis=-1) - ref[n, got.tokens] <= 2 * err).all()
    lp_err = np.abs(np.asarray(got.logprobs) - log_softmax(ref)[n, got.tokens])
    assert 1000 * np.finfo(np.float32).eps < lp_err.max() < 2 * err, lp_err
    part = next((i for i, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b), len(want.tokens))
    assert part >= min(8, len(want.tokens)), (got.tokens, want.tokens)
    if part < len(want.tokens):
        top2 = np.sort(ref[part], axis=-1)[-2:]  # the shared context up to `part`
        assert top2[1] - top2[0] <= 2 * err, (part, top2)


def test_int8_cache_logits_are_close_to_float32_cache_logits_but_not_equal():
    model, params = _setup(LLAMA)
    prompts = [_prompt(n, seed=n) for n in CACHE_CASES[1][1]]
    seqs, fp32 = cached_logits(model, params, prompts, 16)
    feed = [s[len(p):] for s, p in zip(seqs, prompts)]  # the same tokens, teacher-forced
    _, int8 = cached_logits(model, params, prompts, 16, kv_dtype="int8", feed=feed)
    for got, ref in zip(int8, fp32):
        assert 1000 * np.finfo(np.float32).eps < _rel_rms(got, ref) < KV_INT8_TOLERANCE, _rel_rms(got, ref)


def test_generator_with_an_int8_cache_runs_and_stays_close_to_float32():
    model, params = _setup(LLAMA)
    requests = _mixed_llama_requests()
    want = Generator(model, params).generate(requests)
    got = Generator(model, params, kv_dtype="int8").generate(requests)
    assert [len(c.tokens) for c in got] == [r.max_new_tokens for r in requests]
    assert requests[1].sampling == GREEDY
    assert_close_to_float32(model, params, requests[1].prompt_ids, got[1], want[1], KV_INT8_TOLERANCE)


# ----------------------------------------------------------------------------- 7. int8 weights
def _dequantized(qparams):
    return jax.tree_util.tree_map(lambda w: w.dequantize() if isinstance(w, QuantizedWeight) else w,
                                  qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))


@pytest.mark.parametrize("name", MODELS)
def test_generator_runs_int8_weights(name):
    model, params = _setup(name)
    qparams = quantize_params(params, model.cfg)
    assert decode.is_quantized(qparams) and not decode.is_quantized(params)
    request = Request(_prompt(5, 50), 40, GREEDY)
    [got] = Generator(model, qparams).generate([request])
    # Exactly the model of the dequantized weights (dequantized at each use, in float32)...
    [same] = Generator(model, _dequantized(qparams)).generate([request])
    _assert_same(got, same)
    # ... and close to float32's.
    [fp32] = Generator(model, params).generate([request])
    assert_close_to_float32(model, params, request.prompt_ids, got, fp32, WEIGHT_INT8_TOLERANCE)


# ----------------------------------------------------------------------------- 8. bad input
@pytest.mark.parametrize("request_, match", [
    (Request([], 4), "Request 1: the prompt is empty"),
    (Request(list(range(17)), 4), "Request 1: the prompt has 17 tokens.*seq_len=16"),
    (Request([1, 2], -1), "Request 1: max_new_tokens=-1"),
    (Request([1, 256], 4), "Request 1: prompt id 256 is outside the vocabulary"),
    (Request([-1, 2], 4), "Request 1: prompt id -1 is outside the vocabulary"),
    (Request([1, 2], 4, SamplingParams(top_p=0.0)), "top_p=0.0"),
    (Request([1, 2], 4, SamplingParams(temperature=-1.0)), "temperature=-1.0"),
    (Request([1, 2], 4, SamplingParams(top_k=300)), "top_k=300"),
], ids=["empty", "too-long", "negative-max-new", "id-too-large", "id-negative", "top-p-0",
        "negative-temperature", "top-k-too-large"])
def test_bad_requests_raise_config_error_naming_the_problem(request_, match):
    model, params = _setup(GPT2)
    with pytest.raises(ConfigError, match=match):
        Generator(model, params).generate([Request([3], 2), request_])


def test_a_bad_sampling_setting_names_its_request():
    # `Generator.check` promises a ConfigError "naming the request": among many requests, which?
    model, params = _setup(GPT2)
    with pytest.raises(ConfigError, match="Request 1"):
        Generator(model, params).generate([Request([3], 2), Request([1, 2], 4, SamplingParams(top_p=0.0))])


def test_bad_generator_settings_raise_config_error():
    model, params = _setup(GPT2)
    with pytest.raises(ConfigError, match="kv_dtype='int4'"):
        Generator(model, params, kv_dtype="int4")
    with pytest.raises(ConfigError, match="No requests"):
        Generator(model, params).generate([])
    with pytest.raises(ConfigError, match=r"prompt id 70 is outside the vocabulary \[0, 65\)"):
        Generator(model, params, num_tokens=65).generate([Request([1, 70], 40)])
    [ok] = Generator(model, params).generate([Request([1, 70], 40)])  # fine with all 256 ids
    assert len(ok.tokens) == 40
