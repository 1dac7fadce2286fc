"""Image quality against a reference: PSNR (over the whole image or a region) and SSIM.

SSIM: Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural
Similarity" — an 11×11 Gaussian window (σ = 1.5), ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²``, the
mean of the SSIM map over every pixel (the image reflect-padded by half a window) and channel,
as torchmetrics computes it. Images are float in [-1, 1] (DESIGN.md §3); both measures are on the
[0, 1] scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(reconstruction: torch.Tensor, original: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB (B,) from images (B, C, H, W) in [-1, 1]; ``region`` (B, 1, H, W) in
    [0, 1] weights the pixels that count (None: all). A region with no pixel gives NaN."""
    error = (((reconstruction.clamp(-1, 1) - original) / 2) ** 2).mean(1, keepdim=True)  # (B, 1, H, W)
    if region is None:
        mse = error.flatten(1).mean(1)
    else:
        weight = region.float().expand_as(error)
        mse = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    """(C, 1, size, size) normalised Gaussian, one per channel (depthwise)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(image: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,) of images (B, C, H, W) in [-1, 1]; the window shrinks (odd) to fit
    images smaller than it."""
    if image.shape != reference.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(image.shape)} and {tuple(reference.shape)}")
    x, y = (image.float().clamp(-1, 1) + 1) / 2, (reference.float() + 1) / 2  # [0, 1]
    size = min(window, *(s - (1 - s % 2) for s in x.shape[-2:]))
    kernel = _gaussian_window(size, sigma, x.shape[1]).to(x.device)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(z, (size // 2,) * 4, mode="reflect"), kernel, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = (blur(x * x) - mu_x**2).clamp(min=0), (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
