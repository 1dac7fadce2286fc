"""The frozen VAE: images in [-1, 1] <-> normalised latents, through diffusers' ``AutoencoderKL``.

DESIGN.md §3 "Latents": stored latents are ``z = (vae_latent - shift_factor) * scaling_factor``.
Both factors come from the VAE's own config (SD: scale 0.18215, no shift; Flux: 0.3611 and
0.1159) unless the config here overrides them, and ``describe()`` records them so that
decoding never guesses.

``FrozenTinyDecoder``: a preview decoder (TAESD-style ``AutoencoderTiny``,
``pipeline.models.tiny_decoder``) trained to imitate this VAE's decoder on the same normalised
latents; a fraction of its cost, approximate output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # diffusers' model zoo is imported where a VAE is loaded (~1.5 s at every CLI start otherwise)
    from diffusers import AutoencoderKL

from .common import EncoderLoadError, FrozenModule, check_local_source, resolve_dtype


@dataclass(kw_only=True)
class VAEConfig:
    """Where the VAE lives and how its latents are normalised."""

    path: str
    """Local diffusers folder, or a hub id such as ``stabilityai/sd-vae-ft-mse``."""
    subfolder: str | None = None
    """Folder inside ``path`` that holds the VAE, e.g. ``vae`` in a full pipeline repo."""
    scaling_factor: float | None = None
    """None: the VAE config's ``scaling_factor``."""
    shift_factor: float | None = None
    """None: the VAE config's ``shift_factor`` (0.0 where absent or null)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    sample_posterior: bool = False
    """False: encode to the posterior mean (mode); True: sample it."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        resolve_dtype(self.dtype)


def load_autoencoder(cfg: VAEConfig, device: str | torch.device = "cpu") -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` with errors that name the path; eval, frozen."""
    from diffusers import AutoencoderKL

    where = f"'{cfg.path}'" + (f" (subfolder '{cfg.subfolder}')" if cfg.subfolder else "")
    check_local_source(cfg.path, "VAE")
    try:
        vae = AutoencoderKL.from_pretrained(
            cfg.path, subfolder=cfg.subfolder, torch_dtype=resolve_dtype(cfg.dtype))
    except Exception as err:  # OSError, EnvironmentError, ValueError from diffusers / the hub
        raise EncoderLoadError(f"cannot load an AutoencoderKL from {where}: {err}") from err
    return vae.to(device).eval().requires_grad_(False)


class FrozenVAE(FrozenModule):
    """Encode images to normalised latents and decode them back; never trains."""

    def __init__(self, cfg: VAEConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = load_autoencoder(cfg, device)
        config = self.vae.config
        self.scaling_factor = float(
            cfg.scaling_factor if cfg.scaling_factor is not None else config.scaling_factor)
        config_shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(
            cfg.shift_factor if cfg.shift_factor is not None else (config_shift or 0.0))
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.dtype = resolve_dtype(cfg.dtype)
        self.eval()



    def _check_images(self, images: torch.Tensor) -> None:
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1], got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"images must be (B, {self.vae.config.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE's "
                             f"downsampling factor {self.downsample}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> normalised latents (B, C, H/f, W/f) float32."""
        self._check_images(images)
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        if self.cfg.sample_posterior:
            latents = posterior.sample(generator=generator)
        else:
            latents = posterior.mode()
        return (latents.float() - self.shift_factor) * self.scaling_factor  # (B, C, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32 in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}")
        raw = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(raw.to(self.dtype)).sample  # (B, 3, H, W)
        return images.float().clamp(-1.0, 1.0)

    def describe(self) -> dict:
        """JSON-ready identity of the VAE and its latent space (for ``dataset.json``)."""
        return {
            "source": self.cfg.path,
            "subfolder": self.cfg.subfolder,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "dtype": self.cfg.dtype,
        }


class FrozenTinyDecoder(FrozenModule):
    """A preview decoder saved by ``pipeline.train_tiny_decoder`` (a diffusers ``AutoencoderTiny``
    folder): normalised latents -> images, as :meth:`FrozenVAE.decode`, approximately; never trains."""

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from diffusers import AutoencoderTiny

        check_local_source(path, "tiny decoder", ("config.json",))
        try:
            tiny = AutoencoderTiny.from_pretrained(path)
        except Exception as err:  # OSError, ValueError from diffusers
            raise EncoderLoadError(f"cannot load an AutoencoderTiny from '{path}': {err}") from err
        # channels-last: ~2x faster on CPU (9.5 vs 18.7 ms for 64 demo latents, 2 threads)
        self.tiny = tiny.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self.path = path
        self.latent_channels = int(tiny.config.latent_channels)
        self.downsample = 2 ** (len(tiny.config.decoder_block_out_channels) - 1)
        self.eval()



    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32 in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        return self.tiny.decode(z).sample.float().clamp(-1.0, 1.0).contiguous()  # (B, 3, H, W)
