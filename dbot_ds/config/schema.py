"""The config machinery every command shares: typed sections from dicts (unknown keys and
ill-typed values are errors naming the key), `--set key=value` parsing, merging, and old key
names that keep working with a deprecation message."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from pathlib import Path

from dbot_ds.errors import UserError


class ConfigError(UserError, ValueError):
    """Bad configuration, raised before any expensive work starts."""


def _coerce(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (object), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) != len(value) and Ellipsis not in args:
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        items = [_coerce(v, args[0] if origin is list or Ellipsis in args else a, key)
                 for v, a in zip(value, args if origin is tuple else [args[0]] * len(value))]
        return origin(items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and
                                               not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """A dataclass from a (nested) dict, every value coerced to its field's type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
                          f"known keys in this section: {', '.join(prefix + n for n in sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}"""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def nest(key: str, value) -> dict:
    """'optim.base_lr', 1e-4 -> {'optim': {'base_lr': 1e-4}}"""
    *parents, last = key.split(".")
    out = node = {}
    for p in parents:
        node[p] = {}
        node = node[p]
    node[last] = value
    return out


def parse_set(item: str) -> dict:
    """'optim.base_lr=1e-4' -> {'optim': {'base_lr': 1e-4}}; values parse as JSON, else as text."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set mask.ratio=0.8")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return nest(key.strip(), value)


def rename_keys(data: dict, renamed: dict[str, str], what: str) -> dict:
    """Old (flat or dotted) key names -> their new places, with one deprecation warning naming them."""
    flat = flatten(data)
    old = [k for k in flat if k in renamed]
    if old:
        warnings.warn(f"{what}: old key names, to be removed: " + ", ".join(f"{k!r} is now {renamed[k]!r}" for k in old),
                      DeprecationWarning, stacklevel=3)
    out: dict = {}
    for key, value in flat.items():
        out = deep_merge(out, nest(renamed.get(key, key), value))
    return out


def read_config_file(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}, not an object of sections "
                          '(e.g. {"mask": {"ratio": 0.8}})')
    return data


def layered(base: dict, config_file: str | Path | None, overrides: list[str]) -> dict:
    """A recipe's dict, then a JSON file over it, then each `--set key=value` over that."""
    data = dict(base)
    if config_file:
        data = deep_merge(data, read_config_file(config_file))
    for item in overrides:
        data = deep_merge(data, parse_set(item))
    return data


def _scalar(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def from_namespace(cls, namespace, comma_lists: tuple[str, ...] = ()):
    """A command line's options as a typed, checked config: the options named like cls's fields
    (those left unset keep their defaults); `comma_lists` split at commas, each item read as
    JSON where it parses (numbers) and as text otherwise."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(namespace).items() if k in names and v is not None}
    values.update({k: [_scalar(x) for x in values[k].split(",")] for k in comma_lists if k in values})
    return from_dict(cls, values)
