"""The run directory records its tokenizer (an hf one with its files) and a resume on data of
another tokenizer is refused, with the fix."""

from __future__ import annotations

import json

import pytest

from jaxsys import config as config_lib
from jaxsys.config import ConfigError, apply_overrides
from jaxsys.config.presets import tiny
from jaxsys.data.bpe import train_bpe
from jaxsys.data.corpus import shakespeare_text
from jaxsys.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from jaxsys.train import run_dir as run_dir_lib


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "a.txt"
    path.write_text(shakespeare_text()[:50_000], encoding="utf-8")
    return train_bpe([path], 300)


def test_accept_writes_the_hf_files_and_a_resume_checks_them(tmp_path, bpe):
    run = tmp_path / "run"
    cfg = apply_overrides(tiny(), [f"run_dir={run}"])
    assert run_dir_lib.check_run_dir(run, cfg, bpe.to_json()) == []  # a new run: creates the directory
    run_dir_lib.accept(run, cfg, bpe, [], 0)
    assert json.loads((run / "tokenizer.json").read_text()) == bpe.to_json()
    assert (run / "tokenizer/tokenizer.json").read_bytes() == bpe.files["tokenizer.json"]
    again = load_tokenizer(run)
    assert isinstance(again, HFTokenizer) and again.sha256 == bpe.sha256
    (run / "checkpoints/0").mkdir(parents=True)  # as a saved (or imported) step 0
    assert run_dir_lib.check_run_dir(run, cfg, bpe.to_json()) == []
    with pytest.raises(ConfigError, match=r"trained with the tokenizer in .*tokenizer\.json \(hf sha256 \w+…\), "
                                          r"but data.source='shakespeare' gives another one \(byte\).*use the run's data"):
        run_dir_lib.check_run_dir(run, cfg, ByteTokenizer().to_json())
    # Other data may be allowed, but not silently another tokenizer under a Hugging Face one.
    other_data = apply_overrides(cfg, ["checkpoint.allow_changes=data.source"])
    with pytest.raises(ConfigError, match="checkpoint.allow_changes=data.tokenizer if you mean it"):
        run_dir_lib.check_run_dir(run, other_data, ByteTokenizer().to_json())
    waived = apply_overrides(cfg, ["checkpoint.allow_changes=data.tokenizer"])
    changes = run_dir_lib.check_run_dir(run, waived, ByteTokenizer().to_json())
    assert [c.key for c in changes] == ["checkpoint.allow_changes"]
    # A byte run's old behaviour is unchanged: allow_changes=data.source waives the tokenizer.
    byte_run = tmp_path / "bytes"
    run_dir_lib.check_run_dir(byte_run, cfg, ByteTokenizer().to_json())
    run_dir_lib.accept(byte_run, cfg, ByteTokenizer(), [], 0)
    (byte_run / "checkpoints/0").mkdir(parents=True)
    assert json.loads((byte_run / "tokenizer.json").read_text()) == {"kind": "byte"}
    assert not (byte_run / "tokenizer").exists()
    changes = run_dir_lib.check_run_dir(byte_run, other_data, {"kind": "char", "chars": "ab"})
    assert [c.key for c in changes] == ["checkpoint.allow_changes"]
    assert json.loads(config_lib.to_json(cfg))["data"]["sources"] == []
