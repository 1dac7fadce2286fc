"""Editing with a trained teacher or student, without retraining: image-to-image, inpainting,
outpainting, super-resolution and text-guided edits (``pipeline.diffusion.editing`` has the
methods and their papers).

``ImageEditor(pipe)`` wraps a :class:`~pipeline.inference.pipeline.TextToImage`. Images are PIL
RGB; masks are PIL images or arrays, white (1) where the model redraws. Every call takes one
seed per image: all of image k's noise (its starting noise and every later draw: a student's
steps, RePaint's jumps, FlowEdit's) comes from its seed alone, so a result does not depend on its
batch, as in ``pipeline.evaluate``. ``strength`` is the share of the steps that run
(``pipeline.diffusion.editing``): the start is ``shift_time(strength)``, as in diffusers.

- ``edit(images, prompts, strength, masks)``: run the last ``strength`` share of the steps,
  from the image noised to their first time (SDEdit; ``pipeline.diffusion.samplers.time_grid``);
  with masks, the unmasked region is kept on its forward path after every step (RePaint-style
  blending, optional resampling jumps), and after decoding the input's pixels are pasted back
  outside the feathered mask (``Sampling.paste_back``, on by default). ``strength = 1`` with a
  mask is plain inpainting; without a mask it is text-to-image.
- ``outpaint(images, prompts, (left, top, right, bottom))``: the canvas grows by those pixels,
  filled by repeating the edge, and the new border is inpainted.
- ``super_resolve(images, prompts, scale)``: bicubic upsampling, encoded at the target size and
  refined at a low strength. The model only saw its training resolution: a target grid it never
  trained on gives weaker images (README, "Editing").
- ``text_edit(images, source_prompts, target_prompts, strength)``: FlowEdit.
- ``conditioned(images, prompts, image_guidance)``: an image-conditioned model (trained on pairs:
  InstructPix2Pix, Brooks et al. 2023; FLUX.1 Kontext) samples from noise with the image as its
  source and dual guidance (eq. 3), at the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.images import image_to_tensor, tensor_to_images, to_rgb
from pipeline.diffusion.editing import Edit, latent_mask
from pipeline.diffusion.editing import check_strength as diffusion_check_strength
from pipeline.diffusion.samplers import sample, text_edit
from pipeline.diffusion.stochastic import SamplerOptions
from pipeline.inference.pipeline import TextToImage

Padding = tuple[int, int, int, int]  # (left, top, right, bottom) pixels


class EditInputError(ValueError):
    """An edit's input does not fit (sizes, strength, mask); the message names it."""


@dataclass(kw_only=True)
class Sampling:
    """How an edit samples: ``steps`` of the full grid (only those below the strength run),
    ``guidance``, ``shift``, RePaint ``resample`` jumps per step; for masked edits,
    ``paste_back`` (default on: the input's pixels back outside the mask after decoding, as
    diffusers' ``apply_overlay``) over a ``feather`` of that many pixels (None:
    :func:`feather_radius` of the image; 0: a hard edge); ``sampler`` (None: the model folder's; a
    teacher's Heun, SDE, ancestral or predictor–corrector edit too, FlowEdit keeps its Euler steps)
    with its knobs ``options``."""

    steps: int = 50
    guidance: float = 4.0
    shift: float = 1.0
    resample: int = 0
    paste_back: bool = True
    feather: int | None = None
    sampler: str | None = None
    options: SamplerOptions | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise EditInputError(f"steps must be >= 1 (got {self.steps})")
        if self.resample < 0:
            raise EditInputError(f"resample must be >= 0 (got {self.resample})")
        if self.feather is not None and self.feather < 0:
            raise EditInputError(f"feather must be >= 0 pixels (got {self.feather})")


def check_strength(strength: float) -> float:
    """``pipeline.diffusion.editing.check_strength`` with this layer's input error."""
    try:
        return diffusion_check_strength(strength)
    except ValueError as err:
        raise EditInputError(str(err)) from None


def mask_tensor(mask: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mask as (1, 1, H, W) float in [0, 1] (white / 1 = redraw); ``size`` = (width, height) of
    its image, which it must match."""
    if isinstance(mask, Image.Image):
        if mask.size != size:
            raise EditInputError(f"mask is {mask.width}x{mask.height} but its image is {size[0]}x{size[1]}")
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(mask, dtype=np.float32)
        if array.shape != (size[1], size[0]):
            raise EditInputError(f"mask is {array.shape[1]}x{array.shape[0]} but its image is {size[0]}x{size[1]}")
        if array.min() < 0 or array.max() > 1:
            raise EditInputError("mask values must be in [0, 1]")
    return torch.from_numpy(array.copy())[None, None]


def feather_radius(size: tuple[int, int]) -> int:
    """The default paste-back feather for an image of ``size`` (width, height): 1/32 of its shorter
    side, at least 2 pixels (2 px at 32 px, 16 at 512: the share of diffusers' documented
    ``mask_processor.blur(mask, blur_factor=33)`` at 1024 px)."""
    return max(2, round(min(size) / 32))


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The share of the model's pixels in a paste-back, (B, 1, H, W): 1 on the mask, then falling
    linearly to 0 over ``radius`` pixels outside it — ``(radius + 1 − d)/(radius + 1)`` at
    Chebyshev distance ``d`` — and exactly 0 beyond. The mean of the mask grown by 0, 1, …,
    ``radius`` pixels (max pooling): soft masks stay soft, and unlike diffusers' centred blur the
    seam lies outside the mask, so all of the masked region stays the model's."""
    mask = mask.float()
    if radius <= 0:
        return mask
    grown = [F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r) for r in range(radius + 1)]
    return torch.stack(grown).mean(0)


def paste_back(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, feather: int | None = None) -> torch.Tensor:
    """``w·decoded + (1 − w)·original`` with ``w = feather_mask(mask, feather)`` (images (B, 3, H, W),
    mask (B, 1, H, W); ``feather`` None: :func:`feather_radius`). The samplers keep the unmasked
    latents exactly, but the VAE decoder mixes the whole latent (GroupNorm statistics, mid-block
    attention), so new content inside the mask recolours the rest; this puts the input back
    there, exactly beyond the feather (diffusers' ``apply_overlay``)."""
    radius = feather_radius((decoded.shape[-1], decoded.shape[-2])) if feather is None else feather
    weight = feather_mask(mask.to(decoded.device), radius)
    return weight * decoded + (1 - weight) * original.to(decoded.device)


def outpaint_canvas(image: Image.Image, padding: Padding) -> tuple[Image.Image, np.ndarray]:
    """``image`` on a canvas grown by ``padding`` (edge pixels repeated), and the mask of the new
    border (1 = new)."""
    if any(p < 0 for p in padding) or not any(padding):
        raise EditInputError(f"outpaint padding must be >= 0 and not all zero (got {padding})")
    left, top, right, bottom = padding
    pixels = np.asarray(to_rgb(image))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones(canvas.shape[:2], dtype=np.float32)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0.0
    return Image.fromarray(canvas), mask


def upscale(image: Image.Image, scale: float) -> Image.Image:
    """Bicubic upsampling by ``scale`` (the starting point of super-resolution)."""
    if scale <= 0:
        raise EditInputError(f"scale must be > 0 (got {scale})")
    size = (round(image.width * scale), round(image.height * scale))
    return to_rgb(image).resize(size, Image.Resampling.BICUBIC)


class ImageEditor:
    """Image-to-image, inpainting, outpainting, super-resolution and FlowEdit over one pipeline."""

    def __init__(self, pipe: TextToImage) -> None:
        self.pipe = pipe
        self.multiple = pipe.vae.downsample * getattr(pipe.transformer.config, "patch_size", 1)

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """Same-size RGB images -> normalised latents (B, C, h, w)."""
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise EditInputError(f"a batch of edits needs images of one size, got {sorted(sizes)}")
        width, height = sizes.pop()
        if width % self.multiple or height % self.multiple:
            raise EditInputError(f"image size {width}x{height} is not a multiple of {self.multiple} "
                                 f"(the VAE's downsampling times the transformer's patch size)")
        pixels = torch.stack([image_to_tensor(to_rgb(im)) for im in images])  # (B, 3, H, W)
        return self.pipe.vae.encode(pixels.to(self.pipe.vae.device))

    @torch.no_grad()
    def edit(self, images: list[Image.Image], prompts: list[str], strength: float, masks: list | None = None,
             sampling: Sampling | None = None, seeds: list[int] | None = None) -> list[Image.Image]:
        """SDEdit at ``strength``; with ``masks``, RePaint-style inpainting of their white part and
        (``sampling.paste_back``) the input's pixels back outside it. Image k draws all its noise
        from ``seeds[k]``, so it does not depend on the rest of the batch."""
        sampling = sampling or Sampling()
        seeds = list(range(len(images))) if seeds is None else seeds
        if not len(images) == len(prompts) == len(seeds) or (masks is not None and len(masks) != len(images)):
            raise EditInputError(f"{len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds"
                                 + (f", {len(masks)} masks" if masks is not None else ""))
        latents = self.encode(images)  # (B, C, h, w)
        pixel_masks = None if masks is None else torch.cat([mask_tensor(m, im.size) for m, im in zip(masks, images)])
        mask = None if pixel_masks is None else latent_mask(pixel_masks, latents.shape[-2:])
        edit = Edit(latents, check_strength(strength), mask, sampling.resample)
        noise = self.pipe.noise_per_image(seeds, list(latents.shape[1:]))
        cond = self.pipe.text.encode(prompts)
        out = sample(self.pipe.transformer, self.pipe.resolve_sampler(sampling.sampler), cond, noise, sampling.steps,
                     sampling.guidance, sampling.shift, seeds, edit, options=sampling.options)
        decoded = self.pipe.vae.decode(out)  # (B, 3, H, W)
        if sampling.paste_back and pixel_masks is not None:
            original = torch.stack([image_to_tensor(to_rgb(im)) for im in images])
            decoded = paste_back(decoded, original, pixel_masks, sampling.feather)
        return tensor_to_images(decoded)

    def outpaint(self, images: list[Image.Image], prompts: list[str], padding: Padding, sampling: Sampling | None = None,
                 seeds: list[int] | None = None) -> list[Image.Image]:
        """The canvas grown by ``padding``; its new border inpainted from pure noise."""
        canvases, masks = zip(*(outpaint_canvas(im, padding) for im in images))
        return self.edit(list(canvases), prompts, 1.0, list(masks), sampling, seeds)

    def super_resolve(self, images: list[Image.Image], prompts: list[str], scale: float, strength: float = 0.4,
                      sampling: Sampling | None = None, seeds: list[int] | None = None) -> list[Image.Image]:
        """Bicubic ×``scale``, then refined at ``strength`` (a low one: the last steps only)."""
        return self.edit([upscale(im, scale) for im in images], prompts, strength, None, sampling, seeds)

    @torch.no_grad()
    def conditioned(self, images: list[Image.Image], prompts: list[str], sampling: Sampling | None = None,
                    seeds: list[int] | None = None, image_guidance: float = 1.5) -> list[Image.Image]:
        """An image-conditioned model's output for each source image (same size, which the output
        takes) and prompt: from noise, dual guidance ``sampling.guidance`` / ``image_guidance``;
        image k's noise from ``seeds[k]`` alone."""
        sampling = sampling or Sampling()
        seeds = list(range(len(images))) if seeds is None else seeds
        if self.pipe.image_condition is None:
            raise EditInputError("this model is text to image (no image_condition): its edits take a mode (--strength, --mask, …)")
        if not len(images) == len(prompts) == len(seeds):
            raise EditInputError(f"{len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds")
        sources = self.encode(images)  # (B, C, h, w)
        noise = self.pipe.noise_per_image(seeds, list(sources.shape[1:]))
        out = self.pipe.latents(prompts, sampling.steps, sampling.guidance, sampling.shift, seeds, noise, sources, image_guidance,
                                sampling.sampler, sampling.options)
        return tensor_to_images(self.pipe.vae.decode(out))

    @torch.no_grad()
    def text_edit(self, images: list[Image.Image], source_prompts: list[str], target_prompts: list[str], strength: float,
                  sampling: Sampling | None = None, seeds: list[int] | None = None, source_guidance: float = 1.5) -> list[Image.Image]:
        """FlowEdit at ``strength``: the images change as far as the prompts differ; image k's
        noise from ``seeds[k]`` alone."""
        sampling = sampling or Sampling()
        seeds = list(range(len(images))) if seeds is None else seeds
        if not len(images) == len(source_prompts) == len(target_prompts):
            raise EditInputError(f"{len(images)} images, {len(source_prompts)} source and {len(target_prompts)} target prompts")
        latents = self.encode(images)
        source, target = self.pipe.text.encode(source_prompts), self.pipe.text.encode(target_prompts)
        out = text_edit(self.pipe.transformer, self.pipe.resolve_sampler(sampling.sampler), latents, source, target, sampling.steps,
                        check_strength(strength), sampling.guidance, source_guidance, sampling.shift, seeds)
        return tensor_to_images(self.pipe.vae.decode(out))
