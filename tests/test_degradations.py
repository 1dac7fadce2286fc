"""pipeline.data.degradations: each operator pinned on known images; projections exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.degradations import DEGRADATIONS, LINEAR, consistency_error, parse_degradation, parse_degradations


def random_images(seed: int, count: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, 3, H, W)


def test_grayscale_of_a_known_colour():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    deg = parse_degradation("grayscale")
    y = deg.measure(red)
    assert y.shape == (1, 1, 4, 4)
    assert torch.allclose(y, torch.full_like(y, 0.299 - 0.587 - 0.114))  # BT.601 luma of (255, 0, 0) in [-1, 1]
    assert torch.allclose(deg.source(red), y.expand(1, 3, 4, 4))


def test_box_average_of_a_known_pattern():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4) / 16  # (1, 3, 4, 4)
    down2 = parse_degradation("down2").measure(x)[0, 0]
    assert torch.allclose(down2, torch.tensor([[2.5, 4.5], [10.5, 12.5]]) / 16)
    assert torch.allclose(parse_degradation("down4").measure(x)[0, :, 0, 0], torch.full((3,), 7.5 / 16))
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1  # ±1 checkerboard
    assert parse_degradation("down2").measure(checker.expand(1, 3, 8, 8)).abs().max() == 0
    source = parse_degradation("down4").source(random_images(0))
    assert source.shape == (2, 3, 32, 32) and source.abs().max() <= 1


@pytest.mark.parametrize("spec", LINEAR + ("blur:0.8", "mask:0.5", "outpaint:top"))
def test_projection_meets_the_measurement_and_keeps_a_consistent_image(spec: str):
    deg = dataclasses.replace(parse_degradation(spec), tikhonov=1e-10)  # blur: the exact inverse (float y)
    truth, guess = random_images(1), random_images(2)
    mask = deg.masks(2, 32, 32, torch.Generator().manual_seed(3))
    y = deg.measure(truth, mask)
    projected = deg.project(guess, y, mask)
    assert (deg.measure(projected, mask) - y).abs().max() < 1e-5
    assert (deg.project(truth, y, mask) - truth).abs().max() < 1e-6  # already consistent: unchanged
    assert consistency_error(deg, projected, y, mask).max() < 1e-5
    # the nearest consistent image: closer to the guess than the truth, itself consistent, is
    assert (projected - guess).norm() <= (truth - guess).norm() + 1e-4


def test_blur_is_a_circular_gaussian_and_its_fft_projection_deconvolves():
    deg = dataclasses.replace(parse_degradation("blur:1.5"), tikhonov=1e-10)
    x = random_images(4, count=1)
    radius = 6  # 4σ
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-offsets**2 / (2 * 1.5**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, -1, -1)  # (3, 1, 13, 13)
    direct = F.conv2d(F.pad(x, (radius,) * 4, mode="circular"), kernel, groups=3)
    assert (deg.measure(x) - direct).abs().max() < 1e-5
    grid = torch.arange(32.0) * 2 * torch.pi / 32
    smooth = (0.5 * torch.sin(grid[:, None] + 2 * grid[None, :]) + 0.3 * torch.cos(3 * grid)[None, :]).expand(1, 3, 32, 32)  # periodic, low frequency
    exact = smooth.double()
    recovered = deg.project(torch.zeros_like(exact), deg.measure(exact))  # A⁺ y from nothing: the image back
    assert (recovered - exact).abs().max() < 1e-6
    rounded = deg.project(torch.zeros_like(smooth), deg.measure(smooth))  # float32 y: its rounding amplified, boundedly
    assert (rounded - smooth).abs().max() < 1e-2
    assert (deg.measure(smooth) - smooth).abs().max() > 0.05  # the blur did change it


def test_default_blur_projection_is_regularised_for_8_bit_measurements():
    """y from an 8-bit image: the exact inverse amplifies the rounding into noise, the default
    (Tikhonov 1e-2) brings the image back closer than the blurred one, and nearly consistent."""
    deg = parse_degradation("blur")
    grid = torch.arange(32.0) * 2 * torch.pi / 32
    x = (0.5 * torch.sin(grid[:, None] + 2 * grid[None, :]) + 0.4 * torch.sign(torch.cos(2 * grid))[None, :]).expand(1, 3, 32, 32)
    y = ((deg.measure(x) + 1) * 127.5).round() / 127.5 - 1  # an 8-bit blurred image
    exact = dataclasses.replace(deg, tikhonov=1e-10).project(torch.zeros_like(x), y)
    regularised = deg.project(torch.zeros_like(x), y)
    error = lambda im: (im - x).pow(2).mean().sqrt()  # noqa: E731
    assert error(regularised) < 0.7 * error(y) and error(y) < error(exact)
    assert consistency_error(deg, regularised, y).max() < 0.01


def test_consistency_error_units():
    x = random_images(6)
    for spec in DEGRADATIONS:
        deg = parse_degradation(spec)
        mask = deg.masks(2, 32, 32, torch.Generator().manual_seed(0))
        assert consistency_error(deg, x, deg.measure(x, mask), mask).max() == 0, spec
    gray = parse_degradation("grayscale")
    assert torch.allclose(consistency_error(gray, x + 0.2, gray.measure(x)), torch.full((2,), 0.1), atol=1e-6)  # luma +0.2 -> 0.1 in [0, 1]


def test_edges_of_a_step_and_canny_of_a_square():
    step = -torch.ones(1, 3, 16, 16)
    step[..., 8:] = 1  # black left, white right
    edges = parse_degradation("edges").measure(step)[0, 0]  # (16, 16)
    assert edges.shape == (16, 16)
    assert torch.allclose(edges[:, 7:9], torch.ones(16, 2), atol=1e-5)  # full step: the map's maximum
    assert torch.allclose(edges[:, :6], -torch.ones(16, 6), atol=1e-5)  # flat: the minimum
    square = -torch.ones(1, 3, 32, 32)
    square[..., 10:22, 10:22] = 1
    canny = parse_degradation("canny").measure(square)[0, 0] > 0  # (32, 32) bool
    assert set(parse_degradation("canny").measure(square).unique().tolist()) == {-1.0, 1.0}
    assert canny[9:23, 9:23].sum() == canny.sum() > 30  # the ring around the square, nothing far from it
    assert not canny[12:20, 12:20].any()  # nothing inside
    assert canny[16].sum() <= 4  # thin: at most two pixels per crossing


def test_masks():
    gen = torch.Generator().manual_seed(0)
    masks = parse_degradation("mask").masks(64, 32, 32, gen)
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert abs((1 - masks).mean().item() - 0.25) < 0.03  # a quarter of the area hidden
    left = parse_degradation("outpaint:left").masks(1, 8, 8, gen)[0, 0]
    assert left[:, :4].sum() == 0 and left[:, 4:].min() == 1
    drawn = parse_degradation("outpaint").masks(16, 8, 8, gen)
    assert torch.all((1 - drawn).flatten(1).sum(1) == 32)  # each hides half, on some side
    assert parse_degradation("grayscale").masks(2, 8, 8, gen) is None
    again = parse_degradation("mask").masks(64, 32, 32, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    masked = parse_degradation("mask").source(random_images(7), masks[:2])
    assert masked[:, :, masks[0, 0] == 0][0].abs().max() == 0  # hidden pixels mid grey


@pytest.mark.parametrize("spec, words", [("sepia", "known ones are grayscale"), ("blur:-1", "SIGMA > 0"), ("mask:2", "FRACTION < 1"),
                                         ("outpaint:diagonal", "SIDE in"), ("grayscale:3", "takes no parameter")])
def test_bad_specs_are_one_line(spec: str, words: str):
    with pytest.raises(ValueError) as info:
        parse_degradation(spec)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_nonlinear_ones_have_no_projection_and_lists_parse():
    with pytest.raises(ValueError, match="not linear"):
        parse_degradation("edges").project(random_images(0), torch.zeros(2, 1, 32, 32))
    assert [d.name for d in parse_degradations("grayscale, down4,blur:2")] == ["grayscale", "down4", "blur"]
    assert parse_degradations("blur:2")[0].param == 2.0
    with pytest.raises(ValueError, match="size"):
        parse_degradation("down4").measure(torch.zeros(1, 3, 10, 10))
