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

from pipeline.config.cli import exit_on_config_error, load_config, parse_cli, save_config
from pipeline.config.overrides import apply_overrides
from pipeline.config.schema import ConfigError, from_dict, to_dict

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
