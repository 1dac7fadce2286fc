"""Samplers over any ``model(x, t, cond) -> v`` (DESIGN.md §3 conventions, ``pipeline.diffusion.flow``).

- ``euler``: the probability-flow ODE from ``t = 1`` (noise) to ``t = 0`` (data),
  ``x ← x + (t_next − t)·v̂``, on a grid warped by the resolution shift.
- ``consistency``: the multistep consistency sampler (Song et al. 2023, "Consistency Models",
  Algorithm 1) for a student whose ``f(x, t) = x − t·v(x, t)``: ``x0 = f(ε, 1)``, then for each
  ``t_k``: ``x = (1 − t_k)·x0 + t_k·ε_k``, ``x0 = f(x, t_k)`` — exactly ``steps`` model calls.
  Its knobs: explicit re-noise times (:func:`consistency_grid`) and TCD's γ (Zheng et al. 2024,
  "Trajectory Consistency Distillation": :func:`_tcd_renoise`).
- ``heun``, ``sde``, ``ancestral``, ``pc``: a teacher's higher-order and stochastic samplers on the
  same grid (``pipeline.diffusion.stochastic``, which holds every sampler's knobs,
  ``SamplerOptions``, and the evaluation count, ``evaluations``).
- Guidance: ``pipeline.diffusion.guidance``; an image-conditioned teacher (``cond["image"]``)
  takes ``image_guidance`` too (InstructPix2Pix's dual guidance).
- Editing: every sampler takes an ``Edit`` (``pipeline.diffusion.editing``): they start at
  ``shift_time(strength)`` from the noised image (diffusers' SD3 image-to-image start, see
  :func:`time_grid`), walk only the grid's times below it, and keep the image's unmasked region
  on its forward path after every step (SDEdit, RePaint).
- Noise: every draw after the starting noise (the stochastic samplers', a student's, RePaint's jumps,
  FlowEdit's) goes through ``pipeline.diffusion.noise.randn_rows``; given one seed per image,
  image k draws from its own generator only, so it does not depend on its batch.

:func:`sample` runs the sampler it is given; a model folder names its own ("euler" for a teacher,
"consistency" for a distilled or consistency-trained model), another one must fit the model
(:func:`resolve_sampler`), so the inference pipeline and the training-time grids sample alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from tqdm import tqdm

from pipeline.diffusion import stochastic
from pipeline.diffusion.editing import Edit, check_strength, flow_edit, renoise
from pipeline.diffusion.flow import Model, shift_time
from pipeline.diffusion.guidance import guided_velocity
from pipeline.diffusion.noise import Generators, continued_generators, randn_rows
from pipeline.diffusion.stochastic import SamplerOptions

Seeds = int | Sequence[int]  # one seed for the batch (training grids), or one per image


def time_grid(steps: int, shift: float = 1.0, device=None, strength: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0: uniform, then shifted (``shift_time``) — the schedule
    diffusers' ``FlowMatchEulerDiscreteScheduler(shift=a)`` builds from ``sigmas = linspace(1,
    1/steps, steps)``, as ``FluxPipeline`` passes them.

    ``strength = s < 1`` starts part-way, as diffusers' SD3 image-to-image does: ``s`` is a share
    of the *steps*, so the start is ``shift_time(s)`` (at shift 3, ``s = 0.5`` starts at
    ``t = 0.75``, not 0.5) and the grid's times below it follow. Where ``steps·s`` is whole this is
    diffusers' ``timesteps[t_start:]`` with ``t_start = steps − steps·s``: exactly ``steps·s``
    steps. Between grid points, diffusers truncates ``t_start`` and starts at the grid time above
    (a 2-step student at ``s = 0.6`` would start from pure noise); here the start is
    ``shift_time(s)`` itself and ``⌊steps·s⌋ + 1`` steps run (at least one). At shift 1 the start
    is ``s``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)
    if strength >= 1.0:
        return grid
    first = steps - steps * strength  # the start's place on the grid: diffusers' t_start where it is whole
    if abs(first - round(first)) < 1e-6 and round(first) < steps:  # whole up to float rounding
        return grid[round(first):]
    start = shift_time(torch.tensor([strength], device=device, dtype=grid.dtype), shift)
    return torch.cat([start, grid[math.ceil(first):]])


def consistency_fn(model: Model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """``f(x, t) = x − t·v(x, t)``: the x0-prediction; ``f(x, 0) = x`` exactly."""
    return x - t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) * model(x, t, cond)


def consistency_grid(steps: int, shift: float = 1.0, device=None, strength: float = 1.0,
                     times: Sequence[float] | None = None) -> torch.Tensor:
    """The consistency sampler's times: :func:`time_grid`, or with explicit re-noise ``times`` (our
    ``t``, unshifted; ``pipeline.diffusion.stochastic.times_from_sigmas`` maps EDM σ's) the grid's
    start, the ``times`` below it and 0."""
    grid = time_grid(steps, shift, device, strength)
    if times is None:
        return grid
    below = [t for t in times if t < grid[0].item()]
    return torch.cat([grid[:1], torch.tensor(below, device=device, dtype=grid.dtype), grid[-1:]])


def _tcd_renoise(x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, gamma: float,
                 generator: Generators) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TCD's strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency
    Distillation", §4.4): from ``x`` at ``t`` and its ``x0̂``, ``ε̂ = (x − (1 − t)·x0̂)/t``; the
    deterministic move to ``s = (1 − γ)·t'``, ``x_s = (1 − s)·x0̂ + s·ε̂``, then the forward process
    from ``s`` up to ``t'`` with fresh noise (``a = (1 − t')/(1 − s)``, ``σ² = t'² − a²·s²``).
    γ = 1: ``(1 − t')·x0̂ + t'·ε_fresh`` (Consistency Models' step, bit for bit); γ = 0: the
    deterministic DDIM move, no draw. Returns ``x`` at ``t'`` and the fresh noise (None when none)."""
    s = (1 - gamma) * t_next
    x_s = (1 - s) * x0 + s * ((x - (1 - t) * x0) / t)
    if gamma == 0:
        return x_s, None
    a = (1 - t_next) / (1 - s)
    sigma = (t_next**2 - (a * s) ** 2).clamp(min=0.0).sqrt()
    fresh = randn_rows(x0.shape, generator, x0.dtype, x0.device)
    return a * x_s + sigma * fresh, fresh


@torch.no_grad()
def consistency(
    model: Model, noise: torch.Tensor, cond: dict, steps: int = 4, shift: float = 1.0, generator: Generators = None,
    edit: Edit | None = None, times: Sequence[float] | None = None, gamma: float = 1.0,
) -> torch.Tensor:
    """Multistep consistency sampling from ``t = 1`` (``steps`` model evaluations), or from
    ``edit.strength`` (:func:`time_grid`); an edit's kept region is noised with each step's fresh
    noise and is exactly the image at the end. Fresh noise: ``randn_rows`` from ``generator``
    (one per image: row k from its own). ``times``: explicit re-noise times after the first step
    (:func:`consistency_grid`; ``steps`` is then ``len(times) + 1``); ``gamma``: TCD's γ
    (:func:`_tcd_renoise`; 1: the plain multistep sampler)."""
    grid = consistency_grid(steps, shift, noise.device, edit.strength if edit else 1.0, times)  # t_0 > t_1 > … > 0
    ones = torch.ones(noise.shape[0], device=noise.device)
    x = noise if edit is None else edit.start(noise, grid[0])
    x0 = consistency_fn(model, x, grid[0] * ones, cond)
    for t, t_k in zip(grid[:-2], grid[1:-1]):
        x, fresh = _tcd_renoise(x0, x, t, t_k, gamma, generator)
        if edit is not None:
            x = edit.keep(x, t_k, noise if fresh is None else fresh)
        x0 = consistency_fn(model, x, t_k * ones, cond)
    return x0 if edit is None else edit.keep(x0, 0.0, noise)


@torch.no_grad()
def euler(
    model: Model,
    noise: torch.Tensor,
    cond: dict,
    steps: int = 50,
    guidance: float = 1.0,
    shift: float = 1.0,
    progress: bool = False,
    edit: Edit | None = None,
    generator: Generators = None,
    image_guidance: float | None = None,
) -> torch.Tensor:
    """Integrate from ``x = noise`` at ``t = 1`` to ``t = 0``; returns the sample ``x0``
    (``image_guidance``: the dual guidance of an image-conditioned model, None: plain). With an
    ``edit``: from the image noised to the start of :func:`time_grid`, its kept region reset to
    the image on the same noise's path after every step (and ``edit.resample`` RePaint jumps per
    step, their noise from ``generator``: one, or one per image)."""
    grid = time_grid(steps, shift, noise.device, edit.strength if edit else 1.0)
    x = noise if edit is None else edit.start(noise, grid[0])
    for i in tqdm(range(len(grid) - 1), desc="euler", disable=not progress, leave=False):
        t = grid[i].expand(x.shape[0])
        for jump in range(1 + (edit.resample if edit else 0)):
            if jump:  # RePaint: back to t_i by the forward process, then the same step again
                x = edit.keep(renoise(x, grid[i + 1], grid[i], generator), grid[i], noise)
            x = x + (grid[i + 1] - grid[i]) * guided_velocity(model, x, t, cond, guidance, image_guidance)
            if edit is not None:
                x = edit.keep(x, grid[i + 1], noise)
    return x


TEACHER_SAMPLERS = ("euler", "heun", "sde", "ancestral", "pc")  # over a flow model's velocity
SAMPLERS = (*TEACHER_SAMPLERS, "consistency")


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' ({', '.join(SAMPLERS)})")


def resolve_sampler(native: str, chosen: str | None = None) -> str:
    """The sampler to run for a model whose folder names ``native``: ``chosen`` (None: ``native``)
    when it fits — any of :data:`TEACHER_SAMPLERS` for a flow teacher, only ``consistency`` for a
    consistency model (its ``v`` gives ``x0 = x − t·v``, not a flow to integrate); one ``ValueError``
    line otherwise."""
    _check_sampler(native)
    chosen = native if chosen is None else chosen
    _check_sampler(chosen)
    if (native == "consistency") != (chosen == "consistency"):
        kind = "a consistency model samples with 'consistency' only" if native == "consistency" else \
            f"a flow teacher samples with {', '.join(TEACHER_SAMPLERS)}, not 'consistency' (a distilled student's)"
        raise ValueError(f"sampler '{chosen}' does not fit this model: {kind}")
    return chosen


def _student_cond(cond: dict, guidance: float, batch: int, device) -> dict:
    """A student takes the guidance scale as an input (one evaluation per step)."""
    return {**cond, "guidance": torch.full((batch,), float(guidance), device=device)}


def takes_guidance(model: Model) -> bool:
    """Whether a consistency model takes the guidance scale as an input (a distilled student, built
    with ``guidance_embed``); one without it (a teacher-free consistency-trained model, or any DiT)
    is guided by classifier-free guidance on its velocity: two evaluations per step."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "guidance_embed", False) or (isinstance(config, dict) and config.get("guidance_embed")))


def consistency_velocity(model: Model, guidance: float) -> Model:
    """The velocity a consistency sampler reads: the guidance scale as an input where the model
    takes one (:func:`takes_guidance`), classifier-free guided otherwise."""
    if takes_guidance(model):
        return lambda x, t, cond: model(x, t, _student_cond(cond, guidance, x.shape[0], x.device))
    return lambda x, t, cond: guided_velocity(model, x, t, cond, guidance)


def sampler_generators(seed: Seeds, shape: Sequence[int]) -> Generators:
    """Where a sampler's fresh noise comes from. One seed (a training grid): one generator for the
    batch, seeded ``seed + 1``. One seed per image: image k's own generator, continuing the stream
    its seed started with its starting noise of ``shape`` (C, h, w) — image k then depends on
    ``seeds[k]`` alone, whatever its batch (``pipeline.diffusion.noise``)."""
    if isinstance(seed, Sequence):
        return continued_generators(seed, shape)
    return torch.Generator().manual_seed(int(seed) + 1)


def reusing_text(model: Model) -> AbstractContextManager:
    """For one sampling call: the model's memo of its text context (``DiT.reusing_text``: the text
    is the same at every step), or nothing for a model without one."""
    enter = getattr(model, "reusing_text", None)
    return enter() if callable(enter) else nullcontext()


@torch.no_grad()
def sample(model: Model, sampler: str, cond: dict, noise: torch.Tensor, steps: int, guidance: float, shift: float = 1.0,
           seed: Seeds = 0, edit: Edit | None = None, image_guidance: float | None = None,
           options: SamplerOptions | None = None) -> torch.Tensor:
    """Latents from ``noise`` with the named sampler: a teacher's (Euler, or
    ``pipeline.diffusion.stochastic``'s Heun, SDE, ancestral, predictor–corrector) with
    classifier-free guidance, or consistency steps (a student takes the guidance scale as an input:
    one evaluation per step; a model without that input is guided on its velocity). ``options``:
    the samplers' knobs (:class:`~pipeline.diffusion.stochastic.SamplerOptions`). Fresh noise (the
    stochastic samplers', a student's steps, RePaint's jumps) comes from :func:`sampler_generators`
    (``seed``: one for the batch, or one per image). ``edit``: start from an image and keep its
    unmasked part. ``image_guidance``: an image-conditioned teacher's source-image scale
    (``pipeline.diffusion.guidance``; None or 1: plain guidance with the source kept); a student
    takes none. The model's text context is computed once per distinct text (:func:`reusing_text`)."""
    with reusing_text(model):
        return _sample(model, sampler, cond, noise, steps, guidance, shift, seed, edit, image_guidance, options)


def _sample(model: Model, sampler: str, cond: dict, noise: torch.Tensor, steps: int, guidance: float, shift: float,
            seed: Seeds, edit: Edit | None, image_guidance: float | None, options: SamplerOptions | None) -> torch.Tensor:
    _check_sampler(sampler)
    options = options or SamplerOptions()
    generator = sampler_generators(seed, noise.shape[1:])
    if sampler == "euler":
        return euler(model, noise, cond, steps, guidance, shift, edit=edit, generator=generator, image_guidance=image_guidance)
    if sampler in TEACHER_SAMPLERS:
        grid = time_grid(steps, shift, noise.device, edit.strength if edit else 1.0)
        velocity = stochastic.velocity_of(model, cond, guidance, image_guidance)
        if sampler == "heun":
            return stochastic.heun(velocity, noise, grid, edit)
        if sampler == "sde":
            return stochastic.sde(velocity, noise, grid, options.noise_scale, generator, edit)
        if sampler == "ancestral":
            return stochastic.ancestral(velocity, noise, grid, options.noise_scale, generator, edit)
        return stochastic.pc(velocity, noise, grid, options.snr, options.corrector_steps, generator, edit)
    if image_guidance is not None and image_guidance != 1.0:
        raise ValueError(f"image_guidance={image_guidance}: a consistency student takes no image guidance")
    if options.times is not None and steps != len(options.times) + 1:
        raise ValueError(f"{len(options.times)} re-noise times make {len(options.times) + 1} consistency steps, not {steps}")
    return consistency(consistency_velocity(model, guidance), noise, cond, steps, shift, generator, edit, options.times,
                       options.gamma)


def guided(model: Model, sampler: str, guidance: float) -> Model:
    """The velocity a sampler follows: classifier-free guided for a teacher, the guidance scale as
    an input for a student (whose ``v`` gives its ``x0`` prediction, ``x − t·v``)."""
    _check_sampler(sampler)
    if sampler in TEACHER_SAMPLERS:
        return lambda x, t, cond: guided_velocity(model, x, t, cond, guidance)
    return consistency_velocity(model, guidance)


@torch.no_grad()
def text_edit(model: Model, sampler: str, latents: torch.Tensor, source_cond: dict, target_cond: dict, steps: int,
              strength: float, guidance: float, source_guidance: float = 1.5, shift: float = 1.0, seed: Seeds = 0,
              average: int = 1) -> torch.Tensor:
    """FlowEdit (``pipeline.diffusion.editing.flow_edit``) from ``strength`` over the sampler's
    grid (:func:`time_grid`): the source prompt's velocity at ``source_guidance``, the target's at
    ``guidance``; its noise from :func:`sampler_generators` (one seed per image: image k's own)."""
    check_strength(strength)
    if sampler not in ("euler", "consistency"):
        raise ValueError(f"FlowEdit integrates its own Euler steps: sampler '{sampler}' is for image-to-image and inpainting")
    source_v, target_v = guided(model, sampler, source_guidance), guided(model, sampler, guidance)
    grid = time_grid(steps, shift, latents.device, strength)
    with reusing_text(model):  # the source and the target text, each computed once
        return flow_edit(lambda x, t: source_v(x, t, source_cond), lambda x, t: target_v(x, t, target_cond), latents,
                         grid, sampler_generators(seed, latents.shape[1:]), average)
