"""Attention throughput: the Pallas flash-attention kernel against cuDNN and XLA.

For each implementation × head dim × causal/full × sequence length, times the forward and the
forward+backward (jitted, `--warmup` untimed calls, then the median of `--iters`), and prints
one table with TFLOP/s and the max forward error against the float32 `jnp` reference (batch 0,
head 0, so the reference fits in memory). FLOPs follow the FlashAttention papers:
forward 4·B·H·T·S·E (halved when causal), backward 2.5× the forward.

Shapes: B·T = `--tokens` (16k by default) and H·E = `--width` (2048), as in the FlashAttention
benchmarks, so every row does the same work per token. Letters as in `jaxsys/model/axes.py`:
B batch, T query positions, S key/value positions (= T here), H heads, E head size.

    python experiments/bench_attention.py                          # GPU: seq 512 → 16k, hd 64/128
    python experiments/bench_attention.py --quick                  # CPU: tiny shapes, interpret mode

Implementations that cannot run here are listed with the reason (cuDNN needs an NVIDIA GPU).
On CPU the Pallas kernel runs in interpret mode: its timings there show only that it runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jaxsys.model.attention import xla_attention
from pallas_kernels.flash_attention import flash_attention, resolve_interpret
from pallas_kernels.reference import flash_attention_reference


def _impl(name: str, causal: bool):
    if name == "pallas":
        return functools.partial(flash_attention, causal=causal)
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    return functools.partial(xla_attention, causal=causal)


def _skip_reason(name: str) -> str | None:
    if name == "cudnn" and jax.default_backend() != "gpu":
        return f"cudnn needs an NVIDIA GPU (backend: {jax.default_backend()})"
    return None


def _median_s(fn, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_row(name: str, T: int, E: int, causal: bool, args) -> dict:
    B, H = max(1, args.tokens // T), max(1, args.width // E)
    S = T  # self-attention: as many key/value positions as queries, K = H heads
    dt = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q_BTHE, do_BTHE = (jax.random.normal(kk, (B, T, H, E), dt) for kk in keys[:2])
    k_BSKE, v_BSKE = (jax.random.normal(kk, (B, S, H, E), dt) for kk in keys[2:])
    attn = _impl(name, causal)
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q_BTHE, k_BSKE, v_BSKE, do_BTHE):
        o_BTHE, vjp = jax.vjp(attn, q_BTHE, k_BSKE, v_BSKE)
        return o_BTHE, vjp(do_BTHE)

    flops = 4.0 * B * H * T * S * E * (0.5 if causal else 1.0)
    row = {"impl": name, "E": E, "causal": causal, "T": T, "B": B, "H": H}
    row["fwd_ms"] = 1e3 * _median_s(fwd, (q_BTHE, k_BSKE, v_BSKE), args.warmup, args.iters)
    row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
    row["fb_ms"] = 1e3 * _median_s(fwd_bwd, (q_BTHE, k_BSKE, v_BSKE, do_BTHE), args.warmup, args.iters)
    row["fb_tflops"] = 3.5 * flops / row["fb_ms"] * 1e-9
    row["err"] = float("nan")
    if T <= args.max_check_len:
        sl = (slice(0, 1), slice(None), slice(0, 1))  # batch 0, every position, head 0
        f32 = lambda x: x[sl].astype(jnp.float32)  # noqa: E731
        ref_1T1E = flash_attention_reference(f32(q_BTHE), f32(k_BSKE), f32(v_BSKE), causal=causal)[0]
        out_1T1E = f32(fwd(q_BTHE, k_BSKE, v_BSKE))
        row["err"] = float(jnp.max(jnp.abs(out_1T1E - ref_1T1E)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default="pallas,cudnn,xla")
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--causal", default="both", choices=("both", "true", "false"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--tokens", type=int, default=16384, help="B·T per call")
    ap.add_argument("--width", type=int, default=2048, help="H·E")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-check-len", type=int, default=8192,
                    help="longest T whose output is checked against the reference")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke test: seq 128,256, hd 64, 512 tokens, width 128, 3 iters")
    args = ap.parse_args()
    if args.quick:
        args.seqs, args.head_dims, args.tokens, args.width = "128,256", "64", 512, 128
        args.warmup, args.iters = 1, 3

    mode = "interpret" if resolve_interpret(None) else "compiled"
    print(f"jax {jax.__version__} | {jax.devices()[0].device_kind} | {args.dtype} | "
          f"pallas in {mode} mode | B·T={args.tokens} H·E={args.width}")
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    print(f"{'impl':<7} {'hd':>4} {'causal':>6} {'seq':>6} {'B':>4} {'H':>3} {'fwd ms':>9} "
          f"{'fwd TF/s':>9} {'f+b ms':>9} {'f+b TF/s':>9} {'max err':>8}")
    for name in args.impls.split(","):
        reason = _skip_reason(name)
        if reason:
            print(f"{name:<7} skipped: {reason}")
            continue
        for E in map(int, args.head_dims.split(",")):
            for causal in causals:
                for T in map(int, args.seqs.split(",")):
                    try:
                        r = bench_row(name, T, E, causal, args)
                    except Exception as e:  # e.g. out of memory for xla at 16k: report, go on
                        print(f"{name:<7} {E:>4} {causal!s:>6} {T:>6} failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                        continue
                    print(f"{name:<7} {E:>4} {causal!s:>6} {T:>6} {r['B']:>4} {r['H']:>3} "
                          f"{r['fwd_ms']:>9.2f} {r['fwd_tflops']:>9.3f} {r['fb_ms']:>9.2f} "
                          f"{r['fb_tflops']:>9.3f} {r['err']:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
