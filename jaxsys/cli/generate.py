"""`jaxsys sample` and `jaxsys generate`: the command-line front of `jaxsys.inference`.

    jaxsys sample --run-dir DIR [--prompt TEXT] [--num-samples N] [sampling flags]
    jaxsys generate --run-dir DIR --prompts IN.jsonl --out OUT.jsonl [--batch-size B] [sampling flags]

Sampling flags (defaults of every request): --max-new-tokens, --temperature, --top-k, --top-p,
--min-p, --repetition-penalty, --presence-penalty, --seed, --stop; engine flags: --draft-run-dir
and --gamma (speculative decoding), --quantize int8 (weights), --kv-cache-dtype int8, and
--devices N --tensor T (heads over T devices, requests over the other N / T).

Every setting, prompt line and the draft's tokenizer are checked before a checkpoint is read,
so a mistake costs no compile. Each JSONL line is an object with "prompt" and optionally any of
`REQUEST_KEYS`; each output line adds "completion", "finish_reason", "num_tokens" (and
"logprobs" with --logprobs), in the input's order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

REQUEST_KEYS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                "repetition_penalty", "presence_penalty", "seed", "stop")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_parsers(sub: Any, count: Callable, number: Callable) -> None:
    """The `sample` and `generate` subcommands (`count` / `number` are main's argparse types)."""
    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    _common(p, count, number)
    p.add_argument("--prompt", default="ROMEO:", help="text the sample continues (default: ROMEO:)")
    p.add_argument("--num-samples", type=count(1), default=1,
                   help="independent samples of the prompt (seeds seed, seed+1, ...), decoded as one batch")
    p = sub.add_parser("generate", help="complete a JSONL file of prompts in batches, to a JSONL file")
    _common(p, count, number)
    p.add_argument("--prompts", required=True, metavar="IN.jsonl",
                   help=f"one JSON object per line with \"prompt\" and optionally {', '.join(REQUEST_KEYS[1:])}")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="where the completions go (one line each)")
    p.add_argument("--batch-size", type=count(1), default=16, help="requests decoded side by side (default: 16)")
    p.add_argument("--logprobs", action="store_true", help="add each token's log-probability (nats)")


def _common(p: argparse.ArgumentParser, count: Callable, number: Callable) -> None:
    p.add_argument("--run-dir", required=True, help="the run_dir of a `jaxsys train` (its config.json, "
                   "tokenizer.json and checkpoints/; the newest intact checkpoint is used)")
    p.add_argument("--max-new-tokens", type=count(0), default=200,
                   help="tokens to generate after the prompt, ≥ 0 (default: 200)")
    p.add_argument("--temperature", type=number(0, inclusive=True), default=0.8,
                   help="softmax temperature, ≥ 0; 0 is greedy decoding (default: 0.8)")
    p.add_argument("--top-k", type=count(0), default=0,
                   help="sample only among the K likeliest tokens; 0 keeps all (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: the fewest likeliest tokens whose probability reaches P, in (0, 1] (default: 1)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below P × the likeliest one's probability, in [0, 1) (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide seen tokens' positive logits by R (multiply negative ones), > 0 (default: 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from seen tokens' logits (default: 0)")
    p.add_argument("--seed", type=count(0), default=0, help="random seed of the sampling (default: 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a completion before this text (repeatable)")
    p.add_argument("--draft-run-dir", default=None, metavar="DIR",
                   help="speculative decoding: a smaller run trained with the same tokenizer proposes tokens")
    p.add_argument("--gamma", type=count(1), default=4, help="draft tokens per speculative round (default: 4)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8, per output channel (default: none)")
    p.add_argument("--devices", type=count(1), default=None,
                   help="simulate N ≥ 1 CPU devices (sets XLA's host device count); generation uses all devices")
    p.add_argument("--tensor", type=count(1), default=1,
                   help="split heads over T devices (tensor parallel); requests are split over the rest (default: 1)")
    p.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="storage of the KV cache; int8 has a scale per token and head (default: float32)")


def _defaults(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
            "presence_penalty": args.presence_penalty, "seed": args.seed, "stop": list(args.stop)}


def _text_request(fields: dict, where: str) -> Any:
    from jaxsys.config import ConfigError
    from jaxsys.inference.sampler import SamplingParams
    from jaxsys.inference.sampling import TextRequest
    stop = fields["stop"]
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(fields["prompt"], str) or not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ConfigError(f"{where}: \"prompt\" must be a string and \"stop\" a string or a list of strings.")
    if not _is(fields["max_new_tokens"], int) or fields["max_new_tokens"] < 0:
        raise ConfigError(f"{where}: max_new_tokens={fields['max_new_tokens']!r} must be an integer ≥ 0.")
    names = [f.name for f in SamplingParams.__dataclass_fields__.values()]
    for name in names:  # JSON can carry any type: a wrong one is this line's error, not a crash
        kind = int if name in ("top_k", "seed") else float
        if not _is(fields[name], kind):
            raise ConfigError(f"{where}: {name}={fields[name]!r} must be {'an integer' if kind is int else 'a number'}.")
    return TextRequest(fields["prompt"], fields["max_new_tokens"],
                       SamplingParams(**{k: fields[k] for k in names}), tuple(stop))


def _is(value: Any, kind: type) -> bool:
    """`value` is an int (kind int) or a number (kind float); JSON booleans are neither."""
    allowed = (int,) if kind is int else (int, float)
    return isinstance(value, allowed) and not isinstance(value, bool)


def read_requests(path: str | Path, defaults: dict) -> list[Any]:
    """The requests of a JSONL file, each line's keys over `defaults`; `ConfigError` naming the
    line for malformed JSON, a missing prompt or an unknown key."""
    from jaxsys.config import ConfigError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a JSONL file with one {{\"prompt\": ...}} per line.")
    requests = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg}); each line must be one object like "
                              "{\"prompt\": \"ROMEO:\"}.") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ConfigError(f"{where}: each line must be an object with a \"prompt\" key.")
        unknown = sorted(set(obj) - set(REQUEST_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(REQUEST_KEYS)}.")
        fields = {**defaults, "seed": defaults["seed"] + len(requests), **obj}
        requests.append(_text_request(fields, where))
    if not requests:
        raise ConfigError(f"{path} has no requests; give one JSON object per line.")
    return requests


def _engine(args: argparse.Namespace, requests: list[Any]) -> tuple[Any, Any, Any]:
    """(tokenizer, generator, draft generator or None), every request checked first."""
    from jaxsys.config import ConfigError
    from jaxsys.data.tokenizers import IdTokenizer
    from jaxsys.inference.decode import Generator
    from jaxsys.inference.load import load_variables, read_run
    from jaxsys.inference.sampling import to_requests
    from jaxsys.inference.speculative import check_speculative
    from jaxsys.model.transformer import Transformer
    if getattr(args, "logprobs", False) and args.draft_run_dir:
        raise ConfigError("--logprobs is not available with --draft-run-dir (speculative decoding does not "
                          "score the tokens it accepts); drop one of them.")
    cfg, tokenizer = read_run(args.run_dir)
    token_requests = to_requests(tokenizer, requests)
    draft_cfg = None
    if args.draft_run_dir:
        draft_cfg, draft_tok = read_run(args.draft_run_dir)
        if draft_tok.to_json() != tokenizer.to_json():
            raise ConfigError(f"The draft run {args.draft_run_dir} has another tokenizer than {args.run_dir}; "
                              "train the draft on the same data and tokenizer.")

    mesh = _mesh(args.tensor)

    def build(c: Any, run_dir: str, params: Any = None, model_state: Any = None) -> Generator:
        model = Transformer(c.model)
        if params is not None and args.quantize == "int8":
            from jaxsys.inference.quantize import quantize_params
            params = quantize_params(params, c.model)  # the MoE bias (model_state) stays float
        return Generator(model, params, kv_dtype=args.kv_cache_dtype, num_tokens=tokenizer.vocab_size, mesh=mesh,
                         model_state=model_state)

    # Shapes-only generators check every request before any checkpoint is read.
    target = build(cfg, args.run_dir)
    target.check(token_requests)
    if draft_cfg is not None:
        check_speculative(target, build(draft_cfg, args.draft_run_dir), token_requests, args.gamma)
    if isinstance(tokenizer, IdTokenizer):
        _stderr("jaxsys: this run has no tokenizer (a .bin corpus without one beside it, or an import from a folder "
                "without tokenizer.json): prompts and completions are token ids.")
    target = build(cfg, args.run_dir, *load_variables(args.run_dir, cfg)[1:])
    draft = None
    if draft_cfg is not None:
        draft = build(draft_cfg, args.draft_run_dir, *load_variables(args.draft_run_dir, draft_cfg)[1:])
    return tokenizer, target, draft


def _mesh(tensor: int) -> Any:
    """None on one device; else a data × tensor mesh over every device."""
    import jax
    from jaxsys.config import ConfigError, MeshConfig
    from jaxsys.parallel.mesh import make_mesh
    n = jax.device_count()
    if n == 1 and tensor == 1:
        return None
    if n % tensor:
        raise ConfigError(f"--tensor {tensor} does not divide the {n} devices; choose a divisor of {n}.")
    return make_mesh(MeshConfig(data=n // tensor, tensor=tensor))


def _report(stats: Any, tokens: int, seconds: float) -> None:
    line = f"jaxsys: {tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s, compile included)"
    if stats is not None:
        line += (f"; speculative: {stats.accepted}/{stats.proposed} draft tokens accepted "
                 f"({stats.acceptance_rate:.0%}) in {stats.rounds} rounds")
    _stderr(line)


def cmd_sample(args: argparse.Namespace) -> int:
    import dataclasses
    from jaxsys.inference.sampling import complete, with_prompt
    [base] = read_requests_from_args(args)
    requests = [dataclasses.replace(base, sampling=dataclasses.replace(base.sampling, seed=args.seed + i))
                for i in range(args.num_samples)]
    tokenizer, target, draft = _engine(args, requests)
    start = time.perf_counter()
    out, stats = complete(target, tokenizer, requests, draft=draft, gamma=args.gamma)
    _report(stats, sum(len(c.tokens) for c in out), time.perf_counter() - start)
    for i, c in enumerate(out):
        if i:
            print("-" * 60)
        print(with_prompt(tokenizer, args.prompt, c))
    return 0


def read_requests_from_args(args: argparse.Namespace) -> list[Any]:
    return [_text_request(dict(_defaults(args), prompt=args.prompt), "--prompt")]


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxsys.checkpoint.run_files import write_atomic
    from jaxsys.inference.sampling import complete
    requests = read_requests(args.prompts, _defaults(args))
    tokenizer, target, draft = _engine(args, requests)
    from jaxsys.inference.speculative import SpeculativeStats
    lines, start, total = [], time.perf_counter(), 0
    spec = SpeculativeStats(0, 0, 0) if draft is not None else None
    batches = range(0, len(requests), args.batch_size)
    for j, first in enumerate(batches):
        batch = requests[first:first + args.batch_size]
        out, stats = complete(target, tokenizer, batch, draft=draft, gamma=args.gamma)
        total += sum(len(c.tokens) for c in out)
        if spec is not None:
            spec = SpeculativeStats(spec.rounds + stats.rounds, spec.proposed + stats.proposed,
                                    spec.accepted + stats.accepted)
        _stderr(f"jaxsys generate: batch {j + 1}/{len(batches)} done ({first + len(batch)}/{len(requests)} requests)")
        for r, c in zip(batch, out):
            row = {"prompt": r.prompt, "completion": c.text, "finish_reason": c.finish_reason,
                   "num_tokens": len(c.tokens)}
            if args.logprobs:
                row["logprobs"] = c.logprobs
            lines.append(json.dumps(row, ensure_ascii=False))
    write_atomic(Path(args.out), "\n".join(lines) + "\n")
    _report(spec, total, time.perf_counter() - start)
    _stderr(f"jaxsys generate: wrote {len(lines)} completions to {args.out}")
    return 0
