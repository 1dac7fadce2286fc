"""Config files and the command line: YAML file + overrides -> a validated config; one error line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.overrides import apply_overrides
from pipeline.config.schema import ConfigError, T, from_dict, to_dict
from pipeline.config.yaml_io import _read_yaml


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """YAML file (None: all defaults) + ``section.key=value`` overrides -> validated ``cls``."""
    data = {} if path is None else _read_yaml(path)
    return from_dict(cls, apply_overrides(cls, data, overrides))


def shift_arg(text: str) -> float | str:
    """An argparse type for ``--shift``: a positive number, or ``auto`` (SD3's resolution shift)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive number or auto (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def add_size_args(p: argparse.ArgumentParser) -> None:
    """``--width/--height`` in pixels (default: the model's resolution; one alone keeps the other)."""
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's resolution)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's resolution)")


def image_size(args: argparse.Namespace, resolution: int) -> tuple[int, int] | None:
    """(width, height) from ``--width/--height``; None when neither is given."""
    if args.width is None and args.height is None:
        return None
    return args.width or resolution, args.height or resolution


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
