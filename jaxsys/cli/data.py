"""`jaxsys tokenizer train` and `jaxsys data prepare`: a tokenizer and a dataset from the user's files.

    jaxsys tokenizer train --vocab-size 4096 FILES... --out DIR [--field text] [--doc-sep SEP]
    jaxsys data prepare FILES... --tokenizer T --out DIR [--field text] [--doc-sep SEP]
                        [--val-fraction F] [--workers N] [--dtype auto|uint16|uint32] [--quiet]

Neither imports JAX. Errors are one line (`ConfigError`), naming the file and the fix.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

INPUTS = ("UTF-8 text (.txt or any other suffix), JSON lines (.jsonl, the --field of each object) or "
          "Parquet (.parquet, the --field column); paths or quoted globs such as 'corpus/**/*.jsonl'")
DOC_SEP = ("text files: split each into documents at this separator (escapes \\n and \\t understood, e.g. "
           "'\\n\\n' for blank lines); default: one document per file")


def _doc_sep(text: str | None) -> str | None:
    return text.replace("\\n", "\n").replace("\\t", "\t") if text else None


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=INPUTS)
    p.add_argument("--field", default="text", help="JSONL key / Parquet column holding the text (default: text)")
    p.add_argument("--doc-sep", default=None, metavar="SEP", help=DOC_SEP)


def add_parsers(sub: Any, count: Callable, number: Callable) -> None:
    """The `tokenizer` and `data` command groups (`count` / `number` are main's argparse types)."""
    group = sub.add_parser("tokenizer", help="train a tokenizer on your text")
    tsub = group.add_subparsers(dest="subcommand", required=True)
    p = tsub.add_parser("train", help="a byte-level BPE (Hugging Face tokenizers) trained on FILES")
    _inputs(p)
    p.add_argument("--vocab-size", type=count(258), required=True, help="tokens in the vocabulary, e.g. 4096")
    p.add_argument("--min-frequency", type=count(1), default=2, help="a merge must occur this often (default: 2)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.json and tokenizer_config.json")
    group.set_defaults(subcommands=tsub.choices)
    group = sub.add_parser("data", help="tokenize your files into a dataset directory for training")
    dsub = group.add_subparsers(dest="subcommand", required=True)
    p = dsub.add_parser("prepare", help="FILES tokenized into memory-mapped token files, split train/val")
    _inputs(p)
    p.add_argument("--tokenizer", required=True, metavar="T",
                   help="'byte', a Hugging Face tokenizer folder (tokenizer.json), or a run / dataset directory")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset directory to write (new or empty)")
    p.add_argument("--val-fraction", type=number(0, inclusive=True), default=0.1,
                   help="share of the documents held out for validation (default: 0.1, every 10th document)")
    from jaxsys.data.prepare import default_workers
    p.add_argument("--workers", type=count(1), default=default_workers(),
                   help=f"tokenizing processes (default: one per core, here {default_workers()})")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token file dtype (default auto: uint16 up to 65,535 tokens, else uint32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group.set_defaults(subcommands=dsub.choices)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from jaxsys.data.bpe import train_bpe, write_hf_dir
    from jaxsys.data.documents import expand_inputs
    files = expand_inputs(args.files)
    t0 = time.perf_counter()
    tok = train_bpe(files, args.vocab_size, field=args.field, doc_sep=_doc_sep(args.doc_sep),
                    min_frequency=args.min_frequency)
    out = write_hf_dir(tok, args.out)
    print(f"Wrote {out}/tokenizer.json: byte-level BPE, {tok.vocab_size} tokens (eos = bos = id {tok.eos_id}), "
          f"trained on {len(files)} file(s) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from jaxsys.data.documents import expand_inputs
    from jaxsys.data.prepare import prepare
    from jaxsys.data.tokenizers import load_tokenizer
    files = expand_inputs(args.files)
    tokenizer = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    meta = prepare(files, tokenizer, args.out, field=args.field, doc_sep=_doc_sep(args.doc_sep),
                   val_fraction=args.val_fraction, workers=args.workers, dtype=args.dtype,
                   progress=not args.quiet)
    seconds = time.perf_counter() - t0
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"Wrote {args.out}: {tr['tokens']:,} train tokens ({tr['documents']:,} documents), {va['tokens']:,} "
          f"val tokens ({va['documents']:,}), {meta['dtype']}, from {len(files)} file(s), "
          f"{meta['text_bytes'] / 1e6:.2f} MB of text in {seconds:.1f}s; train on it with data.source={args.out}")
    return 0
