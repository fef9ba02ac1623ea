"""The `jaxsys` command line.

    jaxsys train [--preset NAME] [--devices N] [key=value ...]
    jaxsys sample --run-dir DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    jaxsys config [--preset NAME] [key=value ...]      # print the resolved config
    jaxsys plan [--preset NAME] [--devices N] [key=value ...] [--json] [--accelerator h100]
                [--search] [--memory-budget GiB]         # per-device memory/communication, AOT
    jaxsys launch --processes N -- train [...]          # N local processes, one global mesh

JAX is imported only after the arguments are parsed, so `--devices N` can ask XLA for N
simulated CPU devices before the backend starts.
"""

from __future__ import annotations

import argparse
import sys


def _resolve(args: argparse.Namespace):
    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    return apply_overrides(get_preset(args.preset), args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    import jax
    from jaxsys.inference.sampling import sample_text
    from jaxsys.model.transformer import Transformer
    from jaxsys.train.loop import train
    result = train(cfg)
    if cfg.logging.sample_tokens > 0 and not result.stopped_by and jax.process_count() == 1:
        sample = sample_text(Transformer(cfg.model), result.state.params, result.tokenizer,
                             cfg.logging.sample_prompt, cfg.logging.sample_tokens, seed=cfg.train.seed)
        print("-" * 60 + "\n" + sample + "\n" + "-" * 60, flush=True)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from jaxsys.config import to_json
    print(to_json(_resolve(args)))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from jaxsys.inference.load import load_for_sampling
    from jaxsys.inference.sampling import sample_text
    _, model, params, tokenizer = load_for_sampling(args.run_dir)
    print(sample_text(model, params, tokenizer, args.prompt, args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from jaxsys.cli.launch import launch
    rest = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not rest:
        raise SystemExit("jaxsys launch: give the command after --, e.g. "
                         "jaxsys launch --processes 2 -- train --devices 4 mesh.data=8")
    return launch(args.processes, [sys.executable, "-m", "jaxsys", *rest])


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from jaxsys.tools import planner
    cfg = _resolve(args)
    if args.search:
        budget = args.memory_budget * 2**30 if args.memory_budget else None
        plans, rejected = planner.search(cfg, accelerator=args.accelerator, memory_budget=budget)
        print(json.dumps({"ranked": [p.to_json() for p in plans], "rejected": rejected}, indent=1)
              if args.json else planner.format_search(plans, rejected))
        return 0
    p = planner.plan(cfg, accelerator=args.accelerator)
    print(json.dumps(p.to_json(), indent=1) if args.json else planner.format_plan(p))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsys", description="Functional training and parallelism in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train (or resume) a language model"),
                            ("config", "print the resolved config as JSON"),
                            ("plan", "compile the train step ahead of time and report per-device "
                                     "memory, collectives and a roofline step time")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--preset", default="shakespeare",
                       help="shakespeare (default), tiny, gpt2-small or llama-1b")
        p.add_argument("--devices", type=int, default=None,
                       help="simulate N CPU devices (sets XLA's host device count)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="e.g. mesh.fsdp=4 train.steps=500 run_dir=runs/x")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print JSON instead of tables")
            p.add_argument("--accelerator", default="h100", help="roofline target: h100, h200 or a100")
            p.add_argument("--search", action="store_true",
                           help="plan every valid data × fsdp × tensor × ZeRO × SP layout and rank them")
            p.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                           help="--search: drop layouts whose peak bytes per device exceed this "
                                "(default: the accelerator's memory)")
        if name == "train":
            p.add_argument("--distributed", action="store_true",
                           help="one of several processes: jax.distributed.initialize() detects "
                                "SLURM / Open MPI / Kubernetes (also JAXSYS_DISTRIBUTED=1)")
    p = sub.add_parser("launch", help="run a command as N local processes of one JAX job")
    p.add_argument("--processes", type=int, required=True, help="number of processes")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- train ...",
                   help="the jaxsys command each process runs (its --devices is per process)")
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
    from jaxsys.parallel.runtime import initialize, simulate_cpu_devices
    simulate_cpu_devices(getattr(args, "devices", None))
    if args.command == "launch":
        return _cmd_launch(args)
    if args.command == "train":
        initialize(args.devices, flag=args.distributed)
    from jaxsys.config import ConfigError
    from jaxsys.train.loop import TrainingError
    try:
        return {"train": _cmd_train, "config": _cmd_config, "sample": _cmd_sample,
                "plan": _cmd_plan}[args.command](args)
    except (ConfigError, FileNotFoundError, TrainingError) as e:
        import jax
        who = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
        print(f"jaxsys: error{who}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
