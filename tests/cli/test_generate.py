"""`jaxsys generate` (JSONL in, JSONL out) and the generation flags of `jaxsys sample`.

Everything runs in this process through `jaxsys.cli.main.main` on the 8 simulated CPU devices
(so generation runs on a data=8 mesh unless --tensor says otherwise), from one tiny run trained
per module. Compiles are nearly all of the time, and one compiles per batch size and (bucket
of) max new tokens: every command here asks for at most 8 new tokens and uses batches of 1, 2
or 3 requests, so most commands reuse a compiled program. --tensor, --quantize and
--kv-cache-dtype (each a new program) are checked by default only as far as the engine they
build; their full runs are marked slow.

The tiny run (10 steps) has learnt little more than letter frequencies: its greedy text is
mostly newlines, its samples (temperature 0.8) are letter soup. The equalities below that must
mean something are therefore asserted on sampled rows with fixed seeds as well as greedy ones,
with a check that the settings compared really change the text.

Refusals run against a copy of the run without its checkpoints: a refusal that came only after
reading a checkpoint would report the missing checkpoint instead of its own problem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsys.cli.main import main
from tests.cli.test_bad_inputs import cli
from jaxsys.config import DataConfig
from jaxsys.data.corpus import load_corpus
from jaxsys.inference import decode
from tests.helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "logging.progress=false", "logging.tensorboard=false", "logging.sample_tokens=0"]
NEW = ["--max-new-tokens", "8"]
DASHES = "-" * 60
# One line per kind of setting: a greedy row (temperature 0 over the flag's 0.8), a row that
# stops at 3 tokens, and a sampled row with its own seed.
LINES = [{"prompt": "JULIET:", "temperature": 0}, {"prompt": "ROMEO:", "max_new_tokens": 3},
         {"prompt": "First", "seed": 7}]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run of 10 steps (lr 3e-2, one checkpoint, one evaluation), trained once."""
    run = tmp_path_factory.mktemp("generate") / "run"
    assert main(["train", *TINY, "train.steps=10", "optimizer.lr=3e-2", "train.eval_every=10",
                 "checkpoint.every=10", f"run_dir={run}"]) == 0
    return run


@pytest.fixture(scope="module")
def unloaded(run, tmp_path_factory) -> Path:
    """The run's config.json and tokenizer.json without any checkpoint."""
    copy = tmp_path_factory.mktemp("unloaded") / "run"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(run / name, copy / name)
    return copy


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def generate(capsys, run: Path, tmp_path: Path, lines: list, *flags: str, name: str = "out"):
    """(exit code, output rows or None, stderr) of `jaxsys generate` over `lines`."""
    src = write_jsonl(tmp_path / f"{name}.in.jsonl", lines)
    out = tmp_path / f"{name}.jsonl"
    code, stdout, err = cli(capsys, ["generate", "--run-dir", str(run), "--prompts", str(src),
                                     "--out", str(out), *NEW, "--temperature", "0.8", *flags])
    assert stdout == ""
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else None
    return code, rows, err


def sample(capsys, run: Path, *flags: str) -> str:
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), *NEW, *flags])
    assert code == 0, err
    assert "Loaded checkpoint step 10" in err
    return out


class Built(Exception):
    """Raised by the `built` spy once the CLI has built its engine from the checkpoint."""


@pytest.fixture
def built(monkeypatch) -> list[dict]:
    """What the `Generator` the CLI builds with loaded parameters was given; building it then
    raises `Built`, so nothing is placed or compiled."""
    seen, init = [], decode.Generator.__init__

    def spy(self, model, params, **kw):
        if params is not None:
            seen.append(dict(kw, quantized=decode.is_quantized(params)))
            raise Built
        init(self, model, params, **kw)
    monkeypatch.setattr(decode.Generator, "__init__", spy)
    return seen


# ----------------------------------------------------------------------------- generate


def test_generate_writes_one_line_per_input_in_order_with_per_line_settings(capsys, run, tmp_path):
    code, rows, err = generate(capsys, run, tmp_path, LINES)
    assert code == 0, err
    assert [set(r) for r in rows] == [{"prompt", "completion", "finish_reason", "num_tokens"}] * 3
    assert [r["prompt"] for r in rows] == ["JULIET:", "ROMEO:", "First"]
    assert [r["num_tokens"] for r in rows] == [8, 3, 8]  # "max_new_tokens": 3 over --max-new-tokens 8
    assert [r["finish_reason"] for r in rows] == ["length"] * 3
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    assert f"wrote 3 completions to {tmp_path / 'out.jsonl'}" in err and "jaxsys: 19 tokens in" in err


def test_generate_is_deterministic_and_its_rows_are_the_sample_commands_output(capsys, run, tmp_path):
    _, first, _ = generate(capsys, run, tmp_path, LINES, name="a")
    _, again, _ = generate(capsys, run, tmp_path, LINES, name="b")
    assert again == first
    greedy, sampled = first[0], first[2]
    assert sample(capsys, run, "--prompt", "JULIET:", "--temperature", "0") == "JULIET:" + greedy["completion"] + "\n"
    assert sample(capsys, run, "--prompt", "First", "--seed", "7") == "First" + sampled["completion"] + "\n"
    # Both settings of the lines mattered: JULIET: sampled at the flags' 0.8 (seed 0, its line's
    # default) is another text, and so is First with another seed.
    assert sample(capsys, run, "--prompt", "JULIET:", "--seed", "0") != "JULIET:" + greedy["completion"] + "\n"
    assert sample(capsys, run, "--prompt", "First", "--seed", "8") != "First" + sampled["completion"] + "\n"


def test_a_stop_string_ends_the_completion_before_it(capsys, run, tmp_path):
    _, rows, _ = generate(capsys, run, tmp_path, LINES, name="plain")
    text = rows[2]["completion"]
    # A letter of the sampled completion, after its first character, seen there for the first time.
    i, stop = next((i, c) for i, c in enumerate(text) if i > 0 and c.isascii() and c.isalpha() and c not in text[:i])
    lines = [*LINES[:2], dict(LINES[2], stop=stop)]
    code, stopped, err = generate(capsys, run, tmp_path, lines, name="stopped")
    assert code == 0, err
    assert stopped[2]["completion"] == text[:i] and stopped[2]["finish_reason"] == "stop"
    assert stopped[2]["num_tokens"] == len(text[:i].encode())  # bytes: the tokens before the stop
    assert stopped[:2] == rows[:2]  # the other rows are untouched


def test_logprobs_are_one_nonpositive_float_per_token(capsys, run, tmp_path):
    _, plain, _ = generate(capsys, run, tmp_path, LINES, name="plain")
    code, rows, err = generate(capsys, run, tmp_path, LINES, "--logprobs", name="lp")
    assert code == 0, err
    for r, p in zip(rows, plain):
        lp = r.pop("logprobs")
        assert len(lp) == r["num_tokens"] and all(isinstance(x, float) and x <= 0 for x in lp)
        assert r == p  # the same completions as without --logprobs
    assert "logprobs" not in plain[0]


def test_batches_give_the_output_of_one_batch_and_report_progress(capsys, run, tmp_path):
    _, whole, err = generate(capsys, run, tmp_path, LINES, name="whole")
    assert "batch 1/1 done (3/3 requests)" in err
    code, batched, err = generate(capsys, run, tmp_path, LINES, "--batch-size", "2", name="batched")
    assert code == 0, err
    assert batched == whole  # the sampled row's seed is its line's, not its place in a batch
    progress = [x for x in err.splitlines() if x.startswith("jaxsys generate: batch")]
    assert progress == ["jaxsys generate: batch 1/2 done (2/3 requests)",
                        "jaxsys generate: batch 2/2 done (3/3 requests)"]


LONG = "x" * 17  # the tiny model's context is 16 tokens (bytes)
REFUSALS = {
    "malformed JSON": (['{"prompt": "a"}', '{"prompt": '], ("in.jsonl:2: not JSON", '{"prompt": "ROMEO:"}')),
    "not an object": (['["a"]'], ("in.jsonl:1:", 'an object with a "prompt" key')),
    "no prompt": (['{"prompt": "a"}', {"temperature": 0}], ("in.jsonl:2:", '"prompt" key')),
    "unknown key": ([{"prompt": "a", "temprature": 0}],
                    ("in.jsonl:1: unknown key 'temprature'", "the keys are prompt,")),
    "negative max_new_tokens": ([{"prompt": "a", "max_new_tokens": -1}], ("in.jsonl:1:", "max_new_tokens=-1", "≥ 0")),
    "top_p 0": ([{"prompt": "a"}, {"prompt": "b", "top_p": 0}], ("Request 1", "top_p=0", "(0, 1]", "use 1")),
    "prompt too long": ([{"prompt": "a"}, {"prompt": LONG}], ("Request 1", "17 tokens", "model.seq_len=16", "shorten")),
    "no lines": ([""], ("has no requests", "one JSON object per line")),
}


@pytest.mark.parametrize("lines,words", REFUSALS.values(), ids=REFUSALS.keys())
def test_generate_refuses_bad_lines_before_reading_a_checkpoint(capsys, unloaded, tmp_path, lines, words):
    code, rows, err = generate(capsys, unloaded, tmp_path, lines, name="in")
    assert code == 2 and rows is None
    assert len(err.splitlines()) == 1 and err.startswith("jaxsys: error: "), err
    for w in words:
        assert w in err, (w, err)


# A value of the wrong JSON type for a sampling key, or "max_new_tokens": true (bool is an int in
# Python), is this line's one-line refusal, not a TypeError or a 1-token generation.
WRONG_TYPES = [
    pytest.param({"prompt": "a", "temperature": "hot"}, "temperature", id="temperature a string"),
    pytest.param({"prompt": "a", "top_p": None}, "top_p", id="top_p null"),
    pytest.param({"prompt": "a", "max_new_tokens": True}, "max_new_tokens", id="max_new_tokens true"),
]


@pytest.mark.parametrize("line,key", WRONG_TYPES)
def test_generate_refuses_values_of_the_wrong_type(capsys, unloaded, tmp_path, line, key):
    code, rows, err = generate(capsys, unloaded, tmp_path, [line], name="in")
    assert code == 2 and rows is None
    assert len(err.splitlines()) == 1 and key in err and "No checkpoint" not in err, err


def test_generate_refuses_a_missing_prompts_file(capsys, unloaded, tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capsys, ["generate", "--run-dir", str(unloaded),
                                     "--prompts", str(tmp_path / "nowhere.jsonl"), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "nowhere.jsonl not found" in err and '{"prompt": ...}' in err


# ----------------------------------------------------------------------------- sample


def test_num_samples_prints_that_many_samples_of_the_prompt(capsys, run):
    out = sample(capsys, run, "--prompt", "First", "--num-samples", "3", "--seed", "7")
    samples = out.rstrip("\n").split("\n" + DASHES + "\n")
    assert len(samples) == 3 and all(s.startswith("First") for s in samples)
    assert len(set(samples)) == 3  # seeds 7, 8, 9
    assert samples[0] + "\n" == sample(capsys, run, "--prompt", "First", "--seed", "7")


def test_top_p_and_min_p_reach_the_sampler(capsys, run):
    greedy = sample(capsys, run, "--prompt", "First", "--temperature", "0")
    sampled = sample(capsys, run, "--prompt", "First", "--seed", "7")
    assert sampled != greedy
    # A nucleus of probability 1e-6 or a floor of 0.999 × the likeliest leaves the argmax alone.
    assert sample(capsys, run, "--prompt", "First", "--seed", "7", "--top-p", "1e-6") == greedy
    assert sample(capsys, run, "--prompt", "First", "--seed", "7", "--min-p", "0.999") == greedy
    out = sample(capsys, run, "--prompt", "First", "--seed", "7", "--top-p", "0.9", "--min-p", "0.05")
    assert out.startswith("First") and len(out) > len("First\n")


@pytest.mark.parametrize("flags,words", [
    (["--top-p", "0"], ("top_p=0.0", "(0, 1]")),
    (["--min-p", "1"], ("min_p=1.0", "[0, 1)")),
    (["--tensor", "3"], ("--tensor 3 does not divide the 8 devices", "divisor of 8")),
])
def test_sample_refuses_bad_settings_before_reading_a_checkpoint(capsys, unloaded, flags, words):
    code, out, err = cli(capsys, ["sample", "--run-dir", str(unloaded), *flags])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("flags,mesh,kv_dtype,quantized", [
    ([], (8, 1), "float32", False),
    (["--tensor", "2"], (4, 2), "float32", False),
    (["--quantize", "int8", "--kv-cache-dtype", "int8"], (8, 1), "int8", True),
])
def test_engine_flags_reach_the_generator(capsys, run, built, flags, mesh, kv_dtype, quantized):
    with pytest.raises(Built):
        main(["sample", "--run-dir", str(run), *NEW, *flags])
    [engine] = built
    assert (engine["mesh"].shape["data"], engine["mesh"].shape["tensor"]) == mesh
    assert (engine["kv_dtype"], engine["quantized"], engine["num_tokens"]) == (kv_dtype, quantized, 256)


@pytest.mark.slow
def test_tensor_2_prints_the_text_of_data_8(capsys, run):
    flags = ["--prompt", "First", "--seed", "7"]
    assert sample(capsys, run, *flags, "--tensor", "2") == sample(capsys, run, *flags)


@pytest.mark.slow
def test_int8_weights_and_cache_run(capsys, run):
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), *NEW, "--prompt", "First", "--seed", "7",
                                  "--quantize", "int8", "--kv-cache-dtype", "int8"])
    assert code == 0, err
    assert out.startswith("First") and len(out) > len("First\n") and "jaxsys: 8 tokens in" in err


def test_devices_cannot_change_an_initialised_jax(capsys, run, monkeypatch):
    """--devices sets XLA's host device count, which acts only before JAX starts: in this
    process (8 devices already) --devices 8 is accepted and any other count is refused."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main rewrites it; restored after
    assert sample(capsys, run, "--prompt", "First", "--devices", "8").startswith("First")
    with pytest.raises(SystemExit, match="--devices 4: jax was already initialised with 8 devices"):
        main(["sample", "--run-dir", str(run), "--devices", "4", "--tensor", "2"])


@pytest.mark.slow
def test_devices_4_tensor_2_in_a_fresh_process(capsys, run):
    """`--devices 4 --tensor 2` (data=2 × tensor=2) in a new process prints this process's text."""
    env = subprocess_env()
    flags = ["--prompt", "First", "--seed", "7", *NEW]
    proc = subprocess.run([sys.executable, "-m", "jaxsys", "sample", "--run-dir", str(run), "--devices", "4",
                           "--tensor", "2", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == sample(capsys, run, *flags[:-2])


# ----------------------------------------------------------------------------- drafts


def test_a_draft_with_another_tokenizer_is_refused(capsys, run, tmp_path):
    """The draft run's tokenizer.json is that of `data.tokenizer=char` on the same text (its
    config says so too); the refusal reads only those two files, no checkpoint."""
    draft = tmp_path / "char-draft"
    draft.mkdir()
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["tokenizer"] = "char"
    (draft / "config.json").write_text(json.dumps(cfg))
    char = load_corpus(DataConfig(tokenizer="char")).tokenizer
    (draft / "tokenizer.json").write_text(json.dumps(char.to_json()))
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--draft-run-dir", str(draft), *NEW])
    assert code == 2 and out == "" and "Loaded checkpoint" not in err
    assert len(err.splitlines()) == 1 and "another tokenizer" in err and "same data and tokenizer" in err


@pytest.mark.slow
def test_a_trained_char_draft_is_refused(capsys, run, tmp_path):
    d = tmp_path / "char"
    assert main(["train", *TINY, "train.steps=2", "data.tokenizer=char", f"run_dir={d}"]) == 0
    capsys.readouterr()
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--draft-run-dir", str(d), *NEW])
    assert code == 2 and out == "" and "Loaded checkpoint" not in err
    assert len(err.splitlines()) == 1 and "another tokenizer" in err


@pytest.fixture(scope="module")
def draft(tmp_path_factory) -> Path:
    """A one-layer draft trained on the same text and tokenizer (another seed)."""
    d = tmp_path_factory.mktemp("draft") / "run"
    assert main(["train", *TINY, "train.steps=2", "model.num_layers=1", "train.seed=1", f"run_dir={d}"]) == 0
    return d


@pytest.mark.slow
def test_a_draft_prints_the_text_of_the_target_and_reports_acceptance(capsys, run, draft):
    # "ROMEO:" (6) + 8 new tokens + gamma 2 fills the 16-token context that speculation stays inside.
    flags = ["--prompt", "ROMEO:", "--temperature", "0", "--gamma", "2"]
    code, out, err = cli(capsys, ["sample", "--run-dir", str(run), "--draft-run-dir", str(draft), *NEW, *flags])
    assert code == 0, err
    target = sample(capsys, run, *flags)
    assert out == target
    assert f"Loaded checkpoint step 2 from {draft / 'checkpoints'}" in err
    accepted, proposed = map(int, re.search(r"speculative: (\d+)/(\d+) draft tokens accepted", err).groups())
    # The draft's own greedy text is another: the target's verification chose every token.
    code, own, _ = cli(capsys, ["sample", "--run-dir", str(draft), *NEW, *flags[:4]])
    assert code == 0 and own != target
    assert proposed > 0 and accepted < proposed


@pytest.mark.slow
def test_logprobs_under_a_draft_are_given_or_refused(capsys, run, draft, tmp_path):
    """Speculative completions carry no log-probabilities, so `generate --logprobs
    --draft-run-dir` must not write "logprobs": [] beside "num_tokens": 8. Either is right: the
    list of num_tokens floats, or a refusal (exit 2)."""
    code, rows, err = generate(capsys, run, tmp_path, [{"prompt": "ROMEO:"}], "--logprobs", "--temperature", "0",
                               "--draft-run-dir", str(draft), "--gamma", "2", name="spec")
    if code == 2:
        assert rows is None and "logprobs" in err
    else:
        assert code == 0, err
        assert len(rows[0]["logprobs"]) == rows[0]["num_tokens"] == 8
