"""PSNR (whole image and a region) and SSIM, SSIM checked against torchmetrics."""

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.data.quality import psnr, ssim


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 20.0))  # error 0.1 on [0, 1] -> 20 dB


def test_psnr_over_a_region_ignores_the_rest():
    original = torch.zeros(1, 3, 8, 8)
    edited = original.clone()
    edited[..., :4] = 1.0  # left half changed
    right = torch.zeros(1, 1, 8, 8)
    right[..., 4:] = 1
    left_error = psnr(edited, original, 1 - right)
    assert torch.allclose(left_error, torch.tensor([10 * torch.log10(torch.tensor(4.0)).item()]))  # error 0.5 -> 6.02 dB
    assert psnr(edited, original, right).item() == pytest.approx(100.0)  # untouched: the 1e-10 floor
    assert psnr(edited, original).item() < psnr(edited, original, right).item()


@pytest.mark.parametrize("size", [32, 16])
def test_ssim_matches_torchmetrics(size):
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 3, size, size, generator=g) * 2 - 1
    noisy = (reference + 0.3 * torch.randn(reference.shape, generator=g)).clamp(-1, 1)
    ours = ssim(noisy, reference)
    theirs = structural_similarity_index_measure((noisy + 1) / 2, (reference + 1) / 2, data_range=1.0, reduction="none")
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert ssim(reference, reference).allclose(torch.ones(3))
    assert (ours < 0.9).all()
