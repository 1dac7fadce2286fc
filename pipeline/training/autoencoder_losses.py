"""The autoencoder recipe's losses and measurements (the adversarial ones: ``pipeline.training.gan_losses``).

References: Esser et al. 2021, "Taming Transformers" (hinge loss, the adaptive generator weight,
eq. 7); Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the
latent scale measured on training latents).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Taming eq. 7: ``λ = ||∇_L rec|| / (||∇_L gan|| + 1e-4)`` at the decoder's last layer L."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@torch.no_grad()
def measure_factors(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` = (1/std, mean) of posterior-mean latents of ``images``."""
    latents = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])
    return float(1.0 / latents.std()), float(latents.mean())
