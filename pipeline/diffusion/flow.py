"""Rectified flow: the time convention, timestep samplers and the loss, in one place.

References: Liu et al. 2022, "Flow Straight and Fast" (rectified flow); Lipman et al. 2022,
"Flow Matching for Generative Modeling"; Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3: logit-normal and mode sampling §3.1,
resolution-dependent shift §5.3.2).

Convention (DESIGN.md §3): ``t ∈ [0, 1]``, ``t = 0`` is data and ``t = 1`` is noise;
``x_t = (1 − t)·x0 + t·ε``; the model predicts the velocity ``v = ε − x0``; sampling walks
from ``t = 1`` to ``t = 0`` with ``x ← x + (t_next − t)·v̂``. Nothing here calls ``.item()``:
the loss stays on the device, so a training step never waits for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Model = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]  # model(x_t, t, cond) -> v


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, …) to broadcast against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε``: data at ``t = 0``, noise at ``t = 1``."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target the model learns: ``v = dx_t/dt = ε − x0``."""
    return noise - x0


SHIFT_BASE_TOKENS = 256  # SD3's base: 256² px, a 32×32 latent in 2×2 patches


def resolution_shift(tokens: int, base_tokens: int = SHIFT_BASE_TOKENS) -> float:
    """SD3 §5.3.2: a resolution with ``m`` image tokens keeps the base's signal-to-noise at
    ``t_m = α·t_n / (1 + (α − 1)·t_n)`` with ``α = sqrt(m / n)``, ``n`` the base's tokens."""
    return math.sqrt(tokens / base_tokens)


def resolve_shift(shift: float | str, tokens: int, base_tokens: int = SHIFT_BASE_TOKENS) -> float:
    """A configured shift: a number as given, ``"auto"`` from the image's token count."""
    return resolution_shift(tokens, base_tokens) if shift == "auto" else float(shift)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift ``t' = a·t / (1 + (a − 1)·t)``: ``a > 1`` spends more time near noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass(kw_only=True)
class TimestepConfig:
    """How training draws ``t``: ``uniform``, ``logit_normal(mean, std)`` or ``mode(mode_scale)``,
    each followed by the resolution shift: a number, or ``"auto"`` (SD3's ``sqrt(tokens /
    shift_base_tokens)`` from each batch's image tokens, so every bucket gets its own)."""

    kind: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    mode_scale: float = 1.29
    shift: float | Literal["auto"] = 1.0
    shift_base_tokens: int = SHIFT_BASE_TOKENS

    def __post_init__(self) -> None:
        if self.std <= 0 or (self.shift != "auto" and self.shift <= 0):
            raise ValueError(f"std and shift must be > 0 (got std={self.std}, shift={self.shift})")
        if self.shift_base_tokens < 1:
            raise ValueError(f"shift_base_tokens must be >= 1 (got {self.shift_base_tokens})")


def sample_timesteps(
    n: int, cfg: TimestepConfig, generator: torch.Generator | None = None, device=None, tokens: int | None = None
) -> torch.Tensor:
    """``n`` training times in (0, 1), float32 (SD3 §3.1); ``tokens`` (image tokens of the batch)
    is needed for ``shift: auto``."""
    if cfg.kind == "logit_normal":
        t = torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator, device=device))
    else:
        u = torch.rand(n, generator=generator, device=device)
        if cfg.kind == "mode":  # f_mode(u) = 1 − u − s·(cos²(πu/2) − 1 + u)
            u = 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        t = u
    if cfg.shift == "auto" and tokens is None:
        raise ValueError("shift: auto needs the batch's image token count")
    return shift_time(t.clamp(0.0, 1.0), resolve_shift(cfg.shift, tokens or 0, cfg.shift_base_tokens))


def flow_loss(model: Model, x0: torch.Tensor, cond: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared velocity error (B,); average it for the step's loss."""
    x_t = interpolate(x0, noise, t)
    error = (model(x_t, t, cond).float() - velocity(x0, noise).float()) ** 2
    return error.flatten(1).mean(1)


def loss_by_t(t: torch.Tensor, per_sample: torch.Tensor, buckets: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of losses and counts in ``buckets`` equal bins of ``t`` — accumulate, divide when logging."""
    index = (t.detach() * buckets).long().clamp(0, buckets - 1)
    sums = torch.zeros(buckets, device=t.device).index_add_(0, index, per_sample.detach().float())
    counts = torch.zeros(buckets, device=t.device).index_add_(0, index, torch.ones_like(per_sample, dtype=torch.float32))
    return sums, counts
