"""The autoencoder stage's networks: a diffusers ``AutoencoderKL`` built from a typed config and a
patch-GAN discriminator (the losses are the training recipe's: ``pipeline.training.autoencoder_losses``).

References: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(the KL-regularised autoencoder recipe); Esser et al. 2021, "Taming Transformers" (patch-GAN
with hinge loss and the adaptive generator weight, eq. 7); Isola et al. 2017, "pix2pix"
(PatchGAN discriminator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import nn


@dataclass(kw_only=True)
class AutoencoderModelConfig:
    """Architecture of the ``AutoencoderKL`` (diffusers' names)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)  # downsampling 2 ** (len - 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    sample_size: int = 32

    def __post_init__(self) -> None:
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups {self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def build_autoencoder(cfg: AutoencoderModelConfig) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


class Reconstruction(nn.Module):
    """Encode, sample the posterior (or take its mean), decode — as one ``forward``, so DDP sees
    (and syncs) it. ``sample_posterior`` as in diffusers' ``AutoencoderKL.forward``."""

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = True) -> None:
        super().__init__()
        self.vae, self.sample_posterior = vae, sample_posterior

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> reconstruction (B, 3, H, W) and KL per image (B,)."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if self.sample_posterior else posterior.mode()  # (B, C, h, w)
        return self.vae.decode(z).sample, posterior.kl()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): one real/fake logit per patch.

    ``in_channels``: 3 for an image alone (the autoencoder's); 6 for pix2pix's conditional
    discriminator, which sees ``[source ‖ image]`` concatenated on channels."""

    def __init__(self, channels: int = 64, layers: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))  # (B, 1, h', w') logits
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> patch logits (B, 1, h', w')."""
        return self.net(images)
