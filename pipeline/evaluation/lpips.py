"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"): the distance of AlexNet features, weighted per layer by learned linear heads, through
torchmetrics' ``LearnedPerceptualImagePatchSimilarity(net_type="alex")``.

torchmetrics ships the linear heads; the AlexNet backbone comes from torchvision's weights file
``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` (:func:`alexnet_path`), which nothing
here downloads. Without that file :func:`lpips` returns None and :func:`lpips_unavailable` gives
the one line a report prints instead of a number. At 32 px AlexNet's deeper layers see one cell;
the score still orders images, but compare it only at one resolution.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch


def alexnet_path() -> Path:
    """Where torchvision looks for its AlexNet weights (``torch.hub.get_dir()/checkpoints``)."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(AlexNet_Weights.DEFAULT.url).path).name


def lpips_unavailable() -> str | None:
    """None when LPIPS can be computed; otherwise the line saying why not."""
    path = alexnet_path()
    return None if path.is_file() else f"LPIPS: n/a (no AlexNet weights at {path})"


@lru_cache(maxsize=2)
def _metric(path: str, device: str) -> torch.nn.Module:
    """The torchmetrics module (per-image values), built once per weights file and device."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none").to(device).eval()


@torch.no_grad()
def lpips(images: torch.Tensor, references: torch.Tensor, batch_size: int = 64) -> torch.Tensor | None:
    """(B,) LPIPS of images (B, 3, H, W) in [-1, 1] against ``references`` (0 for equal images,
    larger = more different); None without the AlexNet weights (:func:`lpips_unavailable`)."""
    if images.shape != references.shape:
        raise ValueError(f"LPIPS needs images of one shape, got {tuple(images.shape)} and {tuple(references.shape)}")
    if lpips_unavailable() is not None:
        return None
    metric = _metric(str(alexnet_path()), str(images.device))
    values = []
    for start in range(0, images.shape[0], batch_size):
        a, b = images[start:start + batch_size].clamp(-1, 1), references[start:start + batch_size].clamp(-1, 1)
        values.append(metric(a.float(), b.float()).reshape(-1))
        metric.reset()
    return torch.cat(values).cpu()  # (B,)
