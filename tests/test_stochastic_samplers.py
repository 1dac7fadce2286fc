"""The teacher's higher-order and stochastic samplers (``pipeline.diffusion.stochastic``) and the
consistency sampler's knobs, on Gaussian data whose exact velocity and score are known
(``tests.test_flow.gaussian_velocity``); their CLI and diffusers plumbing on the tiny teacher.

Tolerances of the moment tests. Data N(mu, sigma²) per coordinate; n = 20 000 samples: the sample
mean's standard error is sigma/sqrt(n) = 0.0035 (sigma = 0.5), a sample variance's
sigma²·sqrt(2/n) = 0.0025. The samplers are first order (Heun second) in the step: at 200 steps
their bias in the variance is at most ~0.017 (ancestral at shift 3, measured; 0.034 at 100 steps,
halving with the step). So: |mean − mu| < 0.02 and |cov − sigma²·I| < 0.03 (entrywise).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.diffusion.editing import Edit
from pipeline.diffusion.noise import continued_generators, image_generators, randn_rows
from pipeline.diffusion.samplers import (
    SAMPLERS,
    consistency,
    consistency_fn,
    euler,
    resolve_sampler,
    sample,
    sampler_generators,
    time_grid,
)
from pipeline.diffusion.stochastic import SamplerOptions, ancestral_times, check_knobs, evaluations, heun, times_from_sigmas, velocity_of
from tests.test_flow import gaussian_velocity

MU, SIGMA, N = 2.0, 0.5, 20_000


def gaussian_noise(n: int = N, dims: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler,options,steps", [
    ("euler", SamplerOptions(), 200), ("heun", SamplerOptions(), 100), ("sde", SamplerOptions(noise_scale=0.5), 200),
    ("sde", SamplerOptions(noise_scale=1.0), 200), ("ancestral", SamplerOptions(noise_scale=1.0), 200),
])
def test_end_distribution_matches_the_data(sampler, options, steps, shift):
    x = sample(gaussian_velocity(MU, SIGMA), sampler, {}, gaussian_noise(), steps, 1.0, shift, seed=1, options=options)
    assert (x.mean(0) - MU).abs().max() < 0.02
    assert (torch.cov(x.T) - SIGMA**2 * torch.eye(2, dtype=x.dtype)).abs().max() < 0.03


def test_predictor_corrector_matches_the_data_in_an_images_dimension():
    """Langevin's finite step biases the variance up by about snr² (2.6 % at 0.16) plus O(1/d) from
    per-image norms, against Euler's own −3 % at 100 steps; seen: +5 % in 64 dimensions. Sample
    error of a variance at n = 8000: 1.6 % (max over 64: ~5 %). So |var/sigma² − 1| < 0.15, its mean
    over dimensions within 0.1, and the mean within 0.03."""
    mu = torch.linspace(-1, 2, 64, dtype=torch.float64)
    x = sample(gaussian_velocity(mu, SIGMA), "pc", {}, gaussian_noise(8000, 64), 100, 1.0, seed=1)
    relative = torch.var(x, 0) / SIGMA**2 - 1
    assert (x.mean(0) - mu).abs().max() < 0.03
    assert relative.abs().max() < 0.15 and relative.mean().abs() < 0.1
    stronger = sample(gaussian_velocity(mu, SIGMA), "pc", {}, gaussian_noise(8000, 64), 100, 1.0, seed=1,
                      options=SamplerOptions(snr=0.5))
    assert torch.var(stronger, 0).mean() / SIGMA**2 - 1 > relative.mean() + 0.1  # the knob acts: a larger step, more bias


def ode_error(sampler: str, steps: int) -> float:
    noise = gaussian_noise(256)
    x = sample(gaussian_velocity(MU, SIGMA), sampler, {}, noise, steps, 1.0, 1.0)
    return (x - (MU + SIGMA * noise)).abs().max().item()  # the exact flow maps ε to mu + sigma·ε


def test_heun_converges_at_second_order_and_euler_at_first():
    heun_ratio = ode_error("heun", 10) / ode_error("heun", 20)
    euler_ratio = ode_error("euler", 10) / ode_error("euler", 20)
    assert heun_ratio > 3 and 1.5 < euler_ratio < 2.5, (heun_ratio, euler_ratio)
    assert ode_error("heun", 20) < ode_error("euler", 39) / 5  # at about equal evaluations (39), Heun is far closer


def test_zero_noise_is_euler():
    model, noise = gaussian_velocity(MU, SIGMA), gaussian_noise(64)
    reference = euler(model, noise, {}, 12, shift=2.0)
    sde = sample(model, "sde", {}, noise, 12, 1.0, 2.0, options=SamplerOptions(noise_scale=0.0))
    assert torch.equal(sde, reference)  # bit for bit
    ddim = sample(model, "ancestral", {}, noise, 12, 1.0, 2.0, options=SamplerOptions(noise_scale=0.0))
    torch.testing.assert_close(ddim, reference, atol=1e-6, rtol=0)
    grid = time_grid(6, 2.0)
    assert torch.equal(ancestral_times(grid[0], grid[1], 0.0), grid[1])
    assert ancestral_times(grid[0], grid[1], 1.0) == 0  # from t = 1, η = 1: all the way down to x0̂, then fresh noise


def test_guided_and_edited_like_euler():
    """Classifier-free guidance reaches every sampler; an edit starts from the image at the
    strength and keeps its unmasked region: exactly the image at the end."""
    def model(x, t, cond):
        drop = cond.get("drop", torch.zeros(x.shape[0], dtype=torch.bool))
        return torch.tanh(x) * t.view(-1, 1, 1, 1) + (~drop).float().view(-1, 1, 1, 1)

    latents, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    for sampler in ("heun", "sde", "ancestral", "pc"):
        out = sample(model, sampler, {}, noise, 6, 3.0, seed=[1, 2], edit=Edit(latents, 0.5, mask))
        assert torch.equal(out[..., 2:], latents[..., 2:]), sampler
        assert not torch.equal(sample(model, sampler, {}, noise, 4, 3.0, seed=[1, 2]), sample(model, sampler, {}, noise, 4, 1.0, seed=[1, 2]))
    with pytest.raises(ValueError, match="resample"):
        sample(model, "heun", {}, noise, 4, 1.0, edit=Edit(latents, 0.5, mask, resample=1))


@pytest.mark.parametrize("sampler,options", [("sde", SamplerOptions()), ("ancestral", SamplerOptions(noise_scale=0.7)),
                                             ("pc", SamplerOptions(corrector_steps=2)), ("consistency", SamplerOptions(gamma=0.5))])
def test_image_k_depends_on_its_own_seed_only(sampler, options):
    model = lambda x, t, cond: torch.tanh(x) * t.view(-1, 1, 1, 1) - 0.3  # noqa: E731
    seeds, shape = [5, 6, 7], (1, 4, 4)
    noise = randn_rows((3, *shape), image_generators(seeds))
    batch = sample(model, sampler, {}, noise, 5, 1.0, seed=seeds, options=options)
    alone = sample(model, sampler, {}, noise[1:2], 5, 1.0, seed=[6], options=options)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)
    other = sample(model, sampler, {}, noise, 5, 1.0, seed=[5, 9, 7], options=options)
    assert torch.equal(other[0], batch[0]) and not torch.equal(other[1], batch[1])  # a row's later draws are its own


class Counting(torch.nn.Module):
    """Counts forward calls and the rows they evaluate."""

    calls = rows = 0

    def forward(self, x, t, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde", "ancestral", "pc", "consistency"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_evaluations_counts_the_model_calls(sampler, guidance):
    options = SamplerOptions(corrector_steps=2)
    model = Counting()
    sample(model, sampler, {}, torch.randn(3, 2, 4, 4), 5, guidance, options=options)
    assert model.rows == 3 * evaluations(sampler, 5, guidance != 1.0, options)
    assert evaluations("heun", 13, True) == 50 and evaluations("pc", 13, False) == 25 and evaluations("euler", 25, True) == 50
    assert evaluations("consistency", 9, False, SamplerOptions(times=(0.75, 0.5))) == 3


def legacy_consistency(model, noise, cond, steps, shift, generator):
    """The multistep consistency sampler as it was before TCD's γ (its loop, verbatim)."""
    grid = time_grid(steps, shift, noise.device)
    ones = torch.ones(noise.shape[0], device=noise.device)
    x0 = consistency_fn(model, noise, grid[0] * ones, cond)
    for t_k in grid[1:-1]:
        fresh = randn_rows(noise.shape, generator, noise.dtype, noise.device)
        x0 = consistency_fn(model, (1 - t_k) * x0 + t_k * fresh, t_k * ones, cond)
    return x0


def test_tcd_gamma_one_is_the_consistency_sampler_and_zero_draws_nothing():
    model = lambda x, t, cond: torch.sin(x) * t.view(-1, 1, 1, 1) + 0.1 * x  # noqa: E731
    noise = torch.randn(3, 2, 4, 4)
    for steps, shift in ((4, 1.0), (7, 3.0)):
        new = consistency(model, noise, {}, steps, shift, continued_generators([1, 2, 3], (2, 4, 4)), gamma=1.0)
        old = legacy_consistency(model, noise, {}, steps, shift, continued_generators([1, 2, 3], (2, 4, 4)))
        assert torch.equal(new, old)  # bit for bit
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    deterministic = consistency(model, noise, {}, 4, 1.0, generator, gamma=0.0)
    assert torch.equal(generator.get_state(), state)  # no fresh draw
    assert torch.equal(deterministic, consistency(model, noise, {}, 4, 1.0, torch.Generator().manual_seed(9), gamma=0.0))
    half = consistency(model, noise, {}, 4, 1.0, torch.Generator().manual_seed(0), gamma=0.5)
    assert not torch.equal(half, deterministic) and not torch.equal(half, new)


def test_explicit_renoise_times_and_edm_sigmas():
    assert times_from_sigmas([60, 30, 15, 7, 3]) == pytest.approx([60 / 61, 30 / 31, 15 / 16, 7 / 8, 3 / 4])
    seen = []

    def model(x, t, cond):
        seen.append(round(t[0].item(), 6))
        return torch.zeros_like(x)

    sample(model, "consistency", {}, torch.randn(2, 3), 3, 1.0, 3.0, options=SamplerOptions(times=(0.75, 0.5)))
    assert seen == [1.0, 0.75, 0.5]  # the grid's start, then the times as given (unshifted)
    with pytest.raises(ValueError, match="2 re-noise times make 3"):
        sample(model, "consistency", {}, torch.randn(2, 3), 4, 1.0, options=SamplerOptions(times=(0.75, 0.5)))
    with pytest.raises(ValueError, match="strictly decreasing"):
        SamplerOptions(times=(0.5, 0.75))


def test_options_and_sampler_choice_are_checked():
    for bad in (dict(noise_scale=-1), dict(snr=0), dict(corrector_steps=0), dict(gamma=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplerOptions(**bad)
    with pytest.raises(ValueError, match="eta"):
        sample(lambda x, t, c: x, "ancestral", {}, torch.randn(2, 3), 2, 1.0, options=SamplerOptions(noise_scale=2.0))
    check_knobs("pc", ["snr", "corrector_steps"])
    with pytest.raises(ValueError, match="does not use gamma"):
        check_knobs("sde", ["gamma"])
    assert resolve_sampler("euler", "heun") == "heun" and resolve_sampler("consistency") == "consistency"
    for native, chosen in (("consistency", "sde"), ("euler", "consistency")):
        with pytest.raises(ValueError, match=f"sampler '{chosen}' does not fit"):
            resolve_sampler(native, chosen)
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'"):
        resolve_sampler("euler", "ddpm")
    assert set(SAMPLERS) == {"euler", "heun", "sde", "ancestral", "pc", "consistency"}


def test_heun_takes_any_velocity_on_any_grid():
    velocity = velocity_of(gaussian_velocity(MU, SIGMA), {}, 1.0)
    noise = gaussian_noise(16)
    grid = time_grid(8, 3.0)
    torch.testing.assert_close(heun(velocity, noise, grid), sample(gaussian_velocity(MU, SIGMA), "heun", {}, noise, 8, 1.0, 3.0))
    assert isinstance(sampler_generators([1, 2], (2,)), list)


# ------------------------------------------------------------------------------ CLI and diffusers
def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def test_sample_cli_takes_a_stochastic_sampler(teacher_dir, tmp_path):
    out = tmp_path / "grid.png"
    done = run_cli("pipeline.sample", "--model", str(teacher_dir), "--prompt", "a red circle", "--steps", "3",
                   "--sampler", "sde", "--noise-scale", "0.5", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "sde 3 steps, 6 evaluations/image" in done.stdout


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "ddpm"], "invalid choice: 'ddpm'"),
    (["--sampler", "consistency"], "does not fit this model"),
    (["--sampler", "heun", "--snr", "0.1"], "sampler 'heun' does not use --snr"),
    (["--gamma", "0.5"], "sampler 'euler' does not use --gamma"),
])
def test_a_bad_sampler_or_knob_is_one_line(teacher_dir, tmp_path, flags, message):
    done = run_cli("pipeline.sample", "--model", str(teacher_dir), "--prompt", "x", "--output", str(tmp_path / "g.png"), *flags)
    last = done.stderr.strip().splitlines()[-1]  # argparse's usage, then one error line
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith("python -m pipeline.sample: error:") and message in last, done.stderr


def test_evaluate_records_the_sampler_and_names_it(teacher_dir, image_shards, tmp_path):
    from pipeline.evaluation import evaluate

    out = tmp_path / "{sampler}_{steps}"
    assert evaluate.main(["--model", str(teacher_dir), "--reference", str(image_shards), "--count", "8", "--steps", "3",
                          "--guidance", "2", "--output", str(out), "--sampler", "heun", "--pixels", "--batch-size", "4"]) == 0
    summary = json.loads((tmp_path / "heun_3/summary.json").read_text())
    assert (summary["sampler"], summary["sampler_options"], summary["nfe"]) == ("heun", {}, 10)  # (2·3 − 1)·2
    assert summary["diversity"]["pixels"]["fd"] >= 0  # FD in every feature space with a reference
    assert "| pixels" in (tmp_path / "heun_3/report.md").read_text()


def test_diffusers_pipeline_guides_a_consistency_model_without_a_guidance_input(teacher_dir, latent_shards, tmp_path):
    """A teacher-free consistency model is a plain DiT (no ``guidance_embed``) whose folder names
    the consistency sampler: both pipelines guide its velocity with CFG, to 1e-5 (the σ grids
    differ by an ulp, ``tests/test_diffusers_pipeline.py``)."""
    from pipeline.data.model_folder import export_model
    from pipeline.inference.diffusers_pipeline import LatentDiffusionPipeline
    from pipeline.inference.pipeline import TextToImage
    from pipeline.models.student import load_teacher

    meta = json.loads((latent_shards / "dataset.json").read_text())
    folder = export_model(tmp_path / "ct", load_teacher(teacher_dir), meta, {"sampler": "consistency", "sampling": {"steps": 2}})
    prompts, seeds = ["a large red circle at the center on a white background", "a small blue square"], [3, 4]
    ours = TextToImage.from_folder(folder)
    assert not ours.transformer.config.get("guidance_embed")
    for steps in (1, 3):
        expected = ours.latents(prompts, steps, 4.0, 1.0, seeds)
        theirs = LatentDiffusionPipeline.from_pretrained(folder)(prompts, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                                                                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.latents(prompts, 3, 1.0, 1.0, seeds), expected)  # guidance acts on it
    assert ours.evaluations(3, 4.0) == 6  # CFG on its velocity: two rows per step
