"""`jaxsys hf import` and `jaxsys hf export`: Hugging Face model folders in and out.

    jaxsys hf import SRC --out RUN_DIR [--seq-len N] [--no-scan-layers] [--param-dtype float32|bfloat16]
    jaxsys hf export --run-dir DIR --out HF_DIR [--max-shard-size 5GB]

The work is `jaxsys.checkpoint.hf`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction, count) -> None:
    """The `hf` command and its `import` / `export` subcommands."""
    hf = sub.add_parser("hf", help="import a Hugging Face model folder as a run, or export a run to one")
    cmds = hf.add_subparsers(dest="subcommand", required=True)
    p = cmds.add_parser("import", help="a local Hugging Face folder (config.json + safetensors) -> a run directory")
    p.add_argument("src", help="the folder (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory")
    p.add_argument("--seq-len", type=count(1), default=0, metavar="N",
                   help="RoPE models: the context in tokens (default: max_position_embeddings)")
    p.add_argument("--no-scan-layers", action="store_true", help="layer_0, layer_1, ... instead of stacked layers")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="",
                   help="parameter dtype (default: the tensors' own, float16 widened to float32)")
    p = cmds.add_parser("export", help="a run directory's newest checkpoint -> a Hugging Face folder")
    p.add_argument("--run-dir", required=True, help="a jaxsys run directory (trained or imported)")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the folder to write")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split model.safetensors past this size, e.g. 5GB, 500MB (default 5GB)")
    hf.set_defaults(subcommands=cmds.choices)  # main.parse_args parses `hf import ...` with the inner parser


def cmd_hf(args: argparse.Namespace) -> int:
    if args.subcommand == "import":
        from jaxsys.checkpoint.hf import import_to_run_dir
        cfg = import_to_run_dir(args.src, args.out, seq_len=args.seq_len, scan_layers=not args.no_scan_layers,
                                param_dtype=args.param_dtype)
        m = cfg.model
        from pathlib import Path
        ids = '"ids"' in (Path(args.out) / "tokenizer.json").read_text()
        print(f"Imported {args.src} -> {args.out}: {m.family}, {m.num_layers} layers, d={m.embed_dim}, "
              f"vocab {m.vocab_size}, context {m.seq_len}, {m.param_dtype}; "
              + ("no tokenizer.json in the source: prompts are token ids." if ids else "with its tokenizer."),
              flush=True)
        return 0
    from jaxsys.checkpoint.hf import export_hf
    files = export_hf(args.run_dir, args.out, args.max_shard_size,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"Wrote {len(files)} files to {args.out}", flush=True)
    return 0
