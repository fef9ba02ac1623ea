"""The `jaxsys` command line.

    jaxsys train [--preset NAME | --config FILE] [--devices N] [--quiet] [--log-format json]
                 [--memory-budget GiB] [key=value ...]   # GiB: what model.remat=auto must fit
    jaxsys eval --run-dir DIR [--data FILE] [--batches N] [--json]   # loss, perplexity, bits per byte
    jaxsys plot RUN_DIR [RUN_DIR ...] [--out FILE]       # loss, val loss and lr against steps (PNG)
    jaxsys sample --run-dir DIR [--prompt TEXT] [--num-samples N] [--top-p P] [--draft-run-dir D] ...
    jaxsys generate --run-dir DIR --prompts IN.jsonl --out OUT.jsonl [--batch-size B] ...  # batches
    jaxsys config [--preset NAME | --config FILE] [key=value ...]   # print the resolved config
    jaxsys plan [--preset NAME] [--devices N] [key=value ...] [--json] [--accelerator h100]
                [--search] [--memory-budget GiB]         # per-device memory/communication, AOT
    jaxsys launch --processes N -- train [...]          # N local processes, one global mesh
    jaxsys tokenizer train --vocab-size 4096 FILES... --out DIR   # a byte-level BPE on your text
    jaxsys data prepare FILES... --tokenizer T --out DIR          # a dataset dir: data.source=DIR
    jaxsys hf import SRC --out RUN_DIR | hf export --run-dir DIR --out HF_DIR   # Hugging Face folders

JAX is imported only after the arguments are parsed, so `--devices N` can ask XLA for N
simulated CPU devices before the backend starts.
"""

from __future__ import annotations

import argparse
import sys
import time

_T_START = time.perf_counter()  # the imports phase of `jaxsys train`'s time breakdown starts here


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the argument (and where help is), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(low: int):
    """argparse `type=`: an integer ≥ `low` (so `--devices 0` or `--processes -1` is refused by
    argparse with the argument's name, before JAX starts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value
    return parse


def _number(low: float, inclusive: bool):
    """argparse `type=`: a float ≥ `low` (`inclusive`) or > `low`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low if inclusive else value > low):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'≥' if inclusive else '>'} {low:g}, got {text}")
        return value
    return parse


def _resolve(args: argparse.Namespace):
    """The config: a preset or a saved config file (--config), then the overrides, then the
    flags that stand for overrides (--quiet, --log-format)."""
    from jaxsys.config import ConfigError, apply_overrides, from_file
    from jaxsys.config.presets import get_preset
    config_file = getattr(args, "config", None)
    if config_file and args.preset:
        raise ConfigError("--config and --preset are mutually exclusive: --config FILE starts from a "
                          "saved config.json, --preset NAME from a preset; overrides apply to either.")
    base = from_file(config_file) if config_file else get_preset(args.preset or "shakespeare")
    flags = []
    if getattr(args, "quiet", False):
        flags += ["logging.progress=false", "logging.quiet=true"]
    if getattr(args, "log_format", None):
        flags.append(f"logging.format={args.log_format}")
    if getattr(args, "memory_budget", None):
        flags.append(f"train.memory_budget={args.memory_budget}")  # what model.remat=auto must fit
    return apply_overrides(base, [*args.overrides, *flags])


def _plot_curves(cfg, console) -> None:
    """<run_dir>/curves.png at the end of a run (train/ cannot import tools/, so it is drawn here)."""
    from pathlib import Path
    from jaxsys.tools import plot
    if not plot.have_matplotlib():
        console.log(f"No curves.png: matplotlib is not installed ({plot.INSTALL}).", "plot_skipped")
        return
    path = plot.plot_runs([cfg.run_dir], Path(cfg.run_dir) / "curves.png")
    console.log(f"Loss curves: {path}", "plot", path=str(path))


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    import jax
    from jaxsys.inference.sampling import sample_text
    from jaxsys.model.transformer import Transformer
    from jaxsys.train.console import Console
    from jaxsys.train.loop import train
    from jaxsys.parallel.runtime import compile_cache_dir, enable_compile_cache
    imports = time.perf_counter() - _T_START
    enable_compile_cache(compile_cache_dir())  # a second run loads what the first compiled
    result = train(cfg)
    timings = result.timings
    timings.add("imports", imports)
    console = Console(cfg.logging)
    if jax.process_index() == 0:
        with timings.phase("plot"):
            _plot_curves(cfg, console)
    trained = result.final_step > result.start_step  # "Nothing to train" compiles nothing, samples nothing
    if cfg.logging.sample_tokens > 0 and not result.stopped_by and trained and not cfg.logging.quiet:
        params, model_state = result.state.params, result.state.model_state  # the MoE bias travels too
        if jax.process_count() > 1:  # every process joins the gather; process 0 samples
            from jax.experimental import multihost_utils
            params, model_state = multihost_utils.process_allgather((params, model_state), tiled=True)
            if jax.process_index() != 0:
                return 0
        with timings.phase("sample"):
            sample = sample_text(Transformer(cfg.model), params, result.tokenizer, cfg.logging.sample_prompt,
                                 cfg.logging.sample_tokens, seed=cfg.train.seed, model_state=model_state)
        if console.json:
            console.log(sample, "sample")
        else:
            print("-" * 60 + "\n" + sample + "\n" + "-" * 60, flush=True)
    if trained and jax.process_index() == 0:
        console.log(timings.format(), "timings", **{f"{k}_seconds": v for k, v in timings.ordered()})
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from jaxsys.config import to_json, validate
    cfg = _resolve(args)
    validate(cfg)  # a config that cannot train is an error here too, not a silent printout
    print(to_json(cfg))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from jaxsys.cli.generate import cmd_sample
    return cmd_sample(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxsys.cli.generate import cmd_generate
    return cmd_generate(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from jaxsys.inference.evaluate import evaluate_run, format_result
    result = evaluate_run(args.run_dir, args.data, args.batches)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_result(result))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path
    from jaxsys.tools.plot import plot_runs
    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else "curves.png")
    print(f"Wrote {plot_runs(args.run_dirs, out)}")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from jaxsys.cli.launch import launch
    rest = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    example = "e.g. jaxsys launch --processes 2 -- train --devices 4 mesh.data=8"
    if not rest:
        args.parser.error(f"give the jaxsys command after --, {example}")
    if rest[0] not in args.commands or rest[0] == "launch":
        args.parser.error(f"{rest[0]!r} is not a jaxsys command to launch (one of "
                          f"{', '.join(c for c in args.commands if c != 'launch')}); {example}")
    return launch(args.processes, [sys.executable, "-m", "jaxsys", *rest])


def _cmd_hf(args: argparse.Namespace) -> int:
    from jaxsys.cli.hf import cmd_hf
    return cmd_hf(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from jaxsys.tools import planner
    cfg = _resolve(args)
    if args.search:
        budget = args.memory_budget * 2**30 if args.memory_budget else None
        progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else None
        plans, rejected = planner.search(cfg, accelerator=args.accelerator, memory_budget=budget,
                                         progress=progress)
        print(json.dumps({"ranked": [p.to_json() for p in plans], "rejected": rejected}, indent=1)
              if args.json else planner.format_search(plans, rejected))
        return 0
    p = planner.plan(cfg, accelerator=args.accelerator)
    print(json.dumps(p.to_json(), indent=1) if args.json else planner.format_plan(p))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxsys", description="Functional training and parallelism in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train (or resume) a language model"),
                            ("config", "print the resolved config as JSON"),
                            ("plan", "compile the train step ahead of time and report per-device "
                                     "memory, collectives and a roofline step time")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--preset", default=None,
                       help="shakespeare (default), tiny, gpt2-small, llama-1b, deepseek-tiny; for plan "
                            "also deepseek-v3, mixtral-8x7b")
        p.add_argument("--config", default=None, metavar="FILE",
                       help="start from a saved config (a run's config.json) instead of a preset; "
                            "overrides still apply")
        p.add_argument("--devices", type=_count(1), default=None,
                       help="simulate N ≥ 1 CPU devices (sets XLA's host device count); `train` "
                            "defaults to one per CPU core when that divides the batch and the mesh is "
                            "data-parallel only")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="e.g. mesh.fsdp=4 train.steps=500 run_dir=runs/x")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print JSON instead of tables")
            p.add_argument("--accelerator", default="h100", help="roofline target: h100, h200 or a100")
            p.add_argument("--search", action="store_true",
                           help="plan every valid data × fsdp × tensor × ZeRO × SP layout (× context × kind for a "
                                "long sequence) and rank them")
            p.add_argument("--memory-budget", type=_number(0, inclusive=False), default=None, metavar="GiB",
                           help="per-device peak bytes to fit: --search drops layouts over it (default: the "
                                "accelerator's memory); model.remat=auto picks the first policy under it "
                                "(train.memory_budget)")
        if name == "train":
            p.add_argument("--memory-budget", type=_number(0, inclusive=False), default=None, metavar="GiB",
                           help="per-device memory for model.remat=auto to fit the compiled step's peak into "
                                "(train.memory_budget; default: the device's memory)")
            p.add_argument("--distributed", action="store_true",
                           help="one of several processes: jax.distributed.initialize() detects "
                                "SLURM / Open MPI / Kubernetes (also JAXSYS_DISTRIBUTED=1)")
            p.add_argument("--quiet", action="store_true",
                           help="no progress bar or sample: only warnings, errors and the final line "
                                "(logging.quiet=true logging.progress=false)")
            p.add_argument("--log-format", choices=("text", "json"), default=None,
                           help="json: each line a JSON object with an \"event\" key, on stdout "
                                "(logging.format)")
    p = sub.add_parser("launch", help="run a command as N local processes of one JAX job")
    p.add_argument("--processes", type=_count(1), required=True, help="number of processes (≥ 1)")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- train ...",
                   help="the jaxsys command each process runs (its --devices is per process)")
    from jaxsys.cli.generate import add_parsers
    add_parsers(sub, _count, _number)
    from jaxsys.cli import data as data_cli
    data_cli.add_parsers(sub, _count, _number)
    from jaxsys.cli import hf
    hf.add_parsers(sub, _count)
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run's latest checkpoint")
    p.add_argument("--run-dir", required=True, help="the run_dir of a `jaxsys train`")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="a text file to evaluate on, all of it, in consecutive windows of model.seq_len "
                        "tokens (default: the run's val split, the batches training evaluates on)")
    p.add_argument("--batches", type=_count(1), default=None, metavar="N",
                   help="evaluate the first N batches of train.batch_size windows only (default: "
                        "train.eval_batches on the val split, all of a --data file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("plot", help="loss, val loss and learning rate of runs against steps, as a PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)")
    parser.set_defaults(commands=sub.choices)  # every subcommand's parser, for main and launch
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags may come anywhere among the overrides (`train.steps=2 --devices 2 run_dir=x`):
    every subcommand but `launch` (whose `-- ...` tail is kept verbatim) parses intermixed."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = parser.get_default("commands")
    nested = commands[argv[0]].get_default("subcommands") if argv and argv[0] in commands else None
    if nested and len(argv) > 1 and argv[1] in nested:  # `data prepare ...`: the inner parser intermixes
        args = nested[argv[1]].parse_intermixed_args(argv[2:])
        args.command, args.subcommand = argv[0], argv[1]
    elif argv and argv[0] in commands and argv[0] != "launch" and not nested:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    args.commands, args.parser = commands, commands.get(args.command, parser)
    return args


def _who() -> str:
    """" (process i of N)" in a multi-process job, else ""; never starts a JAX backend itself."""
    if "jax" not in sys.modules:
        return ""
    try:
        import jax
        return f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    except Exception:  # noqa: BLE001 - the backend itself failed: the error says why
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxsys.config import ConfigError
    from jaxsys.parallel.runtime import default_cpu_devices, initialize, simulate_cpu_devices, wants_distributed
    try:
        devices = getattr(args, "devices", None)
        if args.command == "train" and devices is None and not wants_distributed(args.distributed):
            devices = default_cpu_devices(_resolve(args))  # one device per core, where it divides
        simulate_cpu_devices(devices)
        if args.command == "launch":
            return _cmd_launch(args)
        if args.command == "train":
            initialize(args.devices, flag=args.distributed)
        if args.command in ("tokenizer", "data"):
            from jaxsys.cli import data as data_cli
            return {"tokenizer": data_cli.cmd_tokenizer, "data": data_cli.cmd_data}[args.command](args)
        return {"train": _cmd_train, "config": _cmd_config, "sample": _cmd_sample,
                "generate": _cmd_generate, "plan": _cmd_plan,
                "eval": _cmd_eval, "plot": _cmd_plot, "hf": _cmd_hf}[args.command](args)
    except Exception as e:
        loop = sys.modules.get("jaxsys.train.loop")  # TrainingError, if training got that far
        if not isinstance(e, (ConfigError, FileNotFoundError)) and not (loop and isinstance(e, loop.TrainingError)):
            raise
        print(f"jaxsys: error{_who()}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
