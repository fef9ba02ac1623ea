"""The `jaxsys` command line.

    jaxsys train [--preset NAME] [--devices N] [key=value ...]
    jaxsys sample --run-dir DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    jaxsys config [--preset NAME] [key=value ...]      # print the resolved config

JAX is imported only after the arguments are parsed, so `--devices N` can ask XLA for N
simulated CPU devices before the backend starts.
"""

from __future__ import annotations

import argparse
import os
import sys


def simulate_cpu_devices(n: int | None) -> None:
    """Ask XLA for `n` host (CPU) devices; call before jax is imported (None/0: leave as is)."""
    if not n:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    if "jax" in sys.modules:  # pragma: no cover - only when embedded after jax was imported
        import jax
        if len(jax.devices()) != n:
            raise SystemExit(f"--devices {n}: jax was already initialised with {len(jax.devices())} devices.")


def _resolve(args: argparse.Namespace):
    from jaxsys.config import apply_overrides
    from jaxsys.presets import get_preset
    return apply_overrides(get_preset(args.preset), args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    from jaxsys.trainer import train
    train(cfg)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from jaxsys.config import to_json
    print(to_json(_resolve(args)))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from jaxsys.trainer import load_for_sampling, sample_text
    _, model, params, tokenizer = load_for_sampling(args.run_dir)
    print(sample_text(model, params, tokenizer, args.prompt, args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsys", description="Functional training and parallelism in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train (or resume) a language model"),
                            ("config", "print the resolved config as JSON")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--preset", default="shakespeare",
                       help="shakespeare (default), tiny, gpt2-small or llama-1b")
        p.add_argument("--devices", type=int, default=None,
                       help="simulate N CPU devices (sets XLA's host device count)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="e.g. mesh.fsdp=4 train.steps=500 run_dir=runs/x")
    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    simulate_cpu_devices(getattr(args, "devices", None))
    from jaxsys.config import ConfigError
    from jaxsys.trainer import TrainingError
    try:
        return {"train": _cmd_train, "config": _cmd_config, "sample": _cmd_sample}[args.command](args)
    except (ConfigError, FileNotFoundError, TrainingError) as e:
        print(f"jaxsys: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
