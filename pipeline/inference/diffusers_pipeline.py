"""``LatentDiffusionPipeline``: an exported model folder (``pipeline.data.model_folder``) as a diffusers
``DiffusionPipeline``, for people who load models with diffusers.

    from pipeline.inference.diffusers_pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained("runs/demo/teacher/model")
    image = pipe("a large red circle at the center on a white background").images[0]

Conventions (DESIGN.md §3 and §11; ``tests/test_diffusers_pipeline.py`` pins them). Diffusers' flow
schedulers walk σ from 1 (noise) to 0 (data) and hand the model ``timestep = σ·1000``; our DiT takes
``t = σ`` (``timestep / num_train_timesteps``) and predicts ``v = ε − x0``, the velocity diffusers'
flow schedulers step with (``prediction_type="flow_prediction"``), so any of them can drive it:
``FlowMatchEulerDiscreteScheduler`` (the exported one, on our sampler's grid ``shift(linspace(1,
1/n, n))``: the same steps as ``pipeline.diffusion.samplers.euler``), ``FlowMatchHeunDiscreteScheduler``,
``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=s)``.
Guidance is diffusers' ``v_u + g·(v_c − v_u)``, the unconditional half being the model's learned null
condition, or the negative prompt where one is given.

A consistency model (``sampler == "consistency"``) samples with the multistep consistency sampler
(``pipeline.diffusion.samplers.consistency``) on the scheduler's σ grid: a distilled student takes
the guidance scale as an input, a model without that input (teacher-free consistency training) is
classifier-free guided on its velocity (``pipeline.diffusion.samplers.consistency_velocity``, as
``TextToImage`` samples it); its fresh noise at each step comes from ``generator`` (one per image:
image k's own stream, as the starting noise).

An image-conditioned model (``image_condition`` in the transformer's config: InstructPix2Pix /
FLUX.1 Kontext) takes ``image=`` (one source per prompt, resized to the output size, bicubic, and
encoded by the folder's VAE: its posterior mode, normalised) and ``image_guidance_scale`` (default:
the folder's ``sampling.image_guidance``): InstructPix2Pix's dual guidance
``v_u + s_T(v_both − v_img) + s_I(v_img − v_u)`` in one batched call, as
``pipeline.inference.pipeline.TextToImage.generate(..., images=...)`` samples it.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

import pipeline.encoders.clip_component  # noqa: F401  (model_index.json names it: diffusers finds it imported)
import pipeline.models.dit  # noqa: F401  (idem)
from pipeline.data.images import image_to_tensor, to_rgb
from pipeline.diffusion.flow import SHIFT_BASE_TOKENS, resolution_shift
from pipeline.diffusion.guidance import guided_velocity
from pipeline.diffusion.noise import Generators, randn_rows
from pipeline.diffusion.samplers import consistency_fn, consistency_velocity, reusing_text


class LatentDiffusionPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    """Text to image with our DiT (a teacher: a scheduler's steps with classifier-free guidance;
    a student: multistep consistency); see the module docstring."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer", "text_encoder_2"]

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 sampler: str = "euler", info: dict | None = None) -> None:
        super().__init__()
        if sampler not in ("euler", "consistency"):
            raise ValueError(f"unknown sampler '{sampler}' (euler, consistency)")
        if getattr(transformer, "config", {}).get("image_condition") is not None and sampler != "euler":
            raise ValueError("an image-conditioned transformer samples with euler (dual guidance), not a consistency student's steps")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2)
        self.register_to_config(sampler=sampler, info=info or {})
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> LatentDiffusionPipeline:
        """diffusers' loading, plus the encoders an export referenced instead of copying
        (``export.encoders: reference``), loaded from where ``info`` records them."""
        from pipeline.data.model_folder import read_model_info

        folder = Path(pretrained_model_name_or_path)
        info = read_model_info(folder)
        kwargs = {**_referenced_components(folder, info), **kwargs}
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ text

    @property
    def _text(self) -> dict:
        return self.config.info.get("text", {})

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The model's ``cond``: T5 tokens (B, L, D) + mask (B, L) as ``pipeline.encoders.t5``
        pads and masks them, CLIP's pooled vector (B, Dc) (and its tokens when the model reads them)."""
        cond: dict[str, torch.Tensor] = {}
        device = self._execution_device
        if self.text_encoder is not None:
            max_length = (self._text.get("t5") or {}).get("max_length", 128)
            batch = self.tokenizer(list(prompts), padding="longest", truncation=True, max_length=max_length,
                                   return_tensors="pt")
            mask = batch["attention_mask"].to(device).bool()  # (B, L)
            hidden = self.text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask.long()).last_hidden_state
            cond["t5"], cond["t5_mask"] = hidden.float() * mask.unsqueeze(-1), mask
        if self.text_encoder_2 is not None:
            clip = self.text_encoder_2.encode(list(prompts))
            cond["clip"] = clip["pooled"]
            if "tokens" in clip:
                cond["clip_tokens"], cond["clip_tokens_mask"] = clip["tokens"], clip["tokens_mask"]
        return cond

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: Generators = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        image: Image.Image | list[Image.Image] | None = None,
        image_guidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Images for ``prompt``; defaults (steps, guidance, size, image guidance) are the model's own
        (``info``). ``generator``: one, or one per image (image k then depends on its own generator
        only); ``latents`` (B, C, h, w) replaces the starting noise; ``output_type``: pil, np, pt or
        latent. An image-conditioned model needs ``image``: one source per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        defaults = self.config.info.get("sampling", {})
        steps = int(num_inference_steps or defaults.get("steps", 50))
        guidance = float(defaults.get("guidance", 4.0) if guidance_scale is None else guidance_scale)
        cond, negative = self._conditions(prompts, negative_prompt)
        latents = self._starting_noise(len(prompts), height, width, generator, latents)
        image_guidance = self._source(cond, image, image_guidance_scale, latents, negative)
        self._set_timesteps(steps, latents)
        with reusing_text(self.transformer):  # the text context once, not at every step
            if self.config.sampler == "consistency":
                latents = self._consistency(latents, cond, guidance, generator)
            else:
                latents = self._scheduler_steps(latents, cond, negative, guidance, image_guidance)
        images = latents if output_type == "latent" else self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _conditions(self, prompts: list[str], negative_prompt) -> tuple[dict, dict | None]:
        """The prompts' ``cond``; with a negative prompt, its ``cond`` too, both from one encoding
        (one padding length). Without one the unconditional half is the model's null condition."""
        if negative_prompt is None:
            return self.encode_prompt(prompts), None
        if self.config.sampler == "consistency":
            raise ValueError("a consistency model's guidance is the null condition's (or an input): it has no negative prompt")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        both = self.encode_prompt(prompts + negatives)
        return {k: v[: len(prompts)] for k, v in both.items()}, {k: v[len(prompts):] for k, v in both.items()}

    def _source(self, cond: dict, image, image_guidance_scale: float | None, latents: torch.Tensor,
                negative: dict | None) -> float | None:
        """An image-conditioned model's source latents into ``cond["image"]`` (B, C, h, w) and its
        image guidance; None (and no ``image`` accepted) for a text-to-image model."""
        mode = self.transformer.config.get("image_condition")
        if mode is None:
            if image is not None:
                raise ValueError("image= given, but the transformer is text to image (no image_condition)")
            return None
        images = [image] if isinstance(image, Image.Image) else list(image or [])
        if len(images) != latents.shape[0]:
            raise ValueError(f"the transformer is image-conditioned (image_condition={mode}): give image=, one source per prompt "
                             f"({len(images)} for {latents.shape[0]})")
        if negative is not None:
            raise ValueError("a negative prompt is not supported with an image-conditioned transformer (its null condition is learned)")
        size = (latents.shape[-1] * self.vae_scale_factor, latents.shape[-2] * self.vae_scale_factor)  # (width, height)
        pixels = torch.stack([image_to_tensor(to_rgb(im).resize(size, Image.Resampling.BICUBIC) if im.size != size else to_rgb(im))
                              for im in images]).to(latents.device, self.vae.dtype)  # (B, 3, H, W) in [-1, 1]
        config = self.vae.config
        raw = self.vae.encode(pixels).latent_dist.mode().float()  # (B, C, h, w)
        cond["image"] = (raw - (config.get("shift_factor") or 0.0)) * config.scaling_factor
        default = self.config.info.get("sampling", {}).get("image_guidance", 1.5)
        return float(default if image_guidance_scale is None else image_guidance_scale)

    def _starting_noise(self, batch: int, height: int | None, width: int | None, generator: Generators,
                        latents: torch.Tensor | None) -> torch.Tensor:
        """(B, C, h, w) float32 on the execution device, drawn as diffusers' ``randn_tensor`` does."""
        channels, h, w = self.config.info["latent_shape"]
        h = h if height is None else height // self.vae_scale_factor
        w = w if width is None else width // self.vae_scale_factor
        step = self.vae_scale_factor * self.transformer.config.patch_size
        if (height or 0) % step or (width or 0) % step:
            raise ValueError(f"height and width must be multiples of {step} (VAE factor × patch size)")
        if latents is None:
            latents = randn_tensor((batch, channels, h, w), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return latents.to(self._execution_device, torch.float32)

    def _set_timesteps(self, steps: int, latents: torch.Tensor) -> None:
        """Our sampler's grid where the scheduler takes σ values (``shift(linspace(1, 1/n, n))``, as
        ``FluxPipeline`` passes them), ``mu`` for dynamic shifting (SD3's resolution shift from the
        image tokens); other schedulers build their own grid from ``steps``."""
        accepts = inspect.signature(self.scheduler.set_timesteps).parameters
        kwargs = {}
        if "sigmas" in accepts:
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        if "mu" in accepts and self.scheduler.config.get("use_dynamic_shifting", False):
            tokens = latents.shape[-2] * latents.shape[-1] // self.transformer.config.patch_size ** 2
            base = self.config.info.get("timesteps", {}).get("shift_base_tokens", SHIFT_BASE_TOKENS)
            kwargs["mu"] = math.log(resolution_shift(tokens, base))
        self.scheduler.set_timesteps(steps, device=latents.device, **kwargs)

    def _model_time(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Diffusers' ``timestep = σ·1000`` -> our ``t = σ`` (B,)."""
        return (timestep.float() / self.scheduler.config.num_train_timesteps).expand(batch)

    def _scheduler_steps(self, latents: torch.Tensor, cond: dict, negative: dict | None, guidance: float,
                         image_guidance: float | None = None) -> torch.Tensor:
        """A teacher: the scheduler's steps on the guided velocity (dual guidance with a source)."""
        for timestep in self.progress_bar(self.scheduler.timesteps):
            t = self._model_time(timestep, latents.shape[0])
            if negative is None:
                v = guided_velocity(self.transformer, latents, t, cond, guidance, image_guidance)
            else:
                both = {k: torch.cat([cond[k], negative[k]]) for k in cond}
                v_cond, v_neg = self.transformer(torch.cat([latents, latents]), torch.cat([t, t]), both).chunk(2)
                v = v_neg + guidance * (v_cond - v_neg)
            latents = self.scheduler.step(v, timestep, latents, return_dict=False)[0]
        return latents

    def _consistency(self, noise: torch.Tensor, cond: dict, guidance: float, generator: Generators) -> torch.Tensor:
        """A consistency model: ``x0 = f(ε, σ_0)``, then ``x = (1 − σ_k)·x0 + σ_k·ε_k; x0 = f(x, σ_k)``
        over the scheduler's σ grid, ``f(x, t) = x − t·v`` (``pipeline.diffusion.samplers.consistency``),
        ``v`` guided as ``consistency_velocity`` guides it (the scale as an input, or CFG on ``v``)."""
        velocity = consistency_velocity(self.transformer, guidance)
        sigmas = self.scheduler.sigmas.to(noise.device, torch.float32)  # σ_0 = 1 > … > σ_{n-1} > 0 (terminal)
        ones = torch.ones(noise.shape[0], device=noise.device)
        x0 = consistency_fn(velocity, noise, sigmas[0] * ones, cond)
        for sigma in self.progress_bar(sigmas[1:-1]):
            fresh = randn_rows(noise.shape, generator, noise.dtype, noise.device)
            x0 = consistency_fn(velocity, (1 - sigma) * x0 + sigma * fresh, sigma * ones, cond)
        return x0

    def _decode(self, latents: torch.Tensor, output_type: str):
        """Normalised latents -> images (the VAE config holds the latents' scaling and shift factors)."""
        config = self.vae.config
        raw = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        images = self.vae.decode(raw.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(images.float(), output_type=output_type)


def _referenced_components(folder: Path, info: dict) -> dict:
    """Components the export recorded by location instead of copying (their folder is absent)."""
    out: dict = {}
    if not (folder / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = info["vae"]
        out["vae"] = AutoencoderKL.from_pretrained(vae["path"], subfolder=vae.get("subfolder"))
        for key in ("scaling_factor", "shift_factor"):
            if vae.get(key) is not None:
                out["vae"].register_to_config(**{key: vae[key]})
    t5, clip = info["text"].get("t5"), info["text"].get("clip")
    if t5 and not (folder / "text_encoder").is_dir():
        from transformers import AutoTokenizer, T5EncoderModel

        out["text_encoder"] = T5EncoderModel.from_pretrained(t5["path"])
        out["tokenizer"] = AutoTokenizer.from_pretrained(t5.get("tokenizer") or t5["path"])
    if clip and not (folder / "text_encoder_2").is_dir():
        from pipeline.encoders.clip import ClipEncoderConfig, FrozenCLIP
        from pipeline.encoders.clip_component import OpenCLIPTextEncoder

        component = OpenCLIPTextEncoder(return_tokens=bool(clip.get("return_tokens")), dtype=clip.get("dtype", "fp32"))
        fields = {k: clip.get(k) for k in ("path", "model", "checkpoint")}
        component.encoder = FrozenCLIP(ClipEncoderConfig(**fields, return_tokens=component.config.return_tokens,
                                                         dtype=component.config.dtype))
        out["text_encoder_2"] = component
    return out
