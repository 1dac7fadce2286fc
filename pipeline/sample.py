"""``python -m pipeline.sample --model DIR --prompt "…" [--prompt …] --steps 50 --guidance 4 --seed 0 --output grid.png``

``--width/--height`` sample another size than the model's default (an aspect-ratio bucket it
trained on, or any multiple of the VAE factor × patch size); ``--shift auto`` takes SD3's
resolution shift for that size.

``--sampler NAME`` samples with another sampler that fits the model (a teacher: euler, heun,
sde, ancestral, pc; a consistency model: consistency) with its knobs (``--noise-scale``, ``--snr``,
``--corrector-steps``, ``--gamma``, ``--renoise-times``/``--renoise-sigmas``;
``pipeline.diffusion.stochastic.SamplerOptions``); the output line gives the model evaluations
per image (NFE).

``--diffusers`` loads the folder the way a diffusers user does, through stock
``DiffusionPipeline.from_pretrained(DIR, custom_pipeline="latent_diffusion_pipeline",
trust_remote_code=True)``, and samples with its scheduler (image k from ``torch.Generator`` seeded
seed + k, as without the flag: the same images).

Encodes the prompts with the run's text encoders, samples latents — Euler with classifier-free
guidance for a teacher, multistep consistency sampling for a distilled student (as its
``model_index.json`` says) — decodes them with the run's VAE and writes a captioned PNG grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.config.cli import add_size_args, image_size, shift_arg
from pipeline.encoders.common import EncoderLoadError
from pipeline.encoders.locations import add_encoder_args, encoder_paths
from pipeline.figures.sheets import write_sheet
from pipeline.data.model_folder import read_model_info
from pipeline.inference.pipeline import TextToImage, add_sampler_args, sampler_from_args
from pipeline.timing import clock

PROG = "pipeline.sample"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported model folder (runs/NAME/model)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--steps", type=int, help="sampling steps (default 50; with --renoise-times/--renoise-sigmas: their count + 1)")
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale (1 = none); a student takes it as an input")
    p.add_argument("--shift", type=shift_arg, default=1.0, help="time-grid shift: a number, or auto (SD3's, from the image's tokens)")
    add_size_args(p)
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k (as pipeline.evaluate)")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--output", type=Path, default=Path("grid.png"))
    p.add_argument("--diffusers", action="store_true", help="load and sample through stock diffusers' DiffusionPipeline")
    add_sampler_args(p)
    add_encoder_args(p)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.diffusers:
        if args.sampler is not None or any(getattr(args, k) is not None for k in SAMPLER_FLAGS):
            p.error("--diffusers samples with the folder's scheduler: --sampler and its knobs are for our own sampler")
        args.steps = 50 if args.steps is None else args.steps
        return sample_with_diffusers(args, device)
    try:
        sampler, options = sampler_from_args(p, args, read_model_info(args.model).get("sampler", "euler"))
        args.steps = resolve_steps(p, args.steps, options)
        pipe = TextToImage.from_folder(args.model, device, encoder_paths(args))
    except (EncoderLoadError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    size = image_size(args, pipe.latent_shape[-1] * pipe.vae.downsample)
    try:
        pipe.latent_shape_for(size)
    except ValueError as err:
        p.error(str(err))
    images, per_image = pipe.generate(args.prompt, args.steps, args.guidance, args.shift, args.seed, size, sampler=sampler,
                                      options=options)
    write_sheet(images, args.prompt, args.output, args.columns)
    nfe = pipe.evaluations(args.steps, args.guidance, sampler, options)
    print(f"{PROG}: wrote {args.output} ({len(images)} images, {sampler} {args.steps} steps, {nfe} evaluations/image, "
          f"{per_image:.3f} s/image)")
    return 0


SAMPLER_FLAGS = ("sampler", "noise_scale", "snr", "corrector_steps", "gamma", "renoise_times", "renoise_sigmas")


def resolve_steps(p: argparse.ArgumentParser, steps: int | None, options) -> int:
    """``--steps``, or with re-noise times their count + 1 (a different ``--steps``: ``p.error``)."""
    if options.times is not None:
        if steps is not None and steps != len(options.times) + 1:
            p.error(f"{len(options.times)} re-noise times make {len(options.times) + 1} steps; --steps says {steps}")
        return len(options.times) + 1
    steps = 50 if steps is None else steps
    if steps < 1:
        p.error(f"--steps must be >= 1 (got {steps})")
    return steps


def sample_with_diffusers(args: argparse.Namespace, device: str) -> int:
    """The grid through stock diffusers (``--diffusers``); the scheduler's shift is the model's."""
    from diffusers import DiffusionPipeline

    from pipeline.data.model_folder import MODEL_INDEX, PIPELINE_MODULE

    if not (args.model / MODEL_INDEX).is_file():
        print(f"{PROG}: error: {args.model} is not a diffusers pipeline folder (no {MODEL_INDEX})", file=sys.stderr)
        return 2
    start = clock()
    pipe = DiffusionPipeline.from_pretrained(args.model, custom_pipeline=PIPELINE_MODULE, trust_remote_code=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(args.seed + k) for k in range(len(args.prompt))]
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators,
                  width=args.width, height=args.height).images
    write_sheet(images, args.prompt, args.output, args.columns)
    print(f"{PROG}: wrote {args.output} ({len(images)} images through {type(pipe).__name__}, {clock() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
