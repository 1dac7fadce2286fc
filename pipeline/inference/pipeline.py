"""The text-to-image pipeline object: a transformer with the VAE and text encoders it was trained
against, loaded from an exported model folder (``pipeline.data.model_folder``).

``TextToImage.from_folder(DIR)`` reads ``model_index.json`` (its ``info``: encoders, latent shape, sampler);
``generate(prompts)`` encodes the prompts, samples latents (Euler with classifier-free guidance
for a teacher, multistep consistency for a distilled student) and decodes them with the VAE.
``sampler=`` picks another sampler that fits the model (a teacher's Heun, SDE, ancestral or
predictor–corrector, ``pipeline.diffusion.samplers``) and ``options=`` their knobs
(``SamplerOptions``); :func:`add_sampler_args` / :func:`sampler_from_args` give the CLIs the same
flags.

An image-conditioned model (the folder's ``info["image_condition"]``; Brooks et al. 2023,
"InstructPix2Pix"; Black Forest Labs 2025, "FLUX.1 Kontext") takes one source image per prompt
(``generate(..., images=...)``): resized to the output size (bicubic), VAE-encoded as the training
sources were, and sampled with dual guidance (``guidance`` for the text, ``image_guidance`` for
the source, InstructPix2Pix eq. 3).

Previews: ``decoder="tiny"`` (``from_folder``; ``pipeline.evaluate --preview-decoder``) decodes with the
folder's ``tiny_vae/`` (Bohan 2023, "TAESD": an ``AutoencoderTiny`` trained by
``pipeline.train_tiny_decoder`` to imitate the VAE's decoder) instead of the full VAE: approximate
images at a fraction of the decoding cost, for grids and few-step sampling. The VAE stays the
default, and encodes sources either way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.images import image_to_tensor, tensor_to_images, to_rgb
from pipeline.data.model_folder import MODEL_INDEX, read_model_info
from pipeline.diffusion.flow import SHIFT_BASE_TOKENS, resolve_shift
from pipeline.diffusion.noise import image_generators, randn_rows
from pipeline.diffusion.samplers import SAMPLERS, Seeds, resolve_sampler, sample, takes_guidance
from pipeline.diffusion.stochastic import KNOBS, SamplerOptions, check_knobs, evaluations, times_from_sigmas
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.locations import EncoderPaths, locate_encoders
from pipeline.encoders.vae import FrozenTinyDecoder, FrozenVAE, VAEConfig
from pipeline.timing import clock

TINY_DECODER = "tiny_vae"  # a model folder's preview decoder (pipeline.train_tiny_decoder's output)
DECODERS = ("vae", "tiny")


@dataclass
class LoadedPipeline:
    transformer: torch.nn.Module
    vae: FrozenVAE
    text: TextEncoders
    info: dict


def load_pipeline(folder: Path, device: str | torch.device = "cpu", encoders: EncoderPaths | None = None) -> LoadedPipeline:
    """A model folder written by ``pipeline.data.model_folder.export_model``; ``encoders`` replaces
    the encoder locations it records (checked before anything is loaded: ``EncoderLoadError``)."""
    from pipeline.models.dit import DiT

    folder = Path(folder)
    info = read_model_info(folder)
    located = locate_encoders({"vae": info["vae"], "text": info["text"]}, encoders, str(folder / MODEL_INDEX), "--encoder-{name}")
    info = {**info, **located}
    vae = FrozenVAE(from_dict(VAEConfig, info["vae"]), device)
    text = TextEncoders(from_dict(TextEncodersConfig, info["text"]), device)
    if info.get("architecture") == "pixart":  # a PixArt-Σ folder: diffusers' transformer behind our contract
        from diffusers import PixArtTransformer2DModel

        from pipeline.models.pixart import PixArt

        transformer = PixArt(PixArtTransformer2DModel.from_pretrained(folder / info["transformer"]))
        embeddings, mask = text.t5.encode([""])  # (1, L0, D), (1, L0): the unconditional branch it trained on
        transformer.set_null(embeddings[0], mask[0])
    else:
        transformer = DiT.from_pretrained(folder / info["transformer"])
    return LoadedPipeline(transformer.to(device).eval(), vae, text, info)


class TextToImage:
    """A transformer with the VAE and text encoders it was trained against."""

    def __init__(
        self, transformer: torch.nn.Module, vae: FrozenVAE, text: TextEncoders | None, latent_shape: list[int], sampler: str = "euler",
        shift_base_tokens: int = SHIFT_BASE_TOKENS, image_condition: dict | None = None,
        preview: FrozenTinyDecoder | None = None,
    ) -> None:
        """``text`` may be None when conditions are encoded elsewhere (``sample`` takes them);
        ``image_condition``: the model folder's record (``{"mode", "degradations"}``); ``preview``:
        a tiny decoder that :meth:`images` uses instead of the VAE's (None: the VAE decodes)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}' ({', '.join(SAMPLERS)})")
        if preview is not None and (preview.latent_channels, preview.downsample) != (vae.latent_channels, vae.downsample):
            raise ValueError(f"the preview decoder takes {preview.latent_channels} channels at /{preview.downsample}, "
                             f"the VAE {vae.latent_channels} at /{vae.downsample}")
        self.transformer, self.vae, self.text, self.sampler = transformer.eval(), vae, text, sampler
        self.preview = preview
        self.latent_shape = list(latent_shape)  # [C, h, w]
        self.shift_base_tokens = shift_base_tokens  # for shift "auto" (SD3's resolution shift)
        mode = getattr(transformer, "image_condition", None)
        self._image_condition = image_condition or ({"mode": mode, "degradations": []} if mode else None)

    @classmethod
    def from_folder(cls, folder: Path, device: str | torch.device = "cpu", encoders: EncoderPaths | None = None,
                    decoder: str = "vae") -> TextToImage:
        """``decoder``: ``"vae"`` (the full VAE) or ``"tiny"`` (the folder's ``tiny_vae/`` preview decoder)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        loaded = load_pipeline(folder, device, encoders)
        preview = FrozenTinyDecoder(str(Path(folder) / TINY_DECODER), device) if decoder == "tiny" else None
        base = loaded.info.get("timesteps", {}).get("shift_base_tokens", SHIFT_BASE_TOKENS)
        return cls(loaded.transformer, loaded.vae, loaded.text, loaded.info["latent_shape"], loaded.info.get("sampler", "euler"), base,
                   loaded.info.get("image_condition"), preview)

    @property
    def image_condition(self) -> dict | None:
        """``{"mode": "concat" | "sequence", "degradations": [SPEC, ...]}`` of an image-conditioned
        model (the tasks its training pairs showed), None for a text-to-image one."""
        return self._image_condition

    @torch.no_grad()
    def encode_sources(self, images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """Source images (PIL) resized to ``size`` (width, height; bicubic) -> normalised latents (B, C, h, w)."""
        resized = [to_rgb(image).resize(size, Image.Resampling.BICUBIC) if image.size != size else to_rgb(image) for image in images]
        pixels = torch.stack([image_to_tensor(image) for image in resized])  # (B, 3, H, W) in [-1, 1]
        return self.vae.encode(pixels.to(self.vae.device))

    def check_sources(self, count: int, sources) -> None:
        """One clear line when the sources do not fit the model: required by an image-conditioned
        model (one per prompt), refused by a text-to-image one."""
        if self.image_condition is None:
            if sources is not None:
                raise ValueError("images= given, but this is a text-to-image model (no image_condition)")
            return
        if sources is None:
            raise ValueError(f"this model is image-conditioned (image_condition={self.image_condition['mode']}): give images= "
                             "(one source image per prompt)")
        if len(sources) != count:
            raise ValueError(f"{len(sources)} source images for {count} prompts (one per prompt)")

    def latent_shape_for(self, size: tuple[int, int] | None) -> list[int]:
        """[C, h, w] of an image ``size`` (width, height) in pixels; None: the model's default. The
        sides must make whole patches of latents (VAE factor × patch size)."""
        if size is None:
            return list(self.latent_shape)
        step = self.vae.downsample * getattr(self.transformer, "patch_size", 1)
        if size[0] % step or size[1] % step or min(size) <= 0:
            raise ValueError(f"image size {size[0]}x{size[1]} must be positive multiples of {step} (VAE factor × patch size)")
        return [self.latent_shape[0], size[1] // self.vae.downsample, size[0] // self.vae.downsample]

    def resolve_shift(self, shift: float | str, latents: torch.Tensor) -> float:
        """A number as given; ``"auto"``: SD3's shift for this latent grid's image tokens."""
        patch = getattr(self.transformer, "patch_size", 1)
        return resolve_shift(shift, latents.shape[-2] * latents.shape[-1] // patch**2, self.shift_base_tokens)

    def noise(self, count: int, seed: int, shape: list[int] | None = None) -> torch.Tensor:
        """The same seed gives the same starting noise, batch after batch; ``shape`` [C, h, w]
        (default: the model's latent shape)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(count, *(shape or self.latent_shape), generator=g).to(self.vae.device)  # (B, C, h, w)

    def noise_per_image(self, seeds: list[int], shape: list[int] | None = None) -> torch.Tensor:
        """One generator per image: image k's noise depends on its seed only, not on the batch
        (the first draw of the stream the samplers continue when given the same ``seeds``)."""
        shape = list(shape or self.latent_shape)
        return randn_rows([len(seeds), *shape], image_generators(seeds), device=self.vae.device)  # (B, C, h, w)

    @torch.no_grad()
    def latents(self, prompts: list[str], steps: int, guidance: float, shift: float | str = 1.0, seed: Seeds = 0,
                noise: torch.Tensor | None = None, sources: torch.Tensor | None = None,
                image_guidance: float | None = None, sampler: str | None = None,
                options: SamplerOptions | None = None) -> torch.Tensor:
        """Encode the prompts and sample; ``noise`` (B, C, h, w) replaces the noise drawn from
        ``seed``: one seed, the batch's noise in one draw; one seed per prompt, each image's own
        (``noise_per_image``), its later draws too, so image k does not depend on its batch.
        ``sources`` (B, C, h, w): an image-conditioned model's source latents (``encode_sources``),
        sampled with ``image_guidance``. ``sampler``/``options``: as :meth:`sample`."""
        self.check_sources(len(prompts), sources)
        if noise is None:
            noise = self.noise(len(prompts), seed) if isinstance(seed, int) else self.noise_per_image(list(seed))
        cond = self.text.encode(prompts)
        if sources is not None:
            cond["image"] = sources.to(self.vae.device)
        return self.sample(cond, noise.to(self.vae.device), steps, guidance, shift, seed, image_guidance, sampler, options)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor, steps: int, guidance: float, shift: float | str = 1.0,
               seed: Seeds = 0, image_guidance: float | None = None, sampler: str | None = None,
               options: SamplerOptions | None = None) -> torch.Tensor:
        """The sampler alone (``pipeline.diffusion.samplers.sample``): ``sampler`` (None: the one the
        model folder names; another must fit the model, ``resolve_sampler``) with ``options`` (its
        knobs); ``seed``: one for the batch, or one per image (``noise_per_image``'s seeds)."""
        return sample(self.transformer, self.resolve_sampler(sampler), cond, noise, steps, guidance, self.resolve_shift(shift, noise),
                      seed, image_guidance=image_guidance, options=options)

    def resolve_sampler(self, sampler: str | None = None) -> str:
        """``sampler`` when it fits this model (None: the folder's own); one ``ValueError`` line otherwise."""
        return resolve_sampler(self.sampler, sampler)

    def evaluations(self, steps: int, guidance: float, sampler: str | None = None, options: SamplerOptions | None = None) -> int:
        """Model forward passes per image (NFE, ``pipeline.diffusion.stochastic.evaluations``): guidance
        other than 1 doubles them, except for a student that takes the scale as an input."""
        sampler = self.resolve_sampler(sampler)
        guided = guidance != 1.0 and not (sampler == "consistency" and takes_guidance(self.transformer))
        return evaluations(sampler, steps, guided, options)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], in one batch: the
        preview decoder's when the pipeline has one, the VAE's otherwise."""
        return (self.preview if self.preview is not None else self.vae).decode(latents)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_images(self.decode(latents))

    def generate(self, prompts: list[str], steps: int = 50, guidance: float = 4.0, shift: float | str = 1.0, seed: int = 0,
                 size: tuple[int, int] | None = None, images: list[Image.Image] | None = None,
                 image_guidance: float = 1.5, sampler: str | None = None,
                 options: SamplerOptions | None = None) -> tuple[list[Image.Image], float]:
        """Images for ``prompts`` (``size`` (width, height) px, default the model's; image k from
        seed + k alone, as ``pipeline.evaluate`` draws it) and the wall seconds per image. An
        image-conditioned model needs ``images``, one source per prompt (resized to the output size),
        and samples with ``image_guidance`` (InstructPix2Pix's s_I; 1: text guidance only).
        ``sampler``/``options``: as :meth:`sample` (None: the folder's sampler, default knobs)."""
        start = clock()
        self.check_sources(len(prompts), images)
        seeds = list(range(seed, seed + len(prompts)))
        shape = self.latent_shape_for(size)
        noise = self.noise_per_image(seeds, shape)
        sources = None
        if images is not None:
            sources = self.encode_sources(images, (shape[2] * self.vae.downsample, shape[1] * self.vae.downsample))
        out = self.latents(prompts, steps, guidance, shift, seeds, noise, sources, image_guidance if sources is not None else None,
                           sampler, options)
        return self.images(out), (clock() - start) / len(prompts)


# ----------------------------------------------------------------------------------- CLI flags
KNOB_FLAGS = {"noise_scale": "--noise-scale", "snr": "--snr", "corrector_steps": "--corrector-steps", "gamma": "--gamma",
              "times": "--renoise-times/--renoise-sigmas"}


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """``--sampler`` and the samplers' knobs (``SamplerOptions``), for every CLI that samples."""
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the model folder's; a teacher takes "
                   "euler, heun, sde, ancestral or pc, a consistency model consistency)")
    p.add_argument("--noise-scale", type=float, help="sde: diffusion scale λ (g² = 2λt; 0 = the ODE); ancestral: η in [0, 1] "
                   "(default 1)")
    p.add_argument("--snr", type=float, help="pc: the Langevin corrector's signal-to-noise ratio (default 0.16)")
    p.add_argument("--corrector-steps", type=int, help="pc: Langevin steps after each predictor step (default 1)")
    p.add_argument("--gamma", type=float, help="consistency: TCD's γ in [0, 1] (1 = fresh noise each step, the default; 0 = none)")
    times = p.add_mutually_exclusive_group()
    times.add_argument("--renoise-times", type=float, nargs="+", metavar="T",
                       help="consistency: re-noise times after the first step (our t, decreasing in (0, 1)); steps = count + 1")
    times.add_argument("--renoise-sigmas", type=float, nargs="+", metavar="S",
                       help="consistency: the same as EDM / Consistency Models σ's (t = σ/(1 + σ)), e.g. 60 30 15 7 3")


def sampler_from_args(p: argparse.ArgumentParser, args: argparse.Namespace, native: str) -> tuple[str, SamplerOptions]:
    """(sampler, options) from :func:`add_sampler_args`' flags for a model whose folder names ``native``;
    a sampler that does not fit the model, a knob it does not read or a bad value: ``p.error`` (one line)."""
    given = {knob: getattr(args, knob) for knob in ("noise_scale", "snr", "corrector_steps", "gamma") if getattr(args, knob) is not None}
    try:
        sampler = resolve_sampler(native, args.sampler)
        if args.renoise_times is not None or args.renoise_sigmas is not None:
            given["times"] = tuple(args.renoise_times) if args.renoise_times is not None else times_from_sigmas(args.renoise_sigmas)
        try:
            check_knobs(sampler, list(given))
        except ValueError:
            ignored = [KNOB_FLAGS[knob] for knob in given if knob not in KNOBS[sampler]]
            raise ValueError(f"sampler '{sampler}' does not use {', '.join(ignored)}") from None
        return sampler, SamplerOptions(**given)
    except ValueError as err:
        p.error(str(err))
        raise  # unreachable: p.error exits
