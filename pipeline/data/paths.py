"""Paths recorded in written folders (a model folder's ``model_index.json``, a latent ``dataset.json``).

Local paths are stored relative to the folder that records them and resolved against it on
reading, so a run folder works from any working directory and can be moved or copied whole.
Hub ids and pretrained tags (anything that is not an existing local path) are kept as given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PATH_KEYS = ("path", "tokenizer", "checkpoint", "teacher", "input")  # entries that may name local files or folders


def map_paths(entry: dict, convert: Callable[[str], str]) -> dict:
    """A copy of ``entry`` with ``convert`` applied to every string under a ``PATH_KEYS`` key."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            value = map_paths(value, convert)
        elif key in PATH_KEYS and isinstance(value, str):
            value = convert(value)
        out[key] = value
    return out


def relative_to(folder: Path) -> Callable[[str], str]:
    """Existing local paths -> relative to ``folder``, always starting with ``./`` or ``../`` (so a
    reader tells them from hub ids such as ``org/name``); anything else unchanged."""
    def convert(p: str) -> str:
        if not os.path.exists(p):
            return p
        relative = os.path.relpath(Path(p).resolve(), Path(folder).resolve())
        return relative if relative.startswith("..") else f"./{relative}"

    return convert


def resolved_from(folder: Path) -> Callable[[str], str]:
    """Relative paths that exist under ``folder`` -> ``folder/path``; others unchanged (hub ids,
    absolute paths, and folders written before paths were stored relative)."""
    return lambda p: str(Path(folder) / p) if not os.path.isabs(p) and (Path(folder) / p).exists() else p
