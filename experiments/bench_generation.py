"""Generation benchmarks: KV cache vs recompute, speculative decoding, int8 weights and cache.

Prints one markdown table per measurement (machine, date and command in the header).

    python experiments/bench_generation.py                       # everything, full sizes
    python experiments/bench_generation.py --only kv,int8        # some sections
    python experiments/bench_generation.py --quick --json out.json   # a smoke run, ~2 minutes

Sections:
- **kv**: a random-weight gpt2 model (weights do not matter for speed) whose context holds the
  longest generation of the table. `generate_recompute` (no cache: every new token re-runs the
  model over a full `seq_len` window, so a token costs one `seq_len` forward at any position)
  against `decode.Generator`. The recompute sampler takes one prompt: batch B is B sequential
  calls (not vmapped). A recompute cell is timed when its timed runs should fit
  `--recompute-budget` seconds, and the issue's row (512 new tokens, batch 1; 32 in --quick) always; the others
  are estimated, B × its batch-1 time or B × new tokens × the longest timed row's ms/token, and
  shown with a leading "~".
- **spec**: target and draft trained on the shipped Shakespeare by `jaxsys train` into `--runs`
  (reused when their last checkpoint is there); `speculative_generate` against the target's own
  KV-cache decoding of the same requests. Greedy outputs must be identical (else exit 1).
- **int8**: the trained target with int8 weights (`quantize_params`) and/or an int8 KV cache:
  bytes, decoding speed, val loss, and agreement of greedy continuations with float32.

Timing: each number is the median of `--repeats` steady-state calls after a warm-up call that
compiles (the recompute sampler is compiled ahead of time instead, `.lower().compile()`).
Compile ≈ warm-up − median, shown where the warm-up compiled a new shape ("—": an earlier row
did). A call is a whole generation (prefill and every new token), outputs brought to the host.
ms/token is a row's wall time per new token while it is generated (batched rows share it:
wall / new; the recompute sampler's rows run one after another: wall / (B × new)); tokens/s
counts every row's tokens. All rows of a table run back to back in one process; CPU timings on a
shared machine drift, so compare within a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.checkpoint import manager as ckpt, run_files
from jaxsys.config import apply_overrides
from jaxsys.config.presets import get_preset
from jaxsys.config.schema import ModelConfig
from jaxsys.data import batches as batches_lib
from jaxsys.data.corpus import load_corpus
from jaxsys.inference.decode import TRACES, Generator, Request, bucket, empty_caches
from jaxsys.inference.load import load_run
from jaxsys.inference.quantize import dequantizing, param_bytes, quantize_params
from jaxsys.inference.sampler import SamplingParams
from jaxsys.inference.sampling import generate_recompute
from jaxsys.inference.speculative import speculative_generate
from jaxsys.model import hooks, kv_cache, loss as loss_lib
from jaxsys.model.transformer import init_params, Transformer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16  # prompt tokens of every request
SECTIONS = ("kv", "spec", "int8")
TARGET = ["model.seq_len=256", "train.batch_size=4"]  # the shakespeare preset's tokens per step
DRAFT = TARGET + ["model.num_layers=1", "model.embed_dim=96", "model.num_heads=3"]  # ~1/4 of the target


@dataclasses.dataclass(frozen=True)
class Sizes:
    kv_model: tuple[int, int, int]  # layers, width, heads of the random model
    kv_new: tuple[int, ...]
    kv_batches: tuple[int, ...]
    target_new: int  # the row: ≥ 10× at this many new tokens, batch 1
    recompute_budget_s: float
    train_extra: tuple[str, ...]  # overrides for both trained models (besides TARGET / DRAFT)
    new: int  # new tokens of the spec and int8 generations
    gammas: tuple[int, ...]
    spec_batches: tuple[int, ...]
    int8_batches: tuple[int, ...]
    val_batches: int
    prompts: int  # prompts of the greedy agreement check


# kv: 2 × 256 at seq_len 1040 makes a recompute token ~0.1-0.2 s on 2 cores, so the timed
# recompute rows (64, 256, 512 at batch 1) take ~5 minutes; 50 val batches = training's eval.
FULL = Sizes(kv_model=(2, 256, 4), kv_new=(64, 256, 1024), kv_batches=(1, 8, 32), target_new=512,
             recompute_budget_s=120.0, train_extra=(), new=200, gammas=(2, 4, 8), spec_batches=(1, 4, 16),
             int8_batches=(1, 8), val_batches=50, prompts=8)
QUICK = Sizes(kv_model=(2, 64, 4), kv_new=(16,), kv_batches=(1, 4), target_new=32, recompute_budget_s=0.1,
              train_extra=("train.steps=30", "lr_schedule.warmup_steps=5", "train.eval_every=30",
                           "train.eval_batches=2", "checkpoint.every=30"),
              new=32, gammas=(2, 4), spec_batches=(1, 2), int8_batches=(1, 2), val_batches=4, prompts=2)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def timed(fn: Callable[[], Any], repeats: int, warm: bool = True) -> tuple[Any, float | None, float]:
    """(result, compile s, median s of `repeats` calls) after one warm-up call (if `warm`).
    compile s is warm-up − median when the warm-up traced a new shape (`decode.TRACES`), else
    None (compiled by an earlier row). Fails if a timed call traced again."""
    first, traces = 0.0, dict(TRACES)
    if warm:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    compiled, traces, times, out = dict(TRACES) != traces, dict(TRACES), [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    if dict(TRACES) != traces:
        raise RuntimeError(f"a timed call compiled again ({traces} -> {dict(TRACES)}): the warm-up missed a shape")
    median = statistics.median(times)
    return out, max(first - median, 0.0) if compiled else None, median


def secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def greedy(seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, seed=seed)


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.mean([x == y for x, y in zip(a, b)])) if a else 1.0


# ----------------------------------------------------------------------------- kv
def kv_model_cfg(s: Sizes) -> ModelConfig:
    layers, width, heads = s.kv_model
    return ModelConfig(family="gpt2", vocab_size=256, seq_len=PROMPT + max(*s.kv_new, s.target_new),
                       num_layers=layers, embed_dim=width, num_heads=heads, scan_layers=False)


def bench_kv(s: Sizes, repeats: int) -> dict:
    cfg = kv_model_cfg(s)
    model, params = Transformer(cfg), init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"\n## kv: recompute sampler vs KV cache\n\nrandom gpt2 model: {cfg.num_layers} layers × {cfg.embed_dim} "
          f"wide, {cfg.num_heads} heads, seq_len {cfg.seq_len}, {n_params / 1e6:.2f} M parameters; prompt {PROMPT} "
          "tokens, greedy. Recompute batch B = B sequential one-prompt calls.")
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (max(s.kv_batches), PROMPT)).astype(np.int32)
    cells = sorted({(n, b) for n in s.kv_new for b in s.kv_batches} | {(s.target_new, 1)})
    gen = Generator(model, params)
    exes: dict[int, tuple[Any, float]] = {}
    b1_call: dict[int, float] = {}  # measured recompute seconds per batch-1 call, by new tokens
    rows, out = [], []
    for n, B in cells:
        reqs = [Request(prompts[b], n, greedy(b)) for b in range(B)]
        kv_res, kv_compile, kv_s = timed(lambda: gen.generate(reqs), repeats)
        if n not in exes:
            t0 = time.perf_counter()
            exe = generate_recompute.lower(model, params, jnp.asarray(prompts[0]), jax.random.key(0),
                                           max_new_tokens=n, temperature=0.0).compile()
            exes[n] = (exe, time.perf_counter() - t0)
        exe, rc_compile = exes[n]
        ref_n = max(b1_call, default=None)
        tok_s = b1_call[ref_n] / ref_n if ref_n else None  # recompute seconds per token, batch 1
        predicted = repeats * B * n * tok_s if tok_s else 0.0
        match = None
        if (n, B) == (s.target_new, 1) or predicted <= s.recompute_budget_s:
            def run_recompute():
                return [np.asarray(exe(params, jnp.asarray(prompts[b]), jax.random.key(b), temperature=0.0))
                        for b in range(B)]
            rc_res, _, rc_s = timed(run_recompute, repeats, warm=False)
            estimated = False
            if B == 1:
                b1_call[n] = rc_s
            match = agreement(rc_res[0][PROMPT:].tolist(), kv_res[0].tokens)
        else:
            rc_s = B * b1_call[n] if n in b1_call else B * n * tok_s
            estimated = True
        speedup = rc_s / kv_s
        est = "~" if estimated else ""
        rows.append([n, B, f"{est}{rc_s / (B * n) * 1e3:,.1f}", f"{est}{B * n / rc_s:,.1f}", f"{kv_s / n * 1e3:,.2f}",
                     f"{B * n / kv_s:,.0f}", f"{est}{speedup:,.1f}×", f"{rc_compile:.1f}",
                     secs(kv_compile), "—" if match is None else f"{match:.0%}"])
        out.append(dict(new_tokens=n, batch=B, recompute_s=rc_s, recompute_estimated=estimated,
                        recompute_compile_s=rc_compile, kv_s=kv_s, kv_compile_s=kv_compile,
                        speedup=speedup, greedy_match=match))
        print(f"  new {n} batch {B}: KV {kv_s:.2f} s, recompute {est}{rc_s:.1f} s", file=sys.stderr, flush=True)
    print()
    print(md_table(["new tokens", "batch", "recompute ms/token", "recompute tokens/s", "KV ms/token", "KV tokens/s",
                    "speed-up", "recompute compile s", "KV compile s", "greedy tokens equal"], rows))
    print("\n~: estimated, not timed (see the docstring). greedy tokens equal: the recompute sampler's and the "
          "KV cache's greedy tokens of row 0, position by position (random weights: near-ties may flip).")
    return dict(model=dataclasses.asdict(cfg), params=n_params, rows=out)


# ----------------------------------------------------------------------------- trained models
def trained(runs: Path, name: str, overrides: list[str]) -> Path:
    """The run directory of `name`, trained by `jaxsys train` unless its last checkpoint is there."""
    run_dir = runs / name
    overrides = [*overrides, f"run_dir={run_dir}", "logging.sample_tokens=0"]
    want = apply_overrides(get_preset("shakespeare"), overrides)
    if (run_dir / run_files.CONFIG).exists():
        have = run_files.read_config(run_dir)
        if (have.model, have.train) != (want.model, want.train):
            raise SystemExit(f"{run_dir} holds a run of another model or schedule; delete it or pass another --runs.")
        if max(ckpt.step_dirs(run_dir), default=-1) >= want.train.steps:
            print(f"{name}: reusing {run_dir} ({want.train.steps} steps)")
            return run_dir
    cmd = [sys.executable, "-m", "jaxsys", "train", "--preset", "shakespeare", "--quiet", *overrides]
    print(f"{name}: training, `{shlex.join(['python', *cmd[1:]])}` ...", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training {name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    last = (done.stdout.strip().splitlines() or [""])[-1]
    print(f"{name}: trained in {time.perf_counter() - t0:.0f} s: {last}")
    return run_dir


def val_prompts(corpus_val: np.ndarray, count: int, length: int = PROMPT) -> list[np.ndarray]:
    stride = (len(corpus_val) - length) // max(count, 1)
    return [np.asarray(corpus_val[i * stride:i * stride + length], np.int32) for i in range(count)]


def count(tree: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- spec
def bench_spec(s: Sizes, repeats: int, target_dir: Path, draft_dir: Path) -> tuple[dict, list[str]]:
    t_run, d_run = load_run(target_dir), load_run(draft_dir)
    ratio = count(d_run.params) / count(t_run.params)
    vocab = t_run.tokenizer.vocab_size
    target = Generator(t_run.model, t_run.params, num_tokens=vocab)
    draft = Generator(d_run.model, d_run.params, num_tokens=vocab)
    prompts = val_prompts(load_corpus(t_run.cfg.data).val, max(s.spec_batches))
    print(f"\n## spec: speculative decoding\n\ntarget {count(t_run.params) / 1e6:.3f} M parameters "
          f"({t_run.cfg.model.num_layers} × {t_run.cfg.model.embed_dim}), draft {count(d_run.params) / 1e6:.3f} M "
          f"({d_run.cfg.model.num_layers} × {d_run.cfg.model.embed_dim}): ratio {ratio:.3f}; both seq_len "
          f"{t_run.cfg.model.seq_len}, trained {t_run.step} / {d_run.step} steps. Prompts: {PROMPT} tokens of the "
          f"val split, {s.new} new tokens.")
    failures: list[str] = []

    def one(B: int, temperature: float, gamma: int, plain: tuple | None) -> dict:
        reqs = [Request(prompts[b], s.new, SamplingParams(temperature=temperature, seed=b)) for b in range(B)]
        if plain is None:
            plain = timed(lambda: target.generate(reqs), repeats)
        (spec_out, stats), compile_s, spec_s = timed(lambda: speculative_generate(target, draft, reqs, gamma), repeats)
        plain_out, _, plain_s = plain
        tokens = sum(len(c.tokens) for c in spec_out)
        same = [c.tokens for c in spec_out] == [c.tokens for c in plain_out]
        if temperature == 0 and not same:
            failures.append(f"spec: greedy outputs differ from the target's (batch {B}, γ={gamma})")
        return dict(batch=B, temperature=temperature, gamma=gamma, acceptance=stats.acceptance_rate,
                    rounds=stats.rounds, spec_s=spec_s, spec_compile_s=compile_s, plain_s=plain_s,
                    spec_tokens_per_s=tokens / spec_s, plain_tokens_per_s=tokens / plain_s,
                    speedup=plain_s / spec_s, identical=same, plain=plain)

    def row(r: dict, lead: list) -> list:
        ident = ("yes" if r["identical"] else "NO") if r["temperature"] == 0 else "—"
        return lead + [f"{r['acceptance']:.2f}", r["rounds"], f"{r['spec_tokens_per_s']:,.0f}",
                       f"{r['plain_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}×", secs(r["spec_compile_s"]), ident]

    results, rows = [], []
    for temperature in (0.0, 0.8):
        plain = None
        for gamma in s.gammas:
            r = one(1, temperature, gamma, plain)
            plain = r.pop("plain")
            results.append(r)
            rows.append(row(r, ["greedy" if temperature == 0 else f"T={temperature}", gamma]))
    print("\nBatch 1:\n")
    print(md_table(["sampling", "γ", "acceptance", "rounds", "spec tokens/s", "target tokens/s", "speed-up",
                    "spec compile s", "identical to target"], rows))
    gamma = 4 if 4 in s.gammas else s.gammas[-1]
    by_batch, rows = [], []
    for B in s.spec_batches:
        r = one(B, 0.0, gamma, None)
        r.pop("plain")
        by_batch.append(r)
        rows.append(row(r, [B]))
    print(f"\nBy batch size (γ={gamma}, greedy; a round runs until every row's draft is verified):\n")
    print(md_table(["batch", "acceptance", "rounds", "spec tokens/s", "target tokens/s", "speed-up",
                    "spec compile s", "identical to target"], rows))
    return dict(param_ratio=ratio, batch1=results, by_batch=by_batch), failures


# ----------------------------------------------------------------------------- int8
def val_losses(run: Any, n: int) -> dict[str, float]:
    """Mean val loss (nats/token) over the same `n` val batches, five ways."""
    cfg, model = run.cfg, run.model
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    val = load_corpus(cfg.data).val
    data = [batches_lib.global_batch(val, cfg.train.seed, i, "val", cfg.train.batch_size, cfg.model.seq_len, one)
            for i in range(n)]
    qparams = quantize_params(run.params, cfg.model)

    def forward(p, b):
        with hooks.installed(dequantizing()):
            return loss_lib.loss(model, p, b, None)

    def through_cache(kv_dtype):
        def f(p, b):
            B, T = b["inputs"].shape
            caches = empty_caches(model, B, T, kv_dtype)
            with hooks.installed(dequantizing()):
                logits_BTV, _ = model.apply({"params": p}, b["inputs"], jnp.broadcast_to(jnp.arange(T), (B, T)),
                                            caches, None, method="decode")
            return loss_lib.mean_cross_entropy(logits_BTV, b["targets"])
        return jax.jit(f)

    ways = {"forward, float32 weights": (jax.jit(forward), run.params),
            "forward, int8 weights": (jax.jit(forward), qparams),
            "KV path, float32 cache": (through_cache("float32"), run.params),
            "KV path, int8 cache": (through_cache("int8"), run.params),
            "KV path, int8 weights + int8 cache": (through_cache("int8"), qparams)}
    return {k: float(np.mean([float(f(p, b)) for b in data])) for k, (f, p) in ways.items()}


def bench_int8(s: Sizes, repeats: int, target_dir: Path) -> dict:
    run = load_run(target_dir)
    cfg, vocab = run.cfg, run.tokenizer.vocab_size
    qparams = quantize_params(run.params, cfg.model)
    fp_bytes, q_bytes = param_bytes(run.params), param_bytes(qparams)
    print(f"\n## int8: weights and KV cache (the trained target, {s.new} new tokens, greedy)\n")
    print(md_table(["parameters", "float32 bytes", "int8 bytes", "ratio"],
                   [[f"{count(run.params) / 1e6:.3f} M", f"{fp_bytes:,}", f"{q_bytes:,}", f"{q_bytes / fp_bytes:.3f}×"]]))

    prompts = val_prompts(load_corpus(cfg.data).val, max(max(s.int8_batches), s.prompts))
    configs = [("float32", "float32"), ("int8", "float32"), ("float32", "int8"), ("int8", "int8")]
    gens = {(w, kv): Generator(run.model, qparams if w == "int8" else run.params, kv_dtype=kv, num_tokens=vocab)
            for w, kv in configs}
    speed, rows = [], []
    for w, kv in configs:
        row = [w, kv]
        for B in s.int8_batches:
            reqs = [Request(prompts[b], s.new, greedy(b)) for b in range(B)]
            _, compile_s, sec = timed(lambda: gens[w, kv].generate(reqs), repeats)
            base = next((r["s"] for r in speed if r["batch"] == B and r["weights"] == r["kv"] == "float32"), sec)
            speed.append(dict(weights=w, kv=kv, batch=B, s=sec, compile_s=compile_s, tokens_per_s=B * s.new / sec))
            row += [f"{B * s.new / sec:,.0f}", f"{sec / s.new * 1e3:.2f}", f"{base / sec:.2f}×"]
        rows.append(row)
    print("\nDecoding speed:\n")
    print(md_table(["weights", "KV cache"] + [h for B in s.int8_batches for h in
                   (f"tokens/s B={B}", f"ms/token B={B}", f"vs float32 B={B}")], rows))

    losses = val_losses(run, s.val_batches)
    ref = losses["forward, float32 weights"]
    print(f"\nVal loss ({s.val_batches} val batches of {cfg.train.batch_size} × {cfg.model.seq_len}; the KV path runs "
          "each window through an empty cache of that storage):\n")
    print(md_table(["model", "val loss", "Δ vs float32"], [[k, f"{v:.4f}", f"{v - ref:+.5f}"] for k, v in losses.items()]))

    reqs = [Request(p, s.new, greedy(b)) for b, p in enumerate(prompts[:s.prompts])]
    base = gens["float32", "float32"].generate(reqs)
    agree, rows = [], []
    for w, kv in configs[1:]:
        outs = gens[w, kv].generate(reqs)
        same = [agreement(o.tokens, r.tokens) for o, r in zip(outs, base)]
        prefix = [next((i for i, (x, y) in enumerate(zip(o.tokens, r.tokens)) if x != y), len(r.tokens))
                  for o, r in zip(outs, base)]
        dlp = [abs(a - b) for o, r, k in zip(outs, base, prefix) for a, b in zip(o.logprobs[:k], r.logprobs[:k])]
        agree.append(dict(weights=w, kv=kv, identical_fraction=float(np.mean(same)),
                          first_divergence=float(np.mean(prefix)), mean_abs_dlogprob=float(np.mean(dlp)) if dlp else None))
        rows.append([w, kv, f"{np.mean(same):.1%}", f"{np.mean(prefix):.1f}", f"{np.mean(dlp):.2e}" if dlp else "—"])
    print(f"\nGreedy continuations against float32 weights and cache ({len(reqs)} val prompts × {s.new} tokens):\n")
    print(md_table(["weights", "KV cache", "identical tokens", "first divergence (mean)",
                    "mean |Δ logprob| before it"], rows))

    kvcfg = kv_model_cfg(s)
    shapes = [(f"target, batch {B}", Transformer(cfg.model), B, bucket(PROMPT + s.new, cfg.model.seq_len))
              for B in s.int8_batches]
    shapes.append((f"kv-section model, batch {max(s.kv_batches)}", Transformer(kvcfg), max(s.kv_batches), kvcfg.seq_len))
    cache_rows, caches = [], []
    for name, model, B, slots in shapes:
        f32, i8 = (kv_cache.nbytes(jax.eval_shape(lambda d=d: empty_caches(model, B, slots, d))) for d in ("float32", "int8"))
        caches.append(dict(shape=name, slots=slots, float32_bytes=f32, int8_bytes=i8))
        cache_rows.append([name, slots, f"{f32:,}", f"{i8:,}", f"{i8 / f32:.3f}×"])
    print("\nKV cache bytes (values and scales):\n")
    print(md_table(["shape", "slots", "float32 bytes", "int8 bytes", "ratio"], cache_rows))
    return dict(param_bytes_float32=fp_bytes, param_bytes_int8=q_bytes, speed=speed, val_loss=losses,
                greedy_agreement=agree, cache_bytes=caches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 30-step models: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (the median is reported)")
    ap.add_argument("--recompute-budget", type=float, default=None, metavar="S",
                    help="time a recompute cell only if its timed runs should take ≤ S seconds (default 120; quick 0.1)")
    ap.add_argument("--runs", default=None, help="where the trained models live (default runs/bench_generation[/quick])")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every number to PATH")
    args = ap.parse_args()
    only = [x for x in args.only.split(",") if x]
    if bad := [x for x in only if x not in SECTIONS]:
        ap.error(f"--only {','.join(bad)}: choose from {','.join(SECTIONS)}")
    s = QUICK if args.quick else FULL
    if args.recompute_budget is not None:
        s = dataclasses.replace(s, recompute_budget_s=args.recompute_budget)
    runs = Path(args.runs or ("runs/bench_generation/quick" if args.quick else "runs/bench_generation"))
    runs = runs if runs.is_absolute() else ROOT / runs

    header = dict(command=shlex.join([Path(sys.executable).name, *sys.argv]),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                  jax=jax.__version__, devices=f"{len(jax.devices())} × {jax.devices()[0].device_kind}",
                  mode="quick" if args.quick else "full", sizes=dataclasses.asdict(s))
    print("# Generation benchmark\n")
    for k in ("command", "date", "machine", "jax", "devices", "mode"):
        print(f"- {k}: {header[k]}")
    t_start = time.perf_counter()
    results: dict[str, Any] = {"header": header}
    failures: list[str] = []
    if "kv" in only:
        results["kv"] = bench_kv(s, args.repeats)
    if "spec" in only or "int8" in only:
        print("\n## trained models\n")
        extra = list(s.train_extra)
        target_dir = trained(runs, "target", TARGET + extra)
        if "spec" in only:
            draft_dir = trained(runs, "draft", DRAFT + extra)
            results["spec"], failures = bench_spec(s, args.repeats, target_dir, draft_dir)
        if "int8" in only:
            results["int8"] = bench_int8(s, args.repeats, target_dir)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
