"""Dotted ``section.key=value`` overrides, checked against the schema's type annotations, and
the JSON form of a config (a run's ``config.json``).

An unknown key or an ill-typed value raises `ConfigError` naming the key and suggesting the
closest valid one: ``mesh.fdsp=4`` -> "Did you mean 'mesh.fsdp'?".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal

from jaxsys.config.schema import Config, ConfigError

def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key a `Config` accepts, e.g. ``['model.family', ..., 'run_dir']``."""
    cfg = Config() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def suggest(key: str, options: list[str]) -> str:
    """" Did you mean ...?" for the closest of `options` (or its last dotted part), else ""."""
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if not close:  # try the last component alone: `lr` -> `optimizer.lr`
        leaf = key.split(".")[-1]
        close = [o for o in options if o.split(".")[-1] == leaf][:1]
    return f" Did you mean '{close[0]}'?" if close else ""


def _parse(key: str, text: str, hint: Any) -> Any:
    """Parse `text` into the type `hint` (int, float, bool, str, Literal, tuple[int, ...])."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise ConfigError(
                f"{key}={text!r} is not one of {list(choices)}.{suggest(text, list(choices))}"
            )
        return text
    if origin is tuple:
        (elem, _) = typing.get_args(hint)
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse(key, p.strip(), elem) for p in parts)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false.")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a valid {hint.__name__}.") from None
    if hint is str:
        return text
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


# Keys renamed by the layered-architecture change (2026-12): an old key is an error that names
# its new spelling, not an alias.
RENAMED = {"train.microbatches": "train.grad_accum", "train.nan_steps": "faults.nan_steps",
           "train.nan_batches": "faults.nan_batches", "schedule": "lr_schedule"}


def _unknown(full_key: str) -> ConfigError:
    section = full_key.split(".")[0]
    if full_key in RENAMED or section in RENAMED:
        new = RENAMED.get(full_key) or RENAMED[section] + full_key[len(section):]
        return ConfigError(f"Config key '{full_key}' was renamed to '{new}'; use {new}=...")
    # repr: a key holding a newline (found by tests/config/test_properties.py) stays one line
    return ConfigError(f"Unknown config key {full_key!r}.{suggest(full_key, all_keys())}")


def _set(cfg: Any, path: list[str], text: str, full_key: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    name = path[0]
    if name not in hints:
        raise _unknown(full_key)
    current = getattr(cfg, name)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"'{full_key}' is a section; set one of its keys, e.g. '{full_key}.{dataclasses.fields(current)[0].name}=...'.")
        return dataclasses.replace(cfg, **{name: _parse(full_key, text, hints[name])})
    if not dataclasses.is_dataclass(current):
        raise _unknown(full_key)
    return dataclasses.replace(cfg, **{name: _set(current, path[1:], text, full_key)})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return `cfg` with each ``section.key=value`` applied, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value, e.g. train.steps=500.")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip())
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _typed(key: str, value: Any, hint: Any) -> Any:
    """A JSON `value` checked against the type `hint` (a config file may hold anything)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list.")
        (elem, _) = typing.get_args(hint)
        return tuple(_typed(key, v, elem) for v in value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false.")
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} is not a valid int.")
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a valid float.")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not a string.")
    return value


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Rebuild a config from `to_dict` output (e.g. a run's config.json). Unknown keys and
    ill-typed values raise `ConfigError` naming the dotted key; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'the config'}' must be a JSON object, got {data!r}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in hints:
            raise _unknown(full_key)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, full_key + ".")
        else:
            kwargs[key] = _typed(full_key, value, hint)
    return cls(**kwargs)


def from_file(path: str | Path) -> Config:
    """The config saved in a JSON file (e.g. a run's config.json). Any problem with the file is
    one `ConfigError` that names it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"Config file {path}: cannot read it ({e.strerror or e}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}.") from None
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"Config file {path}: {e}") from None
