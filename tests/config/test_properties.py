"""Property-based tests (Hypothesis) of the override parser, config files and `validate`:
whatever a user types, the answer is a `Config` or a `ConfigError`, never another exception."""

from __future__ import annotations

import dataclasses
import os
import json
import typing
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsys.config import (Config, ConfigError, all_keys, apply_overrides, from_dict, to_dict, to_json,
                           validate)
from jaxsys.config.presets import tiny

# 200 examples each keeps the suite fast; JAXSYS_HYPOTHESIS_EXAMPLES=5000 searches harder.
SETTINGS = settings(max_examples=int(os.environ.get("JAXSYS_HYPOTHESIS_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KEYS = all_keys()


def _hints(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """{dotted key: its type annotation}."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        out.update(_hints(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else {prefix + name: hint})
    return out


HINTS = _hints()


def _field_values(hint: Any) -> st.SearchStrategy:
    """Values of the type `hint` (valid types; any value within them, edges often)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return st.sampled_from(typing.get_args(hint))
    if origin is tuple:
        return st.lists(_field_values(typing.get_args(hint)[0]), max_size=4).map(tuple)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(st.integers(-2, 3), st.integers(-3, 70), st.integers(-10**9, 10**9))
    if hint is float:
        return st.one_of(st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True))
    if hint is str:
        return st.text(max_size=8)
    raise AssertionError(f"no strategy for {hint}")


def _as_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_as_text, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


numbers = st.one_of(st.integers(-10**6, 10**6), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True))
junk_values = st.one_of(
    numbers.map(str),
    st.sampled_from(["", " ", "True", "off", "nan", "-inf", "1e400", "0x10", "1_000", "()", "[1,2]",
                     "1,,2", ",", "gpt2", "llama", "wandb,swanlab", "wandb,wandb", "json", "=", "1=2"]),
    st.text(max_size=12),
)
junk_keys = st.one_of(
    st.sampled_from(KEYS).map(lambda k: k.upper()),
    st.sampled_from(KEYS).map(lambda k: k + ".x"),
    st.sampled_from(KEYS).map(lambda k: k.split(".")[0]),  # a section, not a key
    st.sampled_from(["train.microbatches", "schedule.kind", "train.nan_steps", "", ".", "model..family"]),
    st.text(max_size=16),
)
# Mostly real keys with values of their own type (so the checks behind the parser are reached),
# some with values of another type, some junk keys, some text without "=".
override = st.one_of(
    st.sampled_from(KEYS).flatmap(lambda k: _field_values(HINTS[k]).map(lambda v: f"{k}={_as_text(v)}")),
    st.sampled_from(KEYS).flatmap(lambda k: junk_values.map(lambda v: f"{k}={v}")),
    st.tuples(junk_keys, junk_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=20),
)


@SETTINGS
@given(st.lists(override, max_size=8))
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    try:
        cfg = apply_overrides(tiny(), overrides)
        validate(cfg)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
    else:
        assert isinstance(cfg, Config)
        # What is accepted is also saved and reloaded (compared as JSON: NaN != NaN).
        assert to_json(from_dict(json.loads(to_json(cfg)))) == to_json(cfg)


def _configs(cls: type = Config, base: object = None) -> st.SearchStrategy:
    """Configs of valid-typed fields, each either kept from the tiny preset (`base`, the section
    of it being drawn) or drawn at random; nested sections (model.moe) recurse."""
    base = tiny() if base is None else base
    fields = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        default = getattr(base, f.name)
        fields[f.name] = (_configs(hint, default) if dataclasses.is_dataclass(hint)
                          else st.one_of(st.just(default), _field_values(hint)))
    return st.builds(cls, **fields)


@SETTINGS
@given(_configs())
def test_validate_on_random_typed_configs_raises_only_config_errors(cfg):
    try:
        validate(cfg)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
    else:  # an accepted config has sizes a model can be built from
        m = cfg.model.resolved()
        assert m.num_heads >= 1 and m.head_dim >= 1 and cfg.train.batch_size % cfg.train.grad_accum == 0


json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


@SETTINGS
@given(st.dictionaries(st.sampled_from([*{k.split(".")[0] for k in KEYS}, "junk"]),
                       st.one_of(json_values, st.dictionaries(
                           st.sampled_from([k.split(".")[-1] for k in KEYS] + ["junk"]), json_values, max_size=4)),
                       max_size=4))
def test_random_config_files_give_a_config_or_a_config_error(data):
    try:
        cfg = from_dict(data)
    except ConfigError:
        return
    assert isinstance(cfg, Config) and to_json(from_dict(to_dict(cfg))) == to_json(cfg)
