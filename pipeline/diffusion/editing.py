"""Editing with a trained flow model, without retraining: the known part of a latent and how the
samplers keep it.

References: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations" (start part-way: noise the input to the start time and integrate from
there); Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models"
(after every step the known region is replaced by the original noised to the current time;
optional resampling jumps); Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing
Using Pre-Trained Flow Models" (the ODE on the difference of the target and source velocities).

Conventions (DESIGN.md §3): ``x_t = (1 − t)·x0 + t·ε``. A mask is ``1`` where the model redraws
and ``0`` where the image is kept (diffusers' convention: white = repaint); soft values blend.
``Edit`` is what :func:`pipeline.diffusion.samplers.euler` and ``consistency`` take to start
part-way from the noised image and keep its unmasked part; :func:`flow_edit` is the text-guided
edit.

Strength, as diffusers' SD3 image-to-image: ``strength = s`` runs the last ``s`` share of the
sampler's steps, so the start time is the *shifted* grid's, ``shift_time(s)`` (at shift 3,
``s = 0.5`` starts at ``t = 0.75``); at shift 1 it is ``s`` itself
(:func:`pipeline.diffusion.samplers.time_grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.diffusion.flow import interpolate
from pipeline.diffusion.noise import Generators, randn_rows

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v(x_t, t), guided, its condition bound


def check_strength(strength: float) -> float:
    """``strength`` when it is a start time in (0, 1]; ``ValueError`` otherwise."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (got {strength})")
    return float(strength)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] on the latent grid (B, 1, h, w): a latent cell is
    redrawn as much as its most-masked pixel (adaptive max pooling), so nothing the user masked
    is held back by a half-kept cell; soft edges stay soft."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    return F.adaptive_max_pool2d(mask.float(), size).clamp(0.0, 1.0)


@dataclass
class Edit:
    """An image to start from and the part of it to keep.

    ``latents`` (B, C, h, w): the image's normalised latents; ``strength`` ∈ (0, 1]: the share of
    the sampler's steps to run, which start at ``shift_time(strength)`` (diffusers' SD3
    image-to-image; ``pipeline.diffusion.samplers.time_grid``; 1: from pure noise, the image is
    only the known region); ``mask``
    (B, 1, h, w) or None: 1 = redraw, 0 = keep (None redraws everything); ``resample``: RePaint's
    extra jumps per step (back up one step by the forward process, step again; Euler only)."""

    latents: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None
    resample: int = 0

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if self.resample < 0:
            raise ValueError(f"resample must be >= 0, got {self.resample}")
        self.latents = self.latents.contiguous()  # a VAE's output may be channels-last: keep the sampler's layout
        if self.mask is not None:
            b, _, h, w = self.latents.shape
            if self.mask.shape[-2:] != (h, w) or self.mask.shape[0] not in (1, b) or self.mask.shape[1] != 1:
                raise ValueError(f"latent mask {tuple(self.mask.shape)} does not fit latents {tuple(self.latents.shape)}")
            self.mask = self.mask.to(self.latents.device, self.latents.dtype)

    def start(self, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``x_t = (1 − t)·z + t·ε``: the image noised to the sampler's first time ``t``
        (``shift_time(strength)``; the strength itself at shift 1)."""
        t = torch.as_tensor(t, device=noise.device, dtype=torch.float32).expand(noise.shape[0])
        return interpolate(self.latents, noise, t)

    def keep(self, x: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """``x`` at time ``t`` with its kept region replaced by the image noised to ``t`` with
        ``noise``: ``m·x + (1 − m)·((1 − t)·z + t·ε)``. Without a mask, ``x`` unchanged."""
        if self.mask is None:
            return x
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return self.mask * x + (1 - self.mask) * interpolate(self.latents, noise, t)


def renoise(x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, generator: Generators) -> torch.Tensor:
    """The forward process from ``t_from`` up to ``t_to ≥ t_from`` (RePaint's jump back):
    ``x_to = r·x_from + σ·ε`` with ``r = (1 − t_to)/(1 − t_from)`` and ``σ² = t_to² − r²·t_from²``,
    so that ``x_from = (1 − t_from)·x0 + t_from·ε'`` lands on the marginal at ``t_to``; ``ε``
    from ``generator`` (one per image: row k from its own, ``pipeline.diffusion.noise``)."""
    r = (1 - t_to) / (1 - t_from).clamp(min=1e-6)
    sigma = (t_to**2 - (r * t_from) ** 2).clamp(min=0.0).sqrt()
    return r * x + sigma * randn_rows(x.shape, generator, x.dtype, x.device)


@torch.no_grad()
def flow_edit(
    source_velocity: Velocity,
    target_velocity: Velocity,
    source: torch.Tensor,
    grid: torch.Tensor,
    generator: Generators = None,
    average: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """FlowEdit (Kulikov et al. 2024, Algorithm 1) over the times ``grid`` (from the start time
    ``t_max`` down to 0): no inversion. At each ``t``, draw ``ε``, put the source on its path
    ``z_src = (1 − t)·x_src + t·ε`` and the edit beside it ``z_tar = z_edit + z_src − x_src``, and
    step ``z_edit`` by the velocity difference ``v(z_tar, c_tar) − v(z_src, c_src)`` (averaged over
    ``average`` draws, from ``generator``: one, or one per image). The velocities are guided,
    each with its prompt bound. Equal source and target velocities give a zero difference: the
    source comes back unchanged."""
    edit = source.clone()
    batch = source.shape[0]
    for i in tqdm(range(len(grid) - 1), desc="flowedit", disable=not progress, leave=False):
        t = grid[i].expand(batch)
        delta = torch.zeros_like(source)
        for _ in range(average):
            noise = randn_rows(source.shape, generator, source.dtype, source.device)
            z_src = interpolate(source, noise, t)
            z_tar = edit + z_src - source
            delta += target_velocity(z_tar, t) - source_velocity(z_src, t)
        edit = edit + (grid[i + 1] - grid[i]) * delta / average
    return edit
