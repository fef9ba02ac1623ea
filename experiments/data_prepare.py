"""`jaxsys data prepare` throughput: MB/s of text and tokens/s with 1 and more worker processes.

Writes the shipped Shakespeare `--copies` times into a temporary file (1.1 MB each), trains a
byte-level BPE of `--vocab-size` on one copy (not timed), then times `prepare` (the same
function as the command: read, tokenize, write, split) for each worker count, best of
`--repeats`, and prints one table. The documents are Shakespeare's blank-line-separated
speeches (`--doc-sep '\\n\\n'`). Worker start-up (spawned processes) is inside the timing.

    python experiments/data_prepare.py
    python experiments/data_prepare.py --copies 8 --workers 1 2 4 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="Shakespeare copies in the input (1.1 MB each)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per worker count")
    args = ap.parse_args()

    from jaxsys.data.bpe import train_bpe
    from jaxsys.data.corpus import shakespeare_text
    from jaxsys.data.prepare import prepare
    from jaxsys.data.tokenizers import ByteTokenizer

    root = Path(tempfile.mkdtemp(prefix="jaxsys-prepare-"))
    try:
        text = shakespeare_text()
        one, many = root / "one.txt", root / "many.txt"
        one.write_text(text, encoding="utf-8")
        many.write_text("\n\n".join([text] * args.copies), encoding="utf-8")
        tokenizers = {f"bpe {args.vocab_size}": train_bpe([one], args.vocab_size, doc_sep="\n\n"),
                      "byte": ByteTokenizer()}
        print(f"input: {many.stat().st_size / 1e6:.2f} MB ({args.copies} × Shakespeare), "
              f"best of {args.repeats}\n")
        print("| tokenizer | workers | seconds | MB/s of text | tokens/s |")
        print("|---|---:|---:|---:|---:|")
        for name, tok in tokenizers.items():
            for workers in args.workers:
                best, meta = float("inf"), None
                for r in range(args.repeats):
                    out = root / f"out-{workers}-{r}"
                    t0 = time.perf_counter()
                    meta = prepare([many], tok, out, doc_sep="\n\n", workers=workers, progress=False)
                    best = min(best, time.perf_counter() - t0)
                    shutil.rmtree(out)
                tokens = sum(s["tokens"] for s in meta["splits"].values())
                print(f"| {name} | {workers} | {best:.2f} | {meta['text_bytes'] / 1e6 / best:.2f} | "
                      f"{tokens / best:,.0f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
