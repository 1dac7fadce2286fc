"""The pix2pix generator: a U-Net that translates a source image (a degraded one: grayscale, low
resolution, …) into a target image, saved and loaded as a diffusers ``from_pretrained`` folder.

References: Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"
(pix2pix): an encoder–decoder with skip connections between mirrored layers (U-Net, Ronneberger
et al. 2015), 4×4 convolutions of stride 2, LeakyReLU(0.2) down, ReLU up, dropout 0.5 in the
innermost decoder layers as the generator's only noise, tanh output.

Differences from the paper, for 32-px images and one device:

- GroupNorm instead of BatchNorm: an output does not depend on the other images of its batch,
  and train and eval mode differ only by the dropout (the paper's batch-1 BatchNorm is instance
  normalisation, which degenerates on the 2×2 innermost maps of a 32-px image);
- ``source_skip``: the source itself is the outermost skip connection (a 3×3 convolution over
  ``[decoder features ‖ source]`` at full resolution gives the output), so the output's pixels
  can follow the source's without passing through the 2×-downsampled first encoder layer;
- ``translate`` runs in eval mode (dropout off): a deterministic translation, as the
  baselines are compared by PSNR.

Shapes: sources (B, in_channels, H, W) in [-1, 1], H and W multiples of ``2**depth``; encoder level
``i`` (1 … depth) has ``base_channels·min(2**(i−1), 8)`` channels at H/2**i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

MAX_MULT = 8  # pix2pix's widths stop doubling at 8× the first (512 for 64)


@dataclass(kw_only=True)
class TranslatorConfig:
    """The U-Net's size (pix2pix at 256 px: base_channels 64, depth 8; at 32 px depth 3–4)."""

    base_channels: int = 64
    depth: int = 4  # stride-2 levels: the image side must be a multiple of 2**depth
    dropout: float = 0.5  # in the innermost `dropout_levels` decoder layers, training only
    dropout_levels: int = 1
    norm_groups: int = 8
    source_skip: bool = True

    def __post_init__(self) -> None:
        if self.base_channels < 1 or self.depth < 1:
            raise ValueError(f"base_channels and depth must be >= 1 (got {self.base_channels}, {self.depth})")
        if not 0 <= self.dropout < 1 or not 0 <= self.dropout_levels <= self.depth:
            raise ValueError(f"dropout must be in [0, 1) and dropout_levels in [0, depth] (got {self.dropout}, {self.dropout_levels})")
        if self.norm_groups < 1 or self.base_channels % self.norm_groups:
            raise ValueError(f"base_channels {self.base_channels} must be a multiple of norm_groups {self.norm_groups}")


def level_channels(base: int, depth: int) -> list[int]:
    """Channels of encoder levels 1 … depth."""
    return [base * min(2**i, MAX_MULT) for i in range(depth)]


def down_block(c_in: int, c_out: int, groups: int | None) -> nn.Sequential:
    """4×4 stride-2 convolution (halves H, W), GroupNorm (None: none), LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=groups is None)]
    if groups is not None:
        layers.append(nn.GroupNorm(groups, c_out))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2))


def up_block(c_in: int, c_out: int, groups: int, dropout: float) -> nn.Sequential:
    """4×4 stride-2 transposed convolution (doubles H, W), GroupNorm, dropout, ReLU."""
    layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.ReLU())


class Translator(ModelMixin, ConfigMixin):
    """pix2pix's U-Net generator; ``degradations``: the specs of the source images it was trained
    on (``pipeline.data.degradations``), recorded in its config so one folder says which tasks it
    serves."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64, depth: int = 4, dropout: float = 0.5,
                 dropout_levels: int = 1, norm_groups: int = 8, source_skip: bool = True, degradations: list[str] | None = None) -> None:
        super().__init__()
        widths = level_channels(base_channels, depth)
        self.down = nn.ModuleList(
            down_block(c_in, c_out, None if i in (0, depth - 1) else norm_groups)  # no norm on the first and the innermost (pix2pix)
            for i, (c_in, c_out) in enumerate(zip([in_channels, *widths[:-1]], widths))
        )
        # decoder: from level depth up to level 1, each output concatenated with the mirrored encoder level
        self.up = nn.ModuleList(
            up_block(widths[i] * (1 if i == depth - 1 else 2), widths[i - 1], norm_groups, dropout if depth - 1 - i < dropout_levels else 0.0)
            for i in range(depth - 1, 0, -1)
        )
        last_in = widths[0] * (2 if depth > 1 else 1)
        if source_skip:
            self.to_full = up_block(last_in, widths[0], norm_groups, 0.0)
            self.head = nn.Conv2d(widths[0] + in_channels, out_channels, 3, 1, 1)
        else:
            self.to_full = nn.Identity()
            self.head = nn.ConvTranspose2d(last_in, out_channels, 4, 2, 1)

    @property
    def degradations(self) -> list[str]:
        return list(self.config.degradations or [])

    def check_input(self, sources: torch.Tensor) -> None:
        """One clear error for a batch this network cannot translate."""
        side = 2**self.config.depth
        if sources.ndim != 4 or sources.shape[1] != self.config.in_channels or sources.shape[2] % side or sources.shape[3] % side:
            raise ValueError(f"sources must be (B, {self.config.in_channels}, H, W) with H and W multiples of {side} "
                             f"(depth {self.config.depth}); got {tuple(sources.shape)}")

    def forward(self, sources: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> (B, out, H, W) in (-1, 1)."""
        skips, h = [], sources
        for block in self.down:
            h = block(h)  # level i: (B, C_i, H/2**i, W/2**i)
            skips.append(h)
        skips.pop()  # the innermost feeds the decoder directly
        for block in self.up:
            h = torch.cat([block(h), skips.pop()], dim=1)  # (B, 2·C_{i−1}, H/2**(i−1), W/2**(i−1))
        if self.config.source_skip:
            h = torch.cat([self.to_full(h), sources], dim=1)  # (B, C_1 + in, H, W)
        return torch.tanh(self.head(h))

    @torch.no_grad()
    def translate(self, sources: torch.Tensor) -> torch.Tensor:
        """Sources (B, in, H, W) in [-1, 1] -> images (B, out, H, W) in [-1, 1]: eval mode (no
        dropout), no gradient, in the network's device and dtype (the class's ``forward``, not an
        autocast wrapper a trainer may have put on the instance); the training mode is restored."""
        self.check_input(sources)
        was_training = self.training
        self.eval()
        try:
            return Translator.forward(self, sources.to(self.device, self.dtype))
        finally:
            self.train(was_training)


def build_translator(cfg: TranslatorConfig, degradations: list[str] | None = None) -> Translator:
    return Translator(base_channels=cfg.base_channels, depth=cfg.depth, dropout=cfg.dropout, dropout_levels=cfg.dropout_levels,
                      norm_groups=cfg.norm_groups, source_skip=cfg.source_skip, degradations=list(degradations or []))
