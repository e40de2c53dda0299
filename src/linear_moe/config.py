"""Generic config plumbing: nested dataclasses <-> dicts <-> YAML, and dotted command-line overrides.

Knows nothing about specific configs. Any dataclass whose fields are scalars (int, float, str, bool),
lists, dicts, Literal choices, ``X | None`` and other dataclasses works::

    cfg = load_yaml("configs/tiny.yaml", RunConfig)
    cfg = apply_overrides(cfg, ["model.mixer=gated_deltanet", "train.lr=3e-4", "model.moe=null"])
    save_yaml(cfg, "run/config.yaml")

Unknown keys and type mismatches raise :class:`ConfigError` (a ValueError) with one line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "to_dict",
    "from_dict",
    "load_yaml",
    "read_yaml",
    "save_yaml",
    "apply_overrides",
    "merge_overrides",
    "to_yaml",
    "check_directory_path",
]


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming the key."""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields (handles ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); other types -> (tp, False). Unions of several non-None types stay as is."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], nullable
        return functools.reduce(operator.or_, args), nullable
    return tp, False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict of builtins; lists/tuples/dicts are converted element-wise."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the declared type ``tp``; ``key`` is the dotted path for error messages."""
    if tp is Any:
        return value
    inner, nullable = _unwrap_optional(tp)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"config key '{key}' cannot be null (expected {_type_name(inner)})")
    tp = inner
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[float, float]
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects a list of {len(args)} values, got {list(value)!r}")
            elems = args
        else:  # list[X], tuple[X, ...], bare list/tuple
            elems = [args[0] if args else Any] * len(value)
        out = [_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, elems, strict=True))]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config key '{key}' expects a path, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    where = f"under '{prefix}'" if prefix else "at the top level"
    full = f"{prefix}.{key}" if prefix else key
    return ConfigError(f"unknown config key '{full}'; valid keys {where}: {', '.join(sorted(_field_types(cls)))}")


def _from_dict(cls: type[T], d: dict, prefix: str) -> T:
    fts = _field_types(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in fts:
            raise _unknown_key(cls, str(k), prefix)
        kwargs[k] = _convert(v, fts[k], f"{prefix}.{k}" if prefix else k)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"cannot build {cls.__name__} at '{prefix or '<top>'}': {e}") from None


def from_dict(cls: type[T], d: dict) -> T:
    """Build dataclass ``cls`` from a (nested) dict; missing keys keep their defaults, unknown keys raise."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(d).__name__}")
    return _from_dict(cls, d, "")


def to_yaml(obj: Any) -> str:
    """Dataclass -> YAML text (keys in field order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass as YAML to ``path`` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(obj))


def read_yaml(path: str | Path) -> Any:
    """Parse YAML file `path`; a missing file or a syntax error is a one-line ConfigError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"invalid YAML in {path}: not UTF-8 text (byte {e.start})") from None


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Read YAML ``path`` into dataclass ``cls`` (an empty file gives the defaults)."""
    return from_dict(cls, read_yaml(path) or {})


def _parse_scalar(text: str) -> Any:
    """Parse an override value as a YAML scalar/list (``3e-4`` -> float, ``null`` -> None, ``[1,2]`` -> list)."""
    try:  # YAML 1.1 reads 3e-4 as the string "3e-4"; float fields accept such strings in _convert
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_path(obj: Any, parts: list[str], value: Any, done: list[str]) -> Any:
    """Return a copy of dataclass ``obj`` with the dotted path ``parts`` set to the raw ``value``."""
    prefix = ".".join(done)
    cls = type(obj)
    fts = _field_types(cls)
    head = parts[0]
    if head not in fts:
        raise _unknown_key(cls, head, prefix)
    key = ".".join(done + [head])
    if len(parts) == 1:
        return dataclasses.replace(obj, **{head: _convert(value, fts[head], key)})
    child = getattr(obj, head)
    if child is None:
        inner, _ = _unwrap_optional(fts[head])
        if _is_dataclass_type(inner):
            raise ConfigError(
                f"cannot set '{'.'.join(done + parts)}': '{key}' is null; set '{key}' to a mapping first "
                f"(e.g. '{key}={{}}' for defaults)"
            )
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"cannot set '{'.'.join(done + parts)}': '{key}' is not a nested config")
    return dataclasses.replace(obj, **{head: _set_path(child, parts[1:], value, done + [head])})


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); one-line ConfigError for a malformed override."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=200)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    return key.split("."), _parse_scalar(text)


def apply_overrides(obj: T, overrides: list[str]) -> T:
    """Apply ``key.sub=value`` overrides to dataclass ``obj``; returns a new object (``obj`` is not changed).

    Values are YAML scalars (``200``, ``3e-4``, ``true``, ``null``, ``[1, 2]``, ``{top_k: 2}``) converted to the
    field's declared type. A nested field that is null must be set to a mapping before its keys can be set.
    Each override builds (and validates) a new object; `merge_overrides` merges them all into a dict first.
    """
    for item in overrides:
        parts, value = _parse_override(item)
        obj = _set_path(obj, parts, value, [])
    return obj


def merge_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the nested mapping ``d`` with every ``key.sub=value`` override set, exactly as if the key were
    written in the YAML file (a null or missing section becomes a mapping). Nothing is validated here: build the
    dataclass from the result once (`from_dict`), so overrides never depend on their order."""
    out = copy.deepcopy(d)
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                key = ".".join(parts[: i + 1])
                raise ConfigError(f"cannot set '{'.'.join(parts)}': '{key}' is not a nested config")
            if child is None:
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


def check_directory_path(path: str | Path, key: str) -> None:
    """A config value `key` naming a directory to create or use: one-line ConfigError when `path`, or a folder
    above it, is an existing file (instead of the OS's errno text later)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is under {p}, which is a file"
                raise ConfigError(f"{key}={path} {what}; choose a directory path")
            return
