"""A tiny preview decoder for our latents: diffusers' stock ``AutoencoderTiny``, built small.

Bohan Ollin Boer Bohan 2023, "TAESD: Tiny AutoEncoder for Stable Diffusion": plain 3×3 conv +
ReLU residual blocks and nearest-neighbour upsampling, trained to reproduce the full VAE decoder's
output, decode latents at a fraction of its cost (previews, sampling-time grids). Here it takes
the *normalised* latents the DiT samples (DESIGN.md §3 "Latents"): the saved config has
``scaling_factor = 1`` and ``shift_factor = 0``, so a stock diffusers pipeline's
``latents / scaling_factor + shift_factor`` hands them over unchanged.

Only the decoder is trained (``pipeline.training.tiny_decoder``); the encoder half is the smallest
``AutoencoderTiny`` allows (the class always holds one) and stays untrained: encode with the full VAE.
``AutoencoderTiny`` repeats one channel width in every stage (its stage convs map width to width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffusers import AutoencoderTiny

ENCODER_WIDTH = 8  # the unused encoder half: as small as the class allows


@dataclass(kw_only=True)
class TinyDecoderConfig:
    """The decoder's width and depth (one stage per resolution, lowest first)."""

    channels: int = 16
    """Width of every stage (16: ~20k parameters, ~10 ms for 64 demo latents on 2 cores)."""
    blocks: list[int] = field(default_factory=lambda: [1, 1, 0])
    """Residual blocks per stage, from the latent resolution up; ``log2(downsample) + 1`` stages."""

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if not self.blocks or any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks must be a non-empty list of counts >= 0, got {self.blocks}")


def build_tiny_decoder(cfg: TinyDecoderConfig, latent_channels: int, downsample: int) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` whose decoder maps (B, latent_channels, h, w) to (B, 3, h·f, w·f),
    ``f = downsample`` (a power of two; one ×2 upsampling between stages)."""
    stages = int(math.log2(downsample)) + 1
    if 2 ** (stages - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    if len(cfg.blocks) != stages:
        raise ValueError(f"blocks must list {stages} stages for downsample {downsample}, got {cfg.blocks}")
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(ENCODER_WIDTH,) * stages, num_encoder_blocks=(0,) * stages,
        decoder_block_out_channels=(cfg.channels,) * stages, num_decoder_blocks=tuple(cfg.blocks),
        scaling_factor=1.0, shift_factor=0.0,  # takes normalised latents as they are
    )
