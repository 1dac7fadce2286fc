"""The data-consistent solver (``pipeline.inference.inverse``) on the tiny teacher: its results
meet the measurement (≤ 1/10 of SDEdit's consistency error on the same cases), its updates pin
the time convention, and image k depends on its own seed only."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.degradations import consistency_error, parse_degradation
from pipeline.data.images import image_to_tensor
from pipeline.evaluation.edit_cases import edit_cases
from pipeline.inference.editing import ImageEditor, Sampling
from pipeline.inference.inverse import SolverConfig, _next, consistent_pixels, solve
from pipeline.inference.pipeline import TextToImage

STEPS = 4


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return TextToImage.from_folder(teacher_dir)


def _pixels(images) -> torch.Tensor:
    return torch.stack([image_to_tensor(im.convert("RGB")) for im in images])  # (B, 3, H, W)


@pytest.mark.parametrize("task,strength", [("sr4", 0.4), ("colourise", 0.7)])
def test_the_solver_meets_the_measurement_ten_times_closer_than_sdedit(teacher, task, strength):
    cases = edit_cases(task, 3, 32, seed=3)
    deg = parse_degradation(cases[0].degradation)
    y, prompts, seeds = torch.stack([c.measurement for c in cases]), [c.prompt for c in cases], [0, 1, 2]
    solved = solve(teacher, deg, y, prompts, seeds, SolverConfig(steps=STEPS, guidance=2.0), progress=False)
    sdedit = ImageEditor(teacher).edit([c.image for c in cases], prompts, strength, None,
                                       Sampling(steps=STEPS, guidance=2.0), seeds)
    solver_error = consistency_error(deg, _pixels(solved.images), y)  # (B,) the 8-bit images
    sdedit_error = consistency_error(deg, _pixels(sdedit), y)
    raw_error = consistency_error(deg, solved.raw, y)
    assert solver_error.mean() <= sdedit_error.mean() / 10, (solver_error, sdedit_error)
    assert raw_error.mean() > 5 * solver_error.mean()  # the projection did the work, not the prior alone
    assert solved.pixels.min() >= -1 and solved.pixels.max() <= 1


def test_each_update_without_a_correction_is_the_euler_step():
    """With x̂0 = x − t·v (no projection), the DDNM and corrected-velocity updates are Euler's
    ``x + (t_next − t)·v``; at t_next = 0 every update returns x̂0."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, t_next = torch.tensor(0.7), torch.tensor(0.4)
    euler = x + (t_next - t) * v
    for update in ("predicted", "velocity"):
        torch.testing.assert_close(_next(update, x, v, x - t * v, t, t_next, None), euler)
    for update in ("predicted", "velocity", "fresh"):
        assert torch.equal(_next(update, x, v, x - t * v, t, torch.tensor(0.0), None), x - t * v)


def test_consistent_pixels_meet_y_inside_the_box():
    deg = parse_degradation("grayscale")
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    guess = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    out = consistent_pixels(deg, guess, deg.measure(truth))
    assert out.abs().max() <= 1
    assert consistency_error(deg, out, deg.measure(truth)).max() < 1e-4 < consistency_error(deg, guess, deg.measure(truth)).min()


def test_image_k_depends_on_its_seed_only_with_fresh_noise(teacher):
    cases = edit_cases("sr4", 2, 32, seed=3)
    deg, cfg = parse_degradation("down4"), SolverConfig(steps=3, update="fresh", polish=0)
    y = torch.stack([c.measurement for c in cases])
    both = solve(teacher, deg, y, [c.prompt for c in cases], [5, 6], cfg, progress=False)
    alone = solve(teacher, deg, y[1:], [cases[1].prompt], [6], cfg, progress=False)
    torch.testing.assert_close(both.raw[1:], alone.raw, atol=1e-3, rtol=0)  # batched matmuls round differently
    other = solve(teacher, deg, y[1:], [cases[1].prompt], [7], cfg, progress=False)
    assert (other.raw - alone.raw).abs().max() > 1e-2  # the seed does matter


def test_bad_settings_are_one_clear_error(teacher):
    with pytest.raises(ValueError, match="update 'ddim'"):
        SolverConfig(update="ddim")
    with pytest.raises(ValueError, match="strength"):
        SolverConfig(strength=0.0)
    y = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="not"):
        solve(teacher, parse_degradation("edges"), y, ["a red circle"], [0], progress=False)
    with pytest.raises(ValueError, match="start image"):
        solve(teacher, parse_degradation("grayscale"), y, ["a red circle"], [0], SolverConfig(strength=0.5), progress=False)
