"""Stochastic and higher-order samplers for a flow teacher, over any ``model(x, t, cond) -> v``,
and the knobs of every sampler (:class:`SamplerOptions`).

References: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(EDM; Heun's method, Algorithm 1); Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations" (reverse-time SDE, Euler–Maruyama, predictor–corrector with a
Langevin corrector, Algorithm 5); Ho et al. 2020 / Song et al. 2021, "Denoising Diffusion
Implicit Models" (ancestral sampling, η); Ma et al. 2024, "SiT" (a flow's SDE family with a
free diffusion coefficient).

Conventions (DESIGN.md §3): ``x_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``, walking ``t`` from 1 to 0
on a grid (``pipeline.diffusion.samplers.time_grid``). From a velocity at ``(x, t)``:

- ``x0̂ = x − t·v`` and ``ε̂ = x + (1 − t)·v`` (so that ``x = (1 − t)·x0̂ + t·ε̂``);
- the score ``s(x, t) = ∇ log p_t(x) = −ε̂ / t = −(x + (1 − t)·v) / t``.

Each sampler takes the guided velocity (classifier-free, or dual guidance for an image-conditioned
model, as ``euler``), starts at ``grid[0]`` (an ``Edit`` starts from its image noised there and
keeps its unmasked part after every step, as ``euler``) and draws its fresh noise through
``randn_rows(…, generator)``: one generator per image makes image k depend on its own seed only.
The last step, to ``t = 0``, is deterministic in every sampler: the Euler step there lands on
``x0̂`` (the denoised mean, Tweedie), with no noise added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.diffusion.editing import Edit, renoise
from pipeline.diffusion.flow import Model
from pipeline.diffusion.guidance import guided_velocity
from pipeline.diffusion.noise import Generators, randn_rows

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v̂(x, t): guided, its condition bound

# The knobs each sampler reads; any other knob given for it is refused (:func:`check_knobs`).
KNOBS: dict[str, tuple[str, ...]] = {
    "euler": (), "heun": (), "sde": ("noise_scale",), "ancestral": ("noise_scale",), "pc": ("snr", "corrector_steps"),
    "consistency": ("gamma", "times"),
}


@dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """The samplers' knobs (each read by the samplers :data:`KNOBS` names).

    - ``noise_scale`` ≥ 0: ``sde``'s diffusion scale λ (``g(t)² = 2·λ·t``; 0 is the ODE, Euler
      exactly) and ``ancestral``'s η ∈ [0, 1] (0 is DDIM, Euler again; 1 is DDPM's posterior);
    - ``snr`` > 0, ``corrector_steps`` ≥ 1: ``pc``'s Langevin corrector (Song et al. 2021, Alg. 5);
    - ``gamma`` ∈ [0, 1]: ``consistency``'s TCD γ (1: fresh noise at each step, Consistency Models'
      multistep sampler; 0: deterministic);
    - ``times``: ``consistency``'s re-noise times after the first step, strictly decreasing in
      (0, 1) (``steps = len(times) + 1``; :func:`times_from_sigmas` maps EDM σ's to them)."""

    noise_scale: float = 1.0
    snr: float = 0.16
    corrector_steps: int = 1
    gamma: float = 1.0
    times: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0 (got {self.noise_scale})")
        if not self.snr > 0:
            raise ValueError(f"snr must be > 0 (got {self.snr})")
        if self.corrector_steps < 1:
            raise ValueError(f"corrector_steps must be >= 1 (got {self.corrector_steps})")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (got {self.gamma})")
        if self.times is not None:
            times = tuple(float(t) for t in self.times)
            if not times or any(not 0.0 < t < 1.0 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
                raise ValueError(f"times must be strictly decreasing in (0, 1) (got {list(times)})")
            object.__setattr__(self, "times", times)


def check_knobs(sampler: str, given: Sequence[str]) -> None:
    """``ValueError`` (one line) naming a knob the sampler does not read."""
    ignored = [knob for knob in given if knob not in KNOBS[sampler]]
    if ignored:
        reads = ", ".join(KNOBS[sampler]) or "none"
        raise ValueError(f"sampler '{sampler}' does not use {', '.join(ignored)} (its knobs: {reads})")


def times_from_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    """EDM / Consistency Models noise levels σ (``x = x0 + σ·ε``) as our times: dividing our
    ``x_t`` by ``1 − t`` gives ``x0 + (t / (1 − t))·ε``, so ``σ = t / (1 − t)`` and
    ``t = σ / (1 + σ)``. E.g. the halving list 60, 30, 15, 7, 3 (of σ_max = 80, t = 0.988)
    is t = 0.984, 0.968, 0.9375, 0.875, 0.75."""
    if any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be > 0 (got {list(sigmas)})")
    return tuple(float(s) / (1.0 + float(s)) for s in sigmas)


def evaluations(sampler: str, steps: int, guided: bool, options: SamplerOptions | None = None) -> int:
    """Model forward passes per image from pure noise (NFE): Euler, SDE, ancestral and
    consistency one per step, Heun ``2·steps − 1`` (none after the last), predictor–corrector
    ``steps + corrector_steps·(steps − 1)`` (no corrector at ``t = 0``); ``guided``
    (classifier-free guidance on the velocity) doubles them. A consistency sampler with ``times``
    takes ``len(times) + 1`` steps."""
    options = options or SamplerOptions()
    if sampler not in KNOBS:
        raise ValueError(f"unknown sampler '{sampler}' ({', '.join(KNOBS)})")
    if sampler == "consistency" and options.times is not None:
        steps = len(options.times) + 1
    calls = {"heun": 2 * steps - 1, "pc": steps + options.corrector_steps * (steps - 1)}.get(sampler, steps)
    return calls * (2 if guided else 1)


def velocity_of(model: Model, cond: dict, guidance: float, image_guidance: float | None = None) -> Velocity:
    """The guided velocity ``v̂(x, t)`` (``pipeline.diffusion.guidance``), its condition bound."""
    return lambda x, t: guided_velocity(model, x, t, cond, guidance, image_guidance)


def _rows(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0])  # a grid time () -> (B,)


def _denoised(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0̂, ε̂) = (x − t·v, x + (1 − t)·v)`` at a grid time ``t`` ()."""
    return x - t * v, x + (1 - t) * v


def _keep(edit: Edit | None, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x if edit is None else edit.keep(x, t, noise)


def _start(noise: torch.Tensor, grid: torch.Tensor, edit: Edit | None, sampler: str) -> torch.Tensor:
    if edit is not None and edit.resample:
        raise ValueError(f"resample (RePaint jumps) is euler's; sampler '{sampler}' takes none")
    return noise if edit is None else edit.start(noise, grid[0])


def _steps(grid: torch.Tensor, desc: str, progress: bool):
    return tqdm(range(len(grid) - 1), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def heun(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor, edit: Edit | None = None,
         progress: bool = False) -> torch.Tensor:
    """Heun's second-order method (EDM Algorithm 1 without churn): an Euler predictor
    ``x' = x + h·v(x, t)``, then the trapezoid ``x + h·(v(x, t) + v(x', t'))/2``; the step to
    ``t = 0`` is plain Euler. ``2·steps − 1`` velocity evaluations."""
    x = _start(noise, grid, edit, "heun")
    for i in _steps(grid, "heun", progress):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        v = velocity(x, _rows(t, x))
        predicted = x + h * v
        if t_next > 0:
            predicted = x + h * 0.5 * (v + velocity(predicted, _rows(t_next, x)))
        x = _keep(edit, predicted, t_next, noise)
    return x


@torch.no_grad()
def sde(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor, noise_scale: float = 1.0, generator: Generators = None,
        edit: Edit | None = None, progress: bool = False) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time SDE with the flow's marginals.

    For any diffusion coefficient ``g(t)``, ``dx = [v + (g²/2)·s] dt + g dW`` forward in time has the
    flow's marginals (its Fokker–Planck equation reduces to the continuity equation of ``v``:
    ``(g²/2)·(∇·(p∇log p) − Δp) = 0``); its reverse (Anderson 1982) walks ``t`` down with
    ``dx = [v − (g²/2)·s] dt + g dW̄``, ``dt < 0``. We take ``g(t)² = 2·λ·t`` (λ = ``noise_scale``;
    SiT's ``w_t = σ_t``): finite at ``t = 1``, unlike the forward process's own ``2t/(1 − t)``, and
    with ``s = −ε̂/t`` the drift ``v + λ·ε̂`` is finite at ``t → 0`` too. A step of ``h = t' − t < 0``:
    ``x ← x + h·(v + λ·ε̂) + sqrt(2·λ·t·|h|)·z``. λ = 0 is the ODE (Euler, bit for bit, and no
    noise drawn); the last step is Euler's (``x0̂``), no noise added."""
    x = _start(noise, grid, edit, "sde")
    for i in _steps(grid, "sde", progress):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        v = velocity(x, _rows(t, x))
        if noise_scale == 0 or t_next == 0:
            x = x + h * v
        else:
            _, eps = _denoised(x, t, v)
            z = randn_rows(x.shape, generator, x.dtype, x.device)
            x = x + h * (v + noise_scale * eps) + (2 * noise_scale * t * -h).sqrt() * z
        x = _keep(edit, x, t_next, noise)
    return x


def ancestral_times(t: torch.Tensor, t_next: torch.Tensor, eta: float) -> torch.Tensor:
    """The time ``t_down ≤ t_next`` an ancestral step moves to deterministically, before fresh noise
    brings it up to ``t_next``: EulerAncestral's split in EDM's σ = t/(1 − t) (``x/(1 − t) = x0 + σ·ε``):
    ``σ_up² = η²·σ'²·(1 − σ'²/σ²)``, ``σ_down² = σ'² − σ_up²``, ``t_down = σ_down/(1 + σ_down)``.
    η = 0: ``t_down = t_next`` (DDIM); η = 1: DDPM's posterior variance; ``t = 1`` (σ = ∞) and
    ``t_next = 0`` are limits of the same formula."""
    if eta == 0:
        return t_next
    sigma_next = t_next / (1 - t_next).clamp(min=1e-12)
    ratio = (t_next * (1 - t) / (t * (1 - t_next)).clamp(min=1e-12)) ** 2  # σ'²/σ² (0 at t = 1)
    sigma_down = sigma_next * (1 - eta**2 * (1 - ratio)).clamp(min=0.0).sqrt()
    return torch.where(t_next > 0, sigma_down / (1 + sigma_down), torch.zeros_like(t_next))


@torch.no_grad()
def ancestral(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor, eta: float = 1.0, generator: Generators = None,
              edit: Edit | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling for rectified flow (diffusers' EulerAncestral / DDPM's posterior): from
    ``x`` at ``t``, ``x0̂`` and ``ε̂`` (module docstring) give the deterministic DDIM move to
    ``t_down`` (:func:`ancestral_times`), ``x_down = (1 − t_down)·x0̂ + t_down·ε̂``; the forward
    process then brings it up to ``t'`` with fresh noise (``pipeline.diffusion.editing.renoise``:
    ``x' = a·x_down + σ·z``, ``a = (1 − t')/(1 − t_down)``, ``σ² = t'² − a²·t_down²``), which keeps
    the marginal at ``t'`` exact. ``eta`` ∈ [0, 1]: 0 is DDIM (Euler, to float rounding)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ancestral: noise_scale (eta) must be in [0, 1] (got {eta})")
    x = _start(noise, grid, edit, "ancestral")
    for i in _steps(grid, "ancestral", progress):
        t, t_next = grid[i], grid[i + 1]
        x0, eps = _denoised(x, t, velocity(x, _rows(t, x)))
        t_down = ancestral_times(t, t_next, eta)
        x = (1 - t_down) * x0 + t_down * eps
        if t_down < t_next:
            x = renoise(x, t_down, t_next, generator)
        x = _keep(edit, x, t_next, noise)
    return x


def langevin(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, snr: float, generator: Generators) -> torch.Tensor:
    """One Langevin corrector step at ``t`` (Song et al. 2021, Algorithm 5): ``s = −(x + (1 − t)·v)/t``,
    ``ε = 2·(snr·‖z‖/‖s‖)²``, ``x + ε·s + sqrt(2ε)·z``. The norms are per image, not averaged over
    the batch as in Song's code (which would make an image depend on its batch partners), and
    ``‖z‖`` is its expectation ``sqrt(d)`` (d: an image's numbers): a step size that depends on the
    draw it scales makes the added variance grow by ``(d + 2)/d``. The per-image ``‖s‖`` still
    leaves a bias of order ``1/d`` (``E[1/‖s‖²] > 1/E[‖s‖²]``): small for an image's latents
    (d in the hundreds and more), large in a few dimensions."""
    _, eps = _denoised(x, t, velocity(x, _rows(t, x)))
    score = -eps / t
    z = randn_rows(x.shape, generator, x.dtype, x.device)
    squared = score.flatten(1).pow(2).sum(1).clamp(min=1e-24).reshape(-1, *([1] * (x.dim() - 1)))  # ‖s‖² (B, 1, …)
    step = 2 * snr**2 * x[0].numel() / squared
    return x + step * score + (2 * step).sqrt() * z


@torch.no_grad()
def pc(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor, snr: float = 0.16, corrector_steps: int = 1,
       generator: Generators = None, edit: Edit | None = None, progress: bool = False) -> torch.Tensor:
    """Predictor–corrector (Song et al. 2021, Algorithm 5 on the flow): an Euler predictor step to
    ``t'``, then ``corrector_steps`` Langevin steps at ``t'`` (:func:`langevin`, signal-to-noise
    ``snr``); no corrector at ``t = 0``. ``steps + corrector_steps·(steps − 1)`` evaluations."""
    x = _start(noise, grid, edit, "pc")
    for i in _steps(grid, "pc", progress):
        t, t_next = grid[i], grid[i + 1]
        x = _keep(edit, x + (t_next - t) * velocity(x, _rows(t, x)), t_next, noise)
        for _ in range(corrector_steps if t_next > 0 else 0):
            x = _keep(edit, langevin(velocity, x, t_next, snr, generator), t_next, noise)
    return x
