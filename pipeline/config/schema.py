"""Dataclass configs <-> plain mappings, every value checked against its annotation; one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin


T = TypeVar("T")
_NONE = type(None)
_MAX_REPR = 60  # characters of a bad value shown in an error
_NULLS = ("null", "~")  # override text that means None for an optional str / Path field


class ConfigError(ValueError):
    """One-line, user-facing configuration error (names the offending key)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# ----------------------------------------------------------------------------- messages


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _name(path: str) -> str:
    return f"'{path}'" if path else "config"


def _describe(value: Any) -> str:
    """``str 'abc'``, ``float 2.0``, ``null`` -- a bad value as shown in an error."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    """Readable annotation: ``int``, ``list[int]``, ``Path | None``, ``one of 'a', 'b'``."""
    if tp is Any:
        return "any"
    if tp is _NONE:
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(arg) for arg in get_args(tp))
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is not None and args:
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _wrong_type(path: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{_name(path)} expects {_type_name(tp)}, got {_describe(value)}{hint}")


def _unknown_key(path: str, key: Any, schema: Mapping[str, Any]) -> ConfigError:
    valid = ", ".join(sorted(schema)) or "none"
    return ConfigError(f"unknown key '{_join(path, str(key))}' (valid keys: {valid})")


# ----------------------------------------------------------------------------- schema


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_path_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, PurePath)


def _section_type(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (``X`` or ``X | None``), else None."""
    if _is_union(tp):
        members = [arg for arg in get_args(tp) if arg is not _NONE]
        return _section_type(members[0]) if len(members) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``{name: (field, resolved type)}`` for the fields of ``cls`` that ``__init__`` takes."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as err:  # NameError etc. from an unresolvable string annotation
        raise TypeError(f"cannot resolve the type hints of {cls.__name__}: {err}") from err
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def _field_default(field: dataclasses.Field) -> Any:
    """The value the dataclass would use for a field left out, or None if it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# ----------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping (e.g. parsed YAML), checking every value.

    Nested dataclass fields are built recursively; ``path`` is the dotted key of ``data``
    used in error messages. Raises ``ConfigError`` (one line naming the key) for unknown or
    missing keys, wrong types, and ``ValueError`` / ``TypeError`` from a ``__post_init__``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    return _build(cls, data, path, None)


def _build(cls: type[T], data: Any, path: str, base: Any) -> T:
    """``from_dict`` where keys absent from ``data`` come from ``base`` (an instance) if given."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_name(path)} expects a mapping (a {cls.__name__} section), "
                          f"got {_describe(data)}")
    schema = _schema(cls)
    for key in data:
        if key not in schema:
            raise _unknown_key(path, key, schema)
    kwargs: dict[str, Any] = {}
    for name, (field, tp) in schema.items():
        key_path = _join(path, name)
        if name in data:
            sub_base = None
            if _section_type(tp) is not None:
                sub_base = getattr(base, name) if base is not None else _field_default(field)
            kwargs[name] = _convert(data[name], tp, key_path, sub_base)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key_path}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{_name(path) if path else cls.__name__}: {err}") from err


def _convert(value: Any, tp: Any, path: str, base: Any = None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (str -> Path, list -> tuple...)."""
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        return _convert_union(value, tp, path, base)
    if get_origin(tp) is Literal:
        for allowed in get_args(tp):
            if type(allowed) is type(value) and allowed == value:
                return allowed
        raise _wrong_type(path, tp, value)
    if _section_type(tp) is not None:
        if isinstance(value, tp):
            return value
        return _build(tp, {} if value is None else value, path,
                      base if isinstance(base, tp) else None)
    if (get_origin(tp) or tp) in (list, tuple, dict):
        return _convert_container(value, tp, path)
    return _convert_scalar(value, tp, path)


def _convert_union(value: Any, tp: Any, path: str, base: Any) -> Any:
    """``X | None`` and ``X | Y``: the first member that accepts ``value``."""
    members = [arg for arg in get_args(tp) if arg is not _NONE]
    if value is None and len(members) < len(get_args(tp)):
        return None
    if len(members) == 1 and (get_origin(members[0]) or members[0]) in (list, tuple, dict):
        return _convert(value, members[0], path, base)  # keep the error naming the bad item
    if len(members) == 1 and _section_type(members[0]) is not None:
        return _convert(value, members[0], path, base)  # keep the error naming the bad key
    for member in members:
        try:
            return _convert(value, member, path, base)
        except ConfigError:
            continue
    raise _wrong_type(path, tp, value)


def _convert_container(value: Any, tp: Any, path: str) -> Any:
    """``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[K, V]`` (bare forms hold Any)."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(path, tp, value)
        key_tp, val_tp = args or (Any, Any)
        return {_convert(k, key_tp, _join(path, str(k))): _convert(v, val_tp, _join(path, str(k)))
                for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(path, tp, value)
    if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if len(value) != len(args):
        raise ConfigError(f"{_name(path)} expects {_type_name(tp)} ({len(args)} items), "
                          f"got {len(value)} items: {_describe(value)}")
    return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    """bool, int, float, str, Path, or any other class (checked with isinstance)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(path, tp, value, " (write true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = " (floats are not converted to int)" if isinstance(value, float) else ""
        raise _wrong_type(path, tp, value, hint)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise _wrong_type(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = " (quote it in YAML)" if isinstance(value, (bool, int, float)) else ""
        raise _wrong_type(path, tp, value, hint)
    if isinstance(tp, type) and issubclass(tp, str):  # a checked text type (config.source.URL): its constructor checks
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return tp(value)
        raise _wrong_type(path, tp, value)
    if _is_path_type(tp):
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            return tp(value)
        raise _wrong_type(path, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong_type(path, tp, value)
    raise TypeError(f"unsupported config annotation {tp!r} for {_name(path)}")


# ----------------------------------------------------------------------------- dataclass -> dict


def to_dict(cfg: Any) -> dict:
    """A config instance as a plain YAML-safe dict (Paths -> str, tuples -> lists), recursively."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (PurePath, str)):
        return str(value)  # Paths and str subclasses (config.source.URL) as plain str
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
