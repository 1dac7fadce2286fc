"""Image features for set metrics: one place that loads an extractor and turns images into (N, D).

Two extractors, both loaded from local files (nothing is downloaded):

- ``inception``: the FID Inception-v3's 2048-d pool features (``metrics.load_inception``), the
  features FID, KID and most published precision/recall figures use.
- ``dinov2``: a transformers ``Dinov2Model`` folder (``config.json`` + weights, e.g. a copy of
  ``facebook/dinov2-large``); the feature is the CLS token after the final layer norm
  (``pooler_output``). Stein et al. 2023, "Exposing flaws of generative model evaluation metrics
  and their unfair treatment of diffusion models" (arXiv:2306.04675) find that this space ranks
  diffusion models more as people do. Images are prepared by the folder's image processor
  (``preprocessor_config.json``) when it has one, else resized to 224² (bicubic) and normalised
  with the ImageNet mean and std, as their ``dgm-eval`` does.
- ``pixels``: no weights; each image box-filtered to 16×16 RGB in [0, 1], flattened (768-d). A
  baseline space, meaningful where images are flat colours on flat backgrounds (the synthetic set:
  the demo measures diversity there, having no Inception or DINOv2 weights offline); on natural
  images it measures little beyond colour layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.evaluation.metrics import MetricError, images_to_uint8, load_inception

EXTRACTORS = ("inception", "dinov2", "pixels")
PIXEL_SIDE = 16
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureExtractor:
    """``embed`` maps a list of PIL images to (B, dim) features on the CPU."""

    name: str  # one of EXTRACTORS
    source: str  # the weights file or folder it was loaded from
    dim: int
    embed: Callable[[list[Image.Image]], torch.Tensor]


def _same_size_runs(images: list[Image.Image]) -> list[list[Image.Image]]:
    runs: list[list[Image.Image]] = []
    for image in images:
        if runs and runs[-1][0].size == image.size:
            runs[-1].append(image)
        else:
            runs.append([image])
    return runs


def inception_extractor(path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The FID Inception (uint8 images of any size in; split where sizes change)."""
    model = load_inception(path, device)

    def embed(images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([model(images_to_uint8(run).to(device)).cpu() for run in _same_size_runs(images)])  # (B, 2048)

    return FeatureExtractor("inception", str(path), 2048, embed)


def _imagenet_pixels(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, 224, 224) float: bicubic resize, ImageNet mean / std."""
    arrays = [np.asarray(im.convert("RGB").resize((DINOV2_SIZE, DINOV2_SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
              for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255  # (B, 3, H, W) in [0, 1]
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def dinov2_extractor(folder: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """A ``Dinov2Model`` folder; its image processor when it ships one, else 224² ImageNet normalisation."""
    from transformers import AutoImageProcessor, Dinov2Model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MetricError(f"DINOv2 folder not found or without config.json: '{folder}'")
    try:
        model = Dinov2Model.from_pretrained(folder).eval().to(device)
    except (OSError, ValueError, RuntimeError) as err:
        raise MetricError(f"cannot load a Dinov2Model from '{folder}': {str(err)[:300]}") from err
    processor = AutoImageProcessor.from_pretrained(folder) if (folder / "preprocessor_config.json").is_file() else None

    def embed(images: list[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        pixels = processor(images=rgb, return_tensors="pt")["pixel_values"] if processor else _imagenet_pixels(rgb)
        return model(pixel_values=pixels.to(device, model.dtype)).pooler_output.float().cpu()  # (B, hidden)

    return FeatureExtractor("dinov2", str(folder), model.config.hidden_size, embed)


def pixels_extractor() -> FeatureExtractor:
    """``PIXEL_SIDE``² RGB pixels (box filter), in [0, 1], flattened."""

    def embed(images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(im.convert("RGB").resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BOX), dtype=np.float32)
                  for im in images]
        return torch.from_numpy(np.stack(arrays)).reshape(len(images), -1) / 255  # (B, 3·side²)

    return FeatureExtractor("pixels", f"{PIXEL_SIDE}x{PIXEL_SIDE} RGB", 3 * PIXEL_SIDE**2, embed)


def load_extractor(name: str, path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """An extractor by name; ``path`` its weights (ignored for ``pixels``)."""
    if name == "pixels":
        return pixels_extractor()
    if name == "inception":
        return inception_extractor(path, device)
    if name == "dinov2":
        return dinov2_extractor(path, device)
    raise MetricError(f"unknown feature extractor '{name}' (one of {', '.join(EXTRACTORS)})")


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: list[Image.Image], batch_size: int = 32,
            desc: str | None = None) -> torch.Tensor:
    """(N, D) float64 features of ``images``, in batches with a progress bar."""
    if not images:
        raise MetricError(f"no images to extract {extractor.name} features from")
    out = [extractor.embed(images[start:start + batch_size]).double()
           for start in tqdm(range(0, len(images), batch_size), desc=desc or extractor.name, leave=False)]
    return torch.cat(out)
