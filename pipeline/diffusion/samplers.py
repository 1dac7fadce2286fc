"""Samplers over any ``model(x, t, cond) -> v`` (DESIGN.md §3 conventions, ``pipeline.diffusion.flow``).

- ``euler``: the probability-flow ODE from ``t = 1`` (noise) to ``t = 0`` (data),
  ``x ← x + (t_next − t)·v̂``, on a grid warped by the resolution shift.
- ``consistency``: the multistep consistency sampler (Song et al. 2023, "Consistency Models",
  Algorithm 1) for a student whose ``f(x, t) = x − t·v(x, t)``: ``x0 = f(ε, 1)``, then for each
  ``t_k``: ``x = (1 − t_k)·x0 + t_k·ε_k``, ``x0 = f(x, t_k)`` — exactly ``steps`` model calls.
- Guidance: ``pipeline.diffusion.guidance``.

:func:`sample` picks the sampler a model folder names ("euler" for a teacher, "consistency" for a
distilled student), so the inference pipeline and the training-time grids sample alike.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.diffusion.flow import Model, shift_time
from pipeline.diffusion.guidance import guided_velocity


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0 (uniform, then shifted)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def consistency_fn(model: Model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """``f(x, t) = x − t·v(x, t)``: the x0-prediction; ``f(x, 0) = x`` exactly."""
    return x - t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) * model(x, t, cond)


@torch.no_grad()
def consistency(
    model: Model, noise: torch.Tensor, cond: dict, steps: int = 4, shift: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multistep consistency sampling from ``t = 1``; ``steps`` model evaluations."""
    grid = time_grid(steps, shift, noise.device)  # 1 = t_0 > t_1 > … > t_steps = 0
    ones = torch.ones(noise.shape[0], device=noise.device)
    x0 = consistency_fn(model, noise, ones, cond)
    for t_k in grid[1:-1]:
        fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
        x = (1 - t_k) * x0 + t_k * fresh
        x0 = consistency_fn(model, x, t_k * ones, cond)
    return x0


@torch.no_grad()
def euler(
    model: Model,
    noise: torch.Tensor,
    cond: dict,
    steps: int = 50,
    guidance: float = 1.0,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``x = noise`` at ``t = 1`` to ``t = 0``; returns the sample ``x0``."""
    grid = time_grid(steps, shift, noise.device)
    x = noise
    for i in tqdm(range(steps), desc="euler", disable=not progress, leave=False):
        t = grid[i].expand(x.shape[0])
        x = x + (grid[i + 1] - grid[i]) * guided_velocity(model, x, t, cond, guidance)
    return x


SAMPLERS = ("euler", "consistency")


@torch.no_grad()
def sample(model: Model, sampler: str, cond: dict, noise: torch.Tensor, steps: int, guidance: float, shift: float = 1.0,
           seed: int = 0) -> torch.Tensor:
    """Latents from ``noise`` with the named sampler: Euler with classifier-free guidance (a
    teacher), or consistency steps with the guidance scale given to the model as an input (a
    student: one evaluation per step; its fresh noise comes from ``seed + 1``)."""
    if sampler == "euler":
        return euler(model, noise, cond, steps, guidance, shift)
    if sampler != "consistency":
        raise ValueError(f"unknown sampler '{sampler}' ({', '.join(SAMPLERS)})")
    cond = {**cond, "guidance": torch.full((noise.shape[0],), float(guidance), device=noise.device)}
    return consistency(model, noise, cond, steps, shift, torch.Generator().manual_seed(seed + 1))
