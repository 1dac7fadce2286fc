"""pipeline.diffusion (flow, samplers, guidance): the time convention, timestep samplers, the loss,
and the Euler sampler on a case whose exact flow is known."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.flow import TimestepConfig, flow_loss, interpolate, loss_by_t, sample_timesteps, shift_time, velocity
from pipeline.diffusion.samplers import euler, time_grid
from pipeline.diffusion.guidance import guided_velocity


def test_time_convention_sign():
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1 is noise
    t, h = torch.full((3,), 0.3), 1e-3
    finite_difference = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, velocity(x0, noise), atol=1e-3, rtol=1e-3)  # v = dx_t/dt = ε − x0


def test_logit_normal_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, TimestepConfig(kind="logit_normal", mean=0.5, std=0.8), g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    assert 0 < t.min() and t.max() < 1


def test_uniform_and_mode_samplers_stay_in_range():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(100_000, TimestepConfig(kind="uniform"), g)
    assert abs(uniform.mean().item() - 0.5) < 0.01
    mode = sample_timesteps(100_000, TimestepConfig(kind="mode", mode_scale=1.29), g)
    assert 0 <= mode.min() and mode.max() <= 1
    middle = ((mode > 0.4) & (mode < 0.6)).float().mean()
    assert middle > ((uniform > 0.4) & (uniform < 0.6)).float().mean()  # s > 0 favours the middle


def test_shift_keeps_endpoints_and_moves_towards_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:3] > t[1:3]).all()
    assert shifted[2] == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)


def test_loss_is_zero_for_the_exact_velocity_and_buckets_add_up():
    x0, noise, t = torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3), torch.rand(8)
    perfect = lambda x, tt, cond: velocity(x0, noise)  # noqa: E731
    assert torch.all(flow_loss(perfect, x0, {}, t, noise) == 0)
    per_sample = flow_loss(lambda x, tt, cond: torch.zeros_like(x), x0, {}, t, noise)
    sums, counts = loss_by_t(t, per_sample, buckets=4)
    assert counts.sum() == 8 and torch.allclose(sums.sum(), per_sample.sum())


def gaussian_velocity(mu: float, sigma: float):
    """The exact rectified-flow velocity when data ~ N(mu, sigma²) (per coordinate)."""

    def model(x, t, cond):
        a, tt = 1 - t.view(-1, 1), t.view(-1, 1)
        var = a**2 * sigma**2 + tt**2
        return (tt - a * sigma**2) / var * (x - a * mu) - mu

    return model


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_follows_the_exact_flow(shift):
    # For Gaussian data the flow maps noise ε to mu + sigma·ε exactly.
    mu, sigma = 2.0, 0.5
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = euler(gaussian_velocity(mu, sigma), noise, {}, steps=400, shift=shift)
    torch.testing.assert_close(x0, mu + sigma * noise, atol=2e-2, rtol=0)


def test_time_grid():
    grid = time_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0)


class Counting:
    """v = 1 for conditional rows, v = 0 for dropped rows; counts calls."""

    calls = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        drop = cond.get("drop", torch.zeros(x.shape[0], dtype=torch.bool))
        return (~drop).float().view(-1, 1).expand_as(x).clone()


def test_guidance_follows_the_diffusers_convention():
    model, x = Counting(), torch.zeros(3, 2)
    v = guided_velocity(model, x, torch.ones(3), {"t5": torch.zeros(3, 1, 1)}, guidance=4.0)
    assert torch.equal(v, torch.full((3, 2), 4.0)) and model.calls == 1  # 0 + 4·(1 − 0), one batched call
    euler(model, x, {}, steps=5, guidance=1.0)
    assert model.calls == 1 + 5  # g = 1: no unconditional pass
    assert math.isclose(euler(Counting(), x, {}, steps=5, guidance=2.0)[0, 0].item(), -2.0)  # ∫ dt·2 from 1 to 0


def test_auto_shift_is_sd3s_resolution_shift():
    from pipeline.diffusion.flow import resolution_shift, resolve_shift

    # SD3 §5.3.2: alpha = sqrt(m / n); 1024 px (64x64 latent, 2x2 patches: 1024 tokens) over the 256 px base (256 tokens) = 2
    assert resolution_shift(1024) == 2.0 and resolution_shift(256) == 1.0 and resolution_shift(4096, 1024) == 2.0
    assert resolve_shift(3.0, 10) == 3.0 and resolve_shift("auto", 64, 16) == 2.0
    cfg = TimestepConfig(kind="uniform", shift="auto", shift_base_tokens=16)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4096, cfg, generator=g, tokens=64)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t, 2 * u / (1 + u))  # t' = a·t / (1 + (a − 1)·t), a = 2
    assert t.mean() > 0.6  # more time near noise for the larger grid
    with pytest.raises(ValueError, match="token count"):
        sample_timesteps(2, cfg)
    with pytest.raises(ValueError, match="shift_base_tokens"):
        TimestepConfig(shift="auto", shift_base_tokens=0)


@pytest.mark.parametrize("steps", [4, 10, 20])
def test_strength_starts_where_diffusers_sd3_img2img_starts(steps):
    """diffusers' ``StableDiffusion3Img2ImgPipeline.get_timesteps``: ``init = min(N·s, N)``,
    ``t_start = int(max(N − init, 0))``, the shifted schedule from index ``t_start`` on. Our grid
    is the schedule ``FlowMatchEulerDiscreteScheduler(shift=3)`` builds from
    ``sigmas = linspace(1, 1/N, N)`` (what ``FluxPipeline`` passes), so the two agree point by point."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())
    torch.testing.assert_close(time_grid(steps, 3.0), scheduler.sigmas, atol=1e-6, rtol=0)
    for strength in (0.25, 0.5, 0.75, 0.3, 0.6, 0.9):
        if steps * strength != round(steps * strength):
            continue  # off the grid: diffusers snaps the start up to a grid point, we start at shift_time(s)
        t_start = int(max(steps - min(steps * strength, steps), 0))
        grid = time_grid(steps, 3.0, strength=strength)
        torch.testing.assert_close(grid, scheduler.sigmas[t_start:], atol=1e-6, rtol=0)
        assert len(grid) - 1 == round(steps * strength)  # steps·strength steps
    assert time_grid(10, 3.0, strength=0.5)[0].item() == pytest.approx(0.75)  # shift_time(0.5) at shift 3


def test_strength_between_grid_points_starts_at_its_shifted_time():
    grid = time_grid(10, 3.0, strength=0.25)  # 2.5 steps of 10: start at shift_time(0.25), then the grid below it
    expected = shift_time(torch.tensor([0.25, 0.2, 0.1, 0.0]), 3.0)
    torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)
    assert torch.equal(time_grid(10, 3.0, strength=1.0), time_grid(10, 3.0))  # strength 1: text-to-image
    two = time_grid(2, 3.0, strength=0.6)  # a 2-step student at 0.6 starts at 0.6 shifted, not from noise
    torch.testing.assert_close(two, shift_time(torch.tensor([0.6, 0.5, 0.0]), 3.0), atol=1e-6, rtol=0)


def test_strength_at_shift_one_starts_at_the_strength_itself():
    for steps in (1, 2, 4, 10, 50):
        for strength in (0.05, 0.3, 0.45, 0.6, 0.99):
            below = [1 - j / steps for j in range(steps + 1) if 1 - j / steps < strength - 1e-9]
            grid = time_grid(steps, 1.0, strength=strength)
            torch.testing.assert_close(grid, torch.tensor([strength, *below]), atol=1e-6, rtol=0)
    # a grid time that equals the strength up to float rounding is the start, not a second, empty step
    assert len(time_grid(50, strength=0.3)) == 16


@pytest.mark.parametrize("sampler, steps", [("euler", 6), ("heun", 3), ("consistency", 4)])
def test_samplers_compute_a_dits_text_context_once(sampler: str, steps: int):
    """``samplers.sample`` runs inside ``DiT.reusing_text``: the text refiner sees the guided
    batch's kept rows once per sample, not once per step, and the latents are bit for bit those
    of the sampler computing it at every step."""
    from pipeline.diffusion.samplers import _sample, sample
    from pipeline.models import DiT

    torch.manual_seed(0)
    model = DiT(in_channels=4, sample_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, text_dim=8, clip_dim=8,
                text_refiner_depth=1, guidance_embed=sampler == "consistency", qk_norm=sampler == "heun")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cond = {"t5": torch.randn(3, 5, 8), "clip": torch.randn(3, 8)}
    noise = torch.randn(3, 4, 4, 4)
    calls = []
    model.text_refiner[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    reused = sample(model, sampler, cond, noise, steps, guidance=3.0, seed=1)
    assert calls == [3]
    with torch.no_grad():
        every_step = _sample(model, sampler, cond, noise, steps, 3.0, 1.0, 1, None, None, None)
    assert len(calls) > 2
    torch.testing.assert_close(reused, every_step, atol=0, rtol=0)
