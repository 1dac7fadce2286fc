"""``section.key=value`` overrides, checked against the schema before they are applied."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

import yaml

from pipeline.config.schema import (
    ConfigError,
    _describe,
    _is_path_type,
    _is_union,
    _join,
    _NONE,
    _NULLS,
    _schema,
    _section_type,
    _type_name,
    _unknown_key,
)
from pipeline.config.yaml_io import _Loader, _yaml_error_text


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
        (isinstance(m, type) and issubclass(m, str)) or _is_path_type(m)
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
