"""`--config FILE`: start from a saved config.json; overrides apply on top; errors name the file."""

import json

import pytest

from jaxsys.cli.main import main
from jaxsys.config import ConfigError, apply_overrides, from_file, to_json
from jaxsys.config.presets import tiny


def test_a_saved_config_round_trips_and_overrides_apply_on_top(tmp_path, capsys):
    saved = apply_overrides(tiny(), ["model.family=llama", "model.num_kv_heads=2", "logging.trackers=wandb",
                                     "logging.profile_steps=2,3", "run_dir=runs/x"])
    path = tmp_path / "config.json"
    path.write_text(to_json(saved))
    assert from_file(path) == saved
    assert main(["config", "--config", str(path), "train.steps=3", "logging.trackers="]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["family"] == "llama" and printed["model"]["num_kv_heads"] == 2  # from the file
    assert printed["train"]["steps"] == 3 and printed["logging"]["trackers"] == []  # overrides on top
    assert printed["preset"] == "tiny" and printed["run_dir"] == "runs/x"


def test_config_and_preset_are_mutually_exclusive(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(to_json(tiny()))
    for command in ("config", "plan", "train"):
        assert main([command, "--config", str(path), "--preset", "tiny"]) == 2
        err = capsys.readouterr().err
        assert "--config and --preset are mutually exclusive" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text, expected", [
    ("{\"train\": {\"steps\": 5,}}", "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "'the config' must be a JSON object"),
    ("{\"train\": {\"stpes\": 5}}", "Unknown config key 'train.stpes'. Did you mean 'train.steps'?"),
    ("{\"train\": {\"steps\": \"5\"}}", "train.steps='5' is not a valid int."),
    ("{\"train\": {\"steps\": true}}", "train.steps=True is not a valid int."),
    ("{\"model\": 3}", "'model' must be a JSON object, got 3."),
    ("{\"model\": {\"family\": \"gpt3\"}}", "model.family='gpt3' is not one of ['gpt2', 'llama']."),
    ("{\"faults\": {\"nan_steps\": [1, \"x\"]}}", "faults.nan_steps='x' is not a valid int."),
    ("{\"logging\": {\"trackers\": \"wandb\"}}", "logging.trackers='wandb' is not a list."),
    ("{\"train\": {\"microbatches\": 2}}", "was renamed to 'train.grad_accum'"),
])
def test_a_malformed_config_file_is_one_config_error_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        from_file(path)
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_a_missing_config_file_is_an_error_on_the_command_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert f"Config file {tmp_path / 'nope.json'}: cannot read it (No such file or directory)" in err
    assert "Traceback" not in err
