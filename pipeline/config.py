"""Typed, self-validating dataclass configs: YAML file + ``section.key=value`` overrides.

DESIGN.md §5. Every stage defines its own nested ``@dataclass(kw_only=True)`` configs whose
``__post_init__`` raises ``ValueError`` for bad values; this module is the generic machinery::

    @dataclass(kw_only=True)
    class OptimConfig:
        lr: float = 1e-4
        def __post_init__(self) -> None:
            if self.lr <= 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")

    @dataclass(kw_only=True)
    class TrainConfig:
        optim: OptimConfig = field(default_factory=OptimConfig)

    cfg = parse_cli(TrainConfig, None, prog="pipeline.train")
    # python -m pipeline.train --config configs/x.yaml optim.lr=3e-4

Rules:

- Every mistake (unknown key, wrong type, bad value, bad YAML) is one ``ConfigError`` line
  that names the full dotted key, e.g. ``unknown key 'optim.lrr' (valid keys: betas, lr)``.
- Types are checked strictly: ``int`` rejects ``bool`` and ``2.0``, ``bool`` rejects ``1`` and
  ``"yes"``, ``str`` rejects ``123``. ``float`` accepts ints and numeric strings (``"1e-4"``).
- YAML is read with a safe loader that also reads ``1e-4`` as a float (plain PyYAML reads a
  string) and rejects duplicate keys.
- A section given in YAML is applied on top of the field's default: with
  ``model: Model = field(default_factory=lambda: Model(width=128))`` the YAML
  ``model: {name: x}`` keeps ``width=128``. An empty section (``optim:``) means all defaults.
- Overrides for ``str`` / ``Path`` / string-``Literal`` fields keep the raw text
  (``name=123`` is ``"123"``); if the field is optional, ``null`` or ``~`` give ``None``.
  Other values are parsed as YAML (``[1, 2]``, ``true``, ``null``, ``3e-4``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "exit_on_config_error",
    "from_dict",
    "load_config",
    "parse_cli",
    "save_config",
    "to_dict",
]

T = TypeVar("T")
_NONE = type(None)
_MAX_REPR = 60  # characters of a bad value shown in an error
_NULLS = ("null", "~")  # override text that means None for an optional str / Path field


class ConfigError(ValueError):
    """One-line, user-facing configuration error (names the offending key)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe loader that reads ``1e-4`` as a float (YAML 1.2) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in getattr(node, "value", ()):
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_error_text(err: yaml.YAMLError) -> str:
    """``line 3, column 7: <problem>`` where PyYAML gives a position, else its message."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file; an empty file is ``{}``."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except OSError as err:
        raise ConfigError(f"cannot read config file '{name}': {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read config file '{name}': not UTF-8 ({err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in '{name}': {_yaml_error_text(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{name}' must hold a mapping (key: value) at top level, "
                          f"got {type(data).__name__}")
    return data


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
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- overrides


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (any depth) to a deep copy of ``data``.

    Each dotted key is checked against the dataclass schema of ``cls`` first. Values of
    ``str`` / ``Path`` / string-``Literal`` fields stay raw text (``null`` / ``~`` give None
    if the field is optional); other values are parsed as YAML. Whole sections cannot be set.
    """
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        tp = _override_type(cls, key)
        _set_path(result, key, _parse_override(key, raw, tp))
    return result


def _override_type(cls: type, key: str) -> Any:
    """The annotation of the field that dotted ``key`` names in ``cls``'s schema."""
    tp: Any = cls
    path = ""
    for part in key.split("."):
        section = _section_type(tp)
        if section is None:
            raise ConfigError(
                f"cannot set '{key}': '{path}' is not a section (it holds {_type_name(tp)})")
        schema = _schema(section)
        if part not in schema:
            raise _unknown_key(path, part, schema)
        tp = schema[part][1]
        path = _join(path, part)
    return tp


def _keeps_raw_text(tp: Any) -> bool:
    """True for str, Path, string Literals, and optional / union forms of only those."""
    members = [arg for arg in get_args(tp) if arg is not _NONE] if _is_union(tp) else [tp]
    return all(
        m is str or _is_path_type(m)
        or (get_origin(m) is Literal and all(isinstance(a, str) for a in get_args(m)))
        for m in members
    )


def _parse_override(key: str, raw: str, tp: Any) -> Any:
    """The value of override ``key=raw`` for a field of type ``tp``."""
    optional = _is_union(tp) and _NONE in get_args(tp)
    section = _section_type(tp)
    if section is None and _keeps_raw_text(tp):
        return None if optional and raw.strip() in _NULLS else raw
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override '{key}': cannot parse {raw!r} ({_yaml_error_text(err)})") from None
    if section is not None and not (optional and value is None):
        example = next(iter(sorted(_schema(section))), "key")
        raise ConfigError(
            f"'{key}' is a section; override its keys instead, e.g. {key}.{example}=...")
    return value


def _set_path(data: dict, key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, Mapping) and not isinstance(child, dict):
            child = node[part] = dict(child)
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"cannot set '{key}': '{prefix}' expects a mapping, got {_describe(child)}")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- files and CLI


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """YAML file (None: all defaults) + ``section.key=value`` overrides -> validated ``cls``."""
    data = {} if path is None else _read_yaml(path)
    return from_dict(cls, apply_overrides(cls, data, overrides))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``to_dict(cfg)`` as YAML, atomically (temporary file in the same folder + rename)."""
    target = Path(path)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0o600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """Turn a ``ConfigError`` into one stderr line ``{prog}: config error: ...`` and exit 2.

    Other exceptions pass through unchanged.
    """
    try:
        yield
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def parse_cli(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """``[--config PATH] [section.key=value ...]`` -> validated ``cls``; config errors exit 2.

    ``argv`` None reads ``sys.argv[1:]``. Options and overrides may be interleaved.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides use dotted config keys, e.g. optim.lr=3e-4 model.attn.qk_norm=true.")
    parser.add_argument("--config", metavar="PATH",
                        help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one config value (applied after the file, in order)")
    args = parser.parse_intermixed_args(argv)
    with exit_on_config_error(prog):
        return load_config(cls, args.config, args.overrides)
