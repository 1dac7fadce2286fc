"""What the frozen encoders share: the frozen-module base, dtype names, the load error, input checks."""

from __future__ import annotations

import os

import torch

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` -> the torch dtype; anything else is a ``ValueError``."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}") from None


class FrozenModule(torch.nn.Module):
    """A frozen encoder or decoder: stays in eval mode (no dropout) whatever a parent module asks;
    ``device`` is where its weights are."""

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class EncoderLoadError(OSError):
    """An encoder could not be loaded; the message names the path (or hub id) and the cause."""


def check_local_source(path: str, what: str, required: tuple[str, ...] = ()) -> None:
    """Fail early, naming ``path``, when a local-looking source is not a folder holding ``required``.

    A path that does not exist and does not look local (``org/name``) is left to the
    library, which treats it as a hub id.
    """
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if not looks_local:
        return
    if not os.path.isdir(path):
        raise EncoderLoadError(f"{what}: folder not found: '{path}'")
    missing = [name for name in required if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise EncoderLoadError(f"{what}: '{path}' is missing {', '.join(missing)}")


def check_texts(texts: list[str]) -> None:
    """A non-empty list of strings; a bare string is refused (it is not a batch)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a non-empty list of strings")
