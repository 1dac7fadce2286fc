"""Exponential moving average of model weights, kept as an fp32 copy of the model.

``ema ← decay·ema + (1 − decay)·θ`` after each optimizer step (Polyak averaging, as in DiT and
every diffusion trainer since). The average *is* a module — a copy of the network taken before
training starts, in fp32, eval mode, frozen — so it is itself the network that samples, is
exported, or serves as distillation's target: nothing is rebuilt per use and nothing is copied
per step.

The update reads whole parameters, given as groups of ``(name, parameter)`` (any iterable of
them). Under ZeRO-2 every rank holds the full parameters, so each rank updates an identical copy;
under ZeRO-3 the caller gathers them group by group first
(``pipeline.training.distributed.whole_parameters``). The averaged values are those of the weights the
model computes with (16-bit under DeepSpeed bf16/fp16), accumulated in fp32. Saved as safetensors
keyed by parameter name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """An fp32, frozen, eval-mode copy of a model that follows its weights."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, trainable_only: bool = False) -> None:
        """``model`` is copied as it is now (whole: take the copy before ZeRO-3 partitions it).
        ``trainable_only``: average (and save) only the parameters that require a gradient (LoRA's
        adapters); the frozen ones stay in the copy as they are, in their own dtype."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay = decay
        averaged = {name for name, p in model.named_parameters() if p.requires_grad or not trainable_only}
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if not trainable_only:
            self.module.float()
        self._params = {name: p for name, p in self.module.named_parameters() if name in averaged}
        for p in self._params.values():
            p.data = p.data.float()  # the averages are fp32 (already, unless trainable_only)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float | None = None) -> None:
        """One averaging step over the given parameters; ``decay=0`` copies them (before the EMA starts)."""
        decay = self.decay if decay is None else decay
        for name, p in named_parameters:
            average = self._params.get(name)
            if average is not None:
                average.lerp_(p.detach().to(average.device, torch.float32), 1.0 - decay)

    def save(self, path: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self._params.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if set(loaded) != set(self._params):
            missing, extra = set(self._params) - set(loaded), set(loaded) - set(self._params)
            raise ValueError(f"EMA checkpoint does not match the model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
        with torch.no_grad():
            for name, value in loaded.items():
                self._params[name].copy_(value)
