"""Data-consistent inverse solvers over a trained teacher, without retraining: for a known linear
degradation ``y = A(x)`` (``pipeline.data.degradations``: grayscale, down2/down4, blur, mask,
outpaint) the sample keeps ``A(decode(x̂)) ≈ y`` all the way down, and the final image meets it.

References: Martin et al. 2025, "PnP-Flow: Plug-and-Play Image Restoration with Flow Matching"
(at each time: the denoiser's x̂0, a data step on it, then back onto the straight path with
fresh noise); Wang et al. 2023, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space
Model" (DDNM: ``x̂0 ← x̂0 + A⁺(y − A x̂0)``, the model's own noise kept); Song et al. 2023,
"Pseudoinverse-Guided Diffusion Models for Inverse Problems" (ΠGDM: the pseudo-inverse ``A⁺``
carries the measurement into the sample); Chung et al. 2023, "Diffusion Posterior Sampling for
General Noisy Inverse Problems" (DPS: a gradient step on ``‖y − A(D(x̂0))‖`` — not used here,
the projection is exact for these operators); Meng et al. 2022, "SDEdit" (the start part-way
from the source, ``strength < 1``).

One step from ``t`` to ``t_next`` (DESIGN.md §3: ``x_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``):

1. ``v̂`` the guided velocity (``pipeline.diffusion.samplers.guided``), ``x̂0 = x_t − t·v̂``;
2. in pixels: ``x̂0' = E(clamp(P_y(D(x̂0))))`` with ``P_y`` the L2 projection onto
   ``{x : A x = y}`` (``Degradation.project``), clamped to [-1, 1] before encoding;
3. back to ``t_next`` by one of :data:`UPDATES`:

   - ``"velocity"`` (default): the Euler step with the corrected velocity ``v' = (x_t − x̂0')/t``,
     i.e. the noise ``x_t`` implies given ``x̂0'``; deterministic;
   - ``"predicted"`` (DDNM): ``(1 − t_next)·x̂0' + t_next·ε̂`` with the model's noise
     ``ε̂ = x_t + (1 − t)·v̂``; deterministic. On the demo teacher it keeps the colour the noise
     held and fails colourisation (colour right 0.28 vs 1.0 for ``velocity``, 32 cases);
   - ``"fresh"`` (PnP-Flow): ``(1 − t_next)·x̂0' + t_next·ε_k``, fresh noise each step from the
     image's own generator (``pipeline.diffusion.noise``).

   At ``t_next = 0`` all three give ``x̂0'``.

The output is the last decode ``D(x̂0')`` (``raw``: what the prior and the VAE keep of the
data) made consistent in pixel space: ``polish`` alternating projections onto ``A x = y`` and
the box [-1, 1] (POCS; both sets hold the true image), so the reported consistency error of the
result is that of 8-bit rounding for exact operators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.data.degradations import Degradation
from pipeline.data.images import tensor_to_images
from pipeline.diffusion.editing import check_strength
from pipeline.diffusion.flow import interpolate
from pipeline.diffusion.noise import randn_rows
from pipeline.diffusion.samplers import guided, reusing_text, sampler_generators, time_grid
from pipeline.inference.pipeline import TextToImage

UPDATES = ("velocity", "predicted", "fresh")


@dataclass(kw_only=True)
class SolverConfig:
    """``steps`` of the full grid (those below ``strength`` run), classifier-free ``guidance``,
    the grid's ``shift`` (a number or "auto"), the ``update`` back to the next time
    (:data:`UPDATES`), ``strength`` (1: from pure noise; below 1: from the source image noised to
    ``shift_time(strength)``, as SDEdit starts) and ``polish`` (alternating projections onto the
    data and [-1, 1] on the final pixels)."""

    steps: int = 50
    guidance: float = 4.0
    shift: float | str = 1.0
    update: str = "velocity"
    strength: float = 1.0
    polish: int = 200

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"solver steps must be >= 1 (got {self.steps})")
        if self.update not in UPDATES:
            raise ValueError(f"unknown solver update '{self.update}' ({', '.join(UPDATES)})")
        check_strength(self.strength)
        if self.polish < 0:
            raise ValueError(f"solver polish must be >= 0 (got {self.polish})")


@dataclass
class Solved:
    """The solver's results: ``images`` (PIL, consistent), ``pixels`` (B, 3, H, W) the same as
    float, ``raw`` (B, 3, H, W) the last decode before the pixel-space projection."""

    images: list[Image.Image]
    pixels: torch.Tensor
    raw: torch.Tensor


def consistent_pixels(deg: Degradation, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                      iterations: int = 200) -> torch.Tensor:
    """``x`` (B, 3, H, W) moved onto ``A x = y``, then ``iterations`` rounds of projecting onto
    the data and clamping to [-1, 1] (POCS), ending in the box."""
    x = deg.project(x, y, mask)
    for _ in range(iterations):
        x = deg.project(x.clamp(-1, 1), y, mask)
    return x.clamp(-1, 1)


def _next(update: str, x: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
          generators) -> torch.Tensor:
    """``x`` at ``t_next`` given the corrected ``x0`` (:data:`UPDATES`)."""
    if t_next <= 0:
        return x0
    if update == "predicted":
        noise = x + (1 - t) * v  # ε̂ = x_t + (1 − t)·v̂
    elif update == "velocity":
        noise = (x - (1 - t) * x0) / t  # the ε with x_t = (1 − t)·x̂0' + t·ε
    else:
        noise = randn_rows(x.shape, generators, x.dtype, x.device)
    return (1 - t_next) * x0 + t_next * noise


@torch.no_grad()
def solve(pipe: TextToImage, deg: Degradation, y: torch.Tensor, prompts: list[str], seeds: list[int],
          cfg: SolverConfig | None = None, mask: torch.Tensor | None = None, start: torch.Tensor | None = None,
          progress: bool = True) -> Solved:
    """Images ``x`` with ``A x = y`` (``y`` as ``deg.measure`` gives it, (B, …)) under ``prompts``;
    image k's noise from ``seeds[k]`` alone. ``start`` (B, 3, H, W) in [-1, 1], needed when
    ``cfg.strength < 1``: the image to start from (e.g. ``deg.source``)."""
    cfg = cfg or SolverConfig()
    if not deg.linear:
        raise ValueError(f"the projection solver needs a linear degradation ({deg.spec!r} is not)")
    if not len(prompts) == len(seeds) == y.shape[0]:
        raise ValueError(f"{y.shape[0]} measurements, {len(prompts)} prompts, {len(seeds)} seeds")
    if cfg.strength < 1 and start is None:
        raise ValueError("a solver strength below 1 needs the start image")
    device = pipe.vae.device
    y = y.to(device)
    mask = None if mask is None else mask.to(device)
    shape = pipe.latent_shape_for(None if start is None else (start.shape[-1], start.shape[-2]))
    noise = pipe.noise_per_image(seeds, shape)  # (B, C, h, w)
    grid = time_grid(cfg.steps, pipe.resolve_shift(cfg.shift, noise), device, cfg.strength)
    x = noise if start is None else interpolate(pipe.vae.encode(start.to(device)), noise, grid[0].expand(len(seeds)))
    velocity, cond = guided(pipe.transformer, pipe.sampler, cfg.guidance), pipe.text.encode(prompts)
    generators = sampler_generators(seeds, shape)
    with reusing_text(pipe.transformer):  # the text context once, not at every step
        for i in tqdm(range(len(grid) - 1), desc="solver", unit="step", leave=False, disable=not progress):
            t, t_next = grid[i], grid[i + 1]
            v = velocity(x, t.expand(x.shape[0]), cond)
            x0 = x - t * v  # (B, C, h, w)
            projected = deg.project(pipe.vae.decode(x0), y, mask).clamp(-1, 1)  # (B, 3, H, W)
            x = _next(cfg.update, x, v, pipe.vae.encode(projected), t, t_next, generators)
    raw = pipe.vae.decode(x)  # (B, 3, H, W)
    pixels = consistent_pixels(deg, raw, y, mask, cfg.polish)
    return Solved(tensor_to_images(pixels), pixels, raw)
