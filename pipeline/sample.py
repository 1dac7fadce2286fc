"""``python -m pipeline.sample --model DIR --prompt "…" [--prompt …] --steps 50 --guidance 4 --seed 0 --output grid.png``

Encodes the prompts with the run's text encoders, samples latents — Euler with classifier-free
guidance for a teacher, multistep consistency sampling for a distilled student (as its
``pipeline.json`` says) — decodes them with the run's VAE and writes a captioned PNG grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from pipeline.encoders import TextEncoders
from pipeline.encoders.vae import FrozenVAE
from pipeline.data.images import tensor_to_images
from pipeline.data.sheets import write_grid
from pipeline.diffusion.samplers import SAMPLERS, sample
from pipeline.timing import clock

PROG = "pipeline.sample"


class TextToImage:
    """A transformer with the VAE and text encoders it was trained against."""

    def __init__(
        self, transformer: torch.nn.Module, vae: FrozenVAE, text: TextEncoders | None, latent_shape: list[int], sampler: str = "euler"
    ) -> None:
        """``text`` may be None when conditions are encoded elsewhere (``sample`` takes them)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}' ({', '.join(SAMPLERS)})")
        self.transformer, self.vae, self.text, self.sampler = transformer.eval(), vae, text, sampler
        self.latent_shape = list(latent_shape)  # [C, h, w]

    @classmethod
    def from_folder(cls, folder: Path, device: str | torch.device = "cpu") -> TextToImage:
        from pipeline.inference.pipeline import load_pipeline

        loaded = load_pipeline(folder, device)
        return cls(loaded.transformer, loaded.vae, loaded.text, loaded.info["latent_shape"], loaded.info.get("sampler", "euler"))

    def noise(self, count: int, seed: int) -> torch.Tensor:
        """The same seed gives the same starting noise, batch after batch."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(count, *self.latent_shape, generator=g).to(self.vae.device)  # (B, C, h, w)

    def noise_per_image(self, seeds: list[int]) -> torch.Tensor:
        """One generator per image: image k's noise depends on its seed only, not on the batch."""
        return torch.cat([self.noise(1, s) for s in seeds])  # (B, C, h, w)

    @torch.no_grad()
    def latents(self, prompts: list[str], steps: int, guidance: float, shift: float = 1.0, seed: int = 0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the prompts and sample; ``noise`` (B, C, h, w) replaces the batch noise drawn
        from ``seed``."""
        noise = self.noise(len(prompts), seed) if noise is None else noise.to(self.vae.device)
        return self.sample(self.text.encode(prompts), noise, steps, guidance, shift, seed)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor, steps: int, guidance: float, shift: float = 1.0,
               seed: int = 0) -> torch.Tensor:
        """The sampler alone (``pipeline.diffusion.samplers.sample``, as the model folder names it)."""
        return sample(self.transformer, self.sampler, cond, noise, steps, guidance, shift, seed)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_images(self.vae.decode(latents))

    def generate(self, prompts: list[str], steps: int = 50, guidance: float = 4.0, shift: float = 1.0, seed: int = 0) -> tuple[list[Image.Image], float]:
        """Images for ``prompts`` and the wall seconds per image."""
        start = clock()
        images = self.images(self.latents(prompts, steps, guidance, shift, seed))
        return images, (clock() - start) / len(prompts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported model folder (runs/NAME/model)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale (1 = none); a student takes it as an input")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--output", type=Path, default=Path("grid.png"))
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1 (got {args.steps})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = TextToImage.from_folder(args.model, device)
    images, per_image = pipe.generate(args.prompt, args.steps, args.guidance, args.shift, args.seed)
    write_grid(images, args.prompt, args.output, args.columns)
    print(f"{PROG}: wrote {args.output} ({len(images)} images, {per_image:.3f} s/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
