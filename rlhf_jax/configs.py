"""Config plumbing: build frozen dataclasses from dicts, JSON/TOML files and ``a.b.c=value`` overrides.

Every config in the library is a frozen dataclass that validates itself in ``__post_init__``
(raising ``ConfigError`` naming the field and the allowed range). This module only turns
untyped data into those dataclasses, checking keys and types on the way:

    cfg = load_config(SFTConfig, "sft.toml", ["optimizer.lr=1e-5", "loop.total_steps=200"])

TOML needs ``tomllib`` (Python >= 3.11) or the ``tomli`` package on Python 3.10.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from rlhf_jax.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10: ``pip install tomli`` for TOML configs
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = ["ConfigError", "from_dict", "to_dict", "load_config", "merge_dicts", "read_config_file"]

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build the (nested) frozen dataclass ``cls`` from plain data.

    Dataclass-typed fields are built recursively from sub-dicts, lists become tuples for tuple
    fields, ints are accepted for float fields. ``where`` is the dotted path used in messages.

    Raises:
      ConfigError: unknown or missing key (naming the full dotted path and the valid keys), a value
        of the wrong type (naming key, expected type and value), or a failed ``__post_init__`` check.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table/dict for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key '{where}.{unknown[0]}'; valid keys of {where} ({cls.__name__}): "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(f.default) and isinstance(value, Mapping):
                # A partial table overrides the field's own default, not the class defaults
                # (e.g. ``--set optimizer.lr=1e-5`` keeps the stage's cosine schedule).
                value = merge_dicts(to_dict(f.default), value)
            kwargs[name] = _convert(value, hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{where}.{name}' ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} ({cls.__name__}): {e}") from e


def merge_dicts(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested tables."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen dataclass as JSON/TOML-ready plain data (nested dicts, tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (.json or .toml; None = all defaults), apply ``a.b.c=value`` overrides, build ``cls``.

    An override's value is parsed as JSON (``1e-5``, ``true``, ``null``, ``[1, 2]``, ``"x"``), falling back to
    the raw string (``schedule=cosine``); a str-typed field always takes the raw string.  Inside a
    ``dict[str, Any]`` field (a free-form table such as the pipeline's per-stage overrides) the rest
    of the key nests as tables (``sft.loop.total_steps=2``), checked when that table is used.

    Raises:
      ConfigError: unreadable or malformed file (naming the file, and the line for JSON/TOML), an
        override without ``=`` or with an unknown key (naming the override), or any ``from_dict`` error.
    """
    data: dict[str, Any] = {} if path is None else read_config_file(path)
    for override in overrides:
        _apply_override(cls, data, override)
    where = "config" if path is None else f"config ({path})"
    return from_dict(cls, data, where=where)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a .json or .toml config file (``ConfigError`` naming the file, and
    the line, when it is unreadable or malformed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    elif suffix == ".toml":
        if tomllib is None:
            raise ConfigError(f"{path}: reading TOML on Python 3.10 needs `pip install tomli`")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # message carries "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    else:
        raise ConfigError(f"{path}: unknown config file type {suffix!r}; use .json or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object/table, got {type(data).__name__}")
    return data


def _apply_override(cls: type, data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected the form a.b.c=value")
    parts = key.split(".")
    node_cls, node = cls, data
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node_cls)
        names = [f.name for f in dataclasses.fields(node_cls) if f.init]
        if part not in names:
            prefix = ".".join(parts[:i]) or "<top level>"
            raise ConfigError(
                f"override {override!r}: unknown key {'.'.join(parts[: i + 1])!r}; "
                f"valid keys of {prefix} ({node_cls.__name__}): {', '.join(sorted(names))}"
            )
        hint = hints[part]
        if i == len(parts) - 1:
            node[part] = _parse_value(raw, hint)
            return
        if typing.get_origin(hint) is dict:  # a free-form table (per-stage overrides): nest the rest
            node[part] = dict(node.get(part) or {})
            table = node[part]
            for sub in parts[i + 1 : -1]:
                table[sub] = dict(table.get(sub) or {})
                table = table[sub]
            table[parts[-1]] = _parse_value(raw, None)
            return
        sub_cls = _dataclass_in(hint)
        if sub_cls is None:
            raise ConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])!r} is a {_type_name(hint)}, "
                "not a config section"
            )
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node_cls, node = sub_cls, child


def _parse_value(raw: str, hint: Any) -> Any:
    if hint is str:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type in ``X`` or ``X | None``, else None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if _is_union(hint):
        found = [a for a in typing.get_args(hint) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``hint``, converting where the data format loses types."""

    def bad() -> ConfigError:
        return ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")

    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return from_dict(hint, value, where=where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise bad()
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items ({_type_name(hint)}), got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or hint in (dict, Mapping) or origin is typing.Mapping:
        if not isinstance(value, Mapping):
            raise bad()
        return dict(value)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise bad()
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
