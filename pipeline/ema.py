"""Exponential moving average of model weights, kept in fp32 whatever the training precision.

``ema ← decay·ema + (1 − decay)·θ`` after each optimizer step (Polyak averaging, as in DiT
and every diffusion trainer since). Under ZeRO-2 every rank holds the full parameters, so each
rank updates an identical copy; under ZeRO-3 the caller gathers the parameters first
(``pipeline.train`` does). Saved as safetensors; the exported model is built from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """fp32 shadow copies of named parameters."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters if p.requires_grad}

    def to(self, device: torch.device | str) -> EMA:
        """Keep the shadow weights where the parameters live (after ``accelerator.prepare``)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float | None = None) -> None:
        """One averaging step; ``decay=0`` copies the weights (used before the EMA starts)."""
        decay = self.decay if decay is None else decay
        for name, p in named_parameters:
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (cast to its dtypes)."""
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow):
            missing, extra = set(self.shadow) - set(loaded), set(loaded) - set(self.shadow)
            raise ValueError(f"EMA checkpoint does not match the model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {k: v.float().to(device) for k, v in loaded.items()}
