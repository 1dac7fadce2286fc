"""Image-set metrics for text-to-image evaluation: FID, KID and CLIP score.

- FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium" (arXiv:1706.08500).
- KID: Bińkowski et al. 2018, "Demystifying MMD GANs" (arXiv:1801.01401).
- CLIP score: Hessel et al. 2021, "CLIPScore" (arXiv:2104.08718), in torchmetrics' scale:
  ``100 * max(cos(image, text), 0)``.

FID and KID use torchmetrics with the standard FID Inception (torch-fidelity's
``pt_inception-2015-12-05`` weights, the ones pytorch-fid and clean-fid use). Nothing is
downloaded: the user gives the weights file. Its features are computed once per image set
and fed to both metrics (``pipeline.evaluation.features`` extracts them).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.encoders.clip import ClipEncoderConfig, load_open_clip


class MetricError(ValueError):
    """A metric cannot be set up (missing or wrong weights); the message names the file."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MetricError(f"Inception weights not found: '{path}'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / safetensors header errors
        raise MetricError(f"cannot read Inception weights '{path}': {err}") from err


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID Inception-v3 (2048-d pool features, uint8 images in) from a local weights file.

    torch-fidelity unpickles its weights with ``weights_only=False``; so the user's file is read
    here with ``weights_only=True`` (or as safetensors) and torch-fidelity is handed a copy that
    holds only those tensors.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = _read_state_dict(Path(path))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "inception.pt"
        torch.save(state, plain)
        try:
            model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(plain))
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys, shapes
            raise MetricError(f"'{path}' is not the FID Inception-v3 state dict: {str(err)[:300]}") from err
    return model.to(device)


def images_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images -> (B, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)


class _Precomputed(torch.nn.Module):
    """Identity 'feature extractor': torchmetrics gets features computed once, upstream."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_sizes(real: torch.Tensor, fake: torch.Tensor) -> None:
    if len(real) < 2 or len(fake) < 2:
        raise MetricError(f"FID needs at least 2 images per set (got {len(real)} real, {len(fake)} generated)")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID's Fréchet distance between two feature sets (N, D) in any feature space: FID on
    Inception features, FD_DINOv2 (Stein et al. 2023, arXiv:2306.04675) on DINOv2 ones."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sizes(real, fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subset: int = 1000) -> dict:
    """FID and KID (mean, std over subsets) between two feature sets (N, D), via torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_sizes(real, fake)
    subset = min(kid_subset, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is what we give it
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": frechet_distance(real, fake), "kid_mean": float(kid_mean), "kid_std": float(kid_std), "kid_subset": subset}


class ClipScorer:
    """CLIP score of (image, prompt) pairs with an open_clip model (image and text towers)."""

    def __init__(self, cfg: ClipEncoderConfig, device: str | torch.device = "cpu") -> None:
        self.model, self.tokenizer, self.preprocess = load_open_clip(cfg, device, image_tower=True)
        self.device = torch.device(device)
        self.source = cfg.source

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """(N,) scores in [0, 100]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (N, D)
        text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return 100 * (image * text).sum(-1).clamp(min=0).cpu()
