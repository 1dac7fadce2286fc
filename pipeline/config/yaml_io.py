"""YAML for configs: a safe loader that reads ``1e-4`` as a float and rejects duplicate keys."""

from __future__ import annotations

import os
import re

import yaml

from pipeline.config.schema import ConfigError


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
