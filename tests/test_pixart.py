"""PixArt-Σ (diffusers' ``PixArtTransformer2DModel``) as a model profile of our trainer
(``model.architecture=pixart``, ``pipeline.models.pixart``).

Checked: a fresh model outputs zero (PixArt's initialisation); the adapter calls the transformer
with ``timestep = t·1000`` and replaces a dropped row's text by the T5 encoding of ``""``; stock
``PixArtSigmaPipeline`` (flow DPM-Solver++, built in memory from the tiny encoders) samples what our
Euler sampler samples from the same noise; the profile trains in one process (fp32, and bf16 with
gradient checkpointing), its loss falls over 20 steps, a run resumed at step 10 logs the same
losses and ends with the same EMA, and the export is a plain ``PixArtTransformer2DModel`` holding
the EMA; a 2-process ZeRO-3 bf16 cell with accumulation (in the one launch) resumes exactly too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.models.pixart import PixArt, build_pixart
from tests import jobs

STEPS, RESUME_AT = 20, 10
PROMPTS = ["a large red circle at the center on a white background", "a small blue square at the top left"]


def tiny(seed: int = 0) -> PixArt:
    torch.manual_seed(seed)
    return build_pixart("PixArt-tiny", in_channels=4, sample_size=8, caption_channels=64)


@torch.no_grad()
def perturbed(model: PixArt, seed: int = 1) -> PixArt:
    """Random non-zero weights whose velocity is smooth in ``t``, as a trained model's is: noise on
    every weight, then the timestep MLP's inputs of frequency above 20 rad per unit of ``t`` cut
    (``Timesteps(256)`` of ``1000·t`` reach 1000 rad per unit: random weights on those make an
    ODE that no 200-step solver resolves, and the comparison would measure the solvers, not us)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    w = model.transformer.adaln_single.emb.timestep_embedder.linear_1.weight  # (D, 256): [cos | sin] of 128 frequencies
    fast = 1000 * torch.exp(-math.log(10000) * torch.arange(128) / 128) > 20  # (128,)
    w[:, :128][:, fast] = 0
    w[:, 128:][:, fast] = 0
    return model.eval()


@pytest.fixture(scope="module")
def t5(tiny_text_encoders_dir):
    from pipeline.encoders.t5 import FrozenT5, T5EncoderConfig

    return FrozenT5(T5EncoderConfig(path=str(tiny_text_encoders_dir / "t5")))


def with_null(model: PixArt, t5) -> PixArt:
    embeddings, mask = t5.encode([""])  # (1, L0, D), (1, L0)
    model.set_null(embeddings[0], mask[0])
    return model


def test_a_fresh_pixart_outputs_zero():
    model = tiny()
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 64)
    assert torch.equal(model(x, t, {"t5": text, "t5_mask": torch.ones(2, 5, dtype=torch.bool)}), torch.zeros_like(x))


def test_the_adapter_scales_time_and_drops_to_the_empty_prompt(t5):
    """``v = transformer(x, 1000·t, text)``; a dropped row is the transformer on the encoding of ""
    (its mask included), a kept row is untouched; CLIP keys are ignored."""
    model = with_null(perturbed(tiny()), t5)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    text, mask = t5.encode(PROMPTS)  # (2, L, D), (2, L)
    null, null_mask = t5.encode(["", ""])

    def direct(tokens, keys):
        return model.transformer(x, encoder_hidden_states=tokens, timestep=1000 * t, encoder_attention_mask=keys,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    with torch.no_grad():
        kept = model(x, t, {"t5": text, "t5_mask": mask, "clip": torch.randn(2, 64)})
        mixed = model(x, t, {"t5": text, "t5_mask": mask, "drop": torch.tensor([True, False])})
        torch.testing.assert_close(kept, direct(text, mask), rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[0], direct(null, null_mask)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[1], kept[1], rtol=0, atol=1e-5)


def test_stock_pixart_sigma_pipeline_samples_what_our_euler_samples(t5, tiny_vae_dir):
    """The same noise through stock ``PixArtSigmaPipeline`` (flow DPM-Solver++(2M), 50 steps, shift
    3, negative prompt "") and through ``samplers.euler`` (200 steps) at guidance 4.5: both solve
    the same guided probability-flow ODE, so they differ by their discretisation errors only.

    Tolerance: each solver's error is estimated by halving its step (Euler 100 vs 200 steps, DPM
    50 vs 100): for a first-order method the error of N steps is ≈ |x_N − x_2N| (Euler; DPM-Solver
    here is close to first order too, as the pipeline floors ``σ·1000`` to integer timesteps), so
    the two results must agree within 2 × the sum of the two halving differences. Measured: 0.012
    against a bound of 0.030 (latents of scale 4.2); without guidance the result is off by 1.28,
    and another null text (the T5 encoding of a word instead of "") by ~0.7."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from pipeline.diffusion.samplers import euler

    model = with_null(perturbed(tiny()), t5)
    shift, guidance = 3.0, 4.5
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    pipe = PixArtSigmaPipeline(tokenizer=t5.tokenizer, text_encoder=t5.model, vae=AutoencoderKL.from_pretrained(tiny_vae_dir),
                               transformer=model.transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def stock(steps: int) -> torch.Tensor:
        return pipe(PROMPTS, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                    height=32, width=32, output_type="latent", use_resolution_binning=False, max_sequence_length=128,
                    clean_caption=False).images

    text, mask = t5.encode(PROMPTS)
    cond = {"t5": text, "t5_mask": mask}
    ours = {n: euler(model, noise, cond, steps=n, guidance=guidance, shift=shift) for n in (100, 200)}
    theirs = {n: stock(n) for n in (50, 100)}
    bound = 2 * ((ours[100] - ours[200]).abs().max() + (theirs[50] - theirs[100]).abs().max())
    gap = (theirs[50] - ours[200]).abs().max()
    assert gap <= bound, f"stock vs ours {gap:.4f} > {bound:.4f}"
    assert bound < 0.05 * theirs[50].abs().max(), "the solvers themselves disagree: the test would not discriminate"
    unguided = euler(model, noise, cond, steps=100, guidance=1.0, shift=shift)
    assert (theirs[50] - unguided).abs().max() > 10 * bound, "guidance made no difference: the test would not discriminate"


# ---------------------------------------------------------------------------- training through the trainer


def one_process_jobs(precision: str, latents: Path, out: Path) -> list[dict]:
    """A 20-step one-process run of the PixArt profile checkpointing at 10 and 20, and its copy resumed at 10."""
    name = f"pixart-one-{precision}"
    extra = ["model.gradient_checkpointing=true"] if precision == "bf16" else []
    common = [f"data.latents={latents}", f"output_dir={out}", *jobs.PIXART, *extra, *jobs.MODES["one"], f"mixed_precision={precision}",
              "data.loader.batch_size=8", "optim.lr=2e-3", "optim.warmup_steps=2", f"steps={STEPS}", f"checkpoint.every={RESUME_AT}",
              "checkpoint.keep=5", "logging.every=1", "sampling.prompts=[]", "ema.decay=0.9"]
    return [jobs.job(name, "train", [*common, f"run={name}"]),
            jobs.job(f"{name}-resumed", "train", [*common, f"run={name}-resumed"], resume_from={"run": str(out / name), "step": RESUME_AT})]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_export_is_the_ema(run: Path, step: int) -> None:
    """``RUN/model/transformer`` is a plain diffusers PixArt folder holding the EMA (keys ``transformer.*``)."""
    from diffusers import PixArtTransformer2DModel

    exported = PixArtTransformer2DModel.from_pretrained(run / "model/transformer").state_dict()
    ema = load_file(str(run / f"checkpoints/step-{step:06d}/ema.safetensors"))
    assert {f"transformer.{k}" for k in exported} == set(ema)
    assert all(np.array_equal(v.numpy(), ema[f"transformer.{k}"]) for k, v in exported.items())


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_pixart_trains_and_resumes_exactly_in_one_process(precision, latent_shards, tmp_path):
    for spec in one_process_jobs(precision, latent_shards, tmp_path):
        result = jobs.run_job(spec)
        assert result["ok"], result["error"]
    name = f"pixart-one-{precision}"
    full, resumed = metrics(tmp_path / name), metrics(tmp_path / f"{name}-resumed")
    losses = [m["loss"] for m in full]
    assert [m["step"] for m in full] == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert [m["loss"] for m in resumed if m["step"] > RESUME_AT] == losses[RESUME_AT:], "the resumed run drifted"
    a, b = (load_file(str(tmp_path / run / f"checkpoints/step-{STEPS:06d}/ema.safetensors")) for run in (name, f"{name}-resumed"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    check_export_is_the_ema(tmp_path / name, STEPS)
    if precision == "no":
        check_stock_pixart_loads_the_export(tmp_path / name / "model")


def check_stock_pixart_loads_the_export(folder: Path) -> None:
    """The export is a stock ``PixArtSigmaPipeline`` folder (no custom code): it loads, samples with
    its flow DPM-Solver++ at the run's shift; our own ``TextToImage`` reads the same folder and, on
    the same noise and guidance, lands where the stock pipeline does (both solve one ODE: 20
    DPM-Solver++ steps against 100 Euler steps agree to a few hundredths on this smooth, barely trained model)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from pipeline.inference.pipeline import TextToImage

    index = json.loads((folder / "model_index.json").read_text())
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.flow_shift == index["info"]["sampling"]["shift"]
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    stock = pipe(PROMPTS[:2], negative_prompt="", num_inference_steps=20, guidance_scale=3.0, latents=noise.clone(), height=32,
                 width=32, output_type="latent", use_resolution_binning=False, clean_caption=False,
                 max_sequence_length=index["info"]["max_sequence_length"]).images
    ours = TextToImage.from_folder(folder).latents(PROMPTS[:2], 100, 3.0, index["info"]["sampling"]["shift"], noise=noise)
    assert (stock - ours).abs().max() < 0.05 * ours.abs().max(), (stock - ours).abs().max()


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_pixart_under_zero3_in_bf16_resumes_exactly(launched_jobs):
    from tests.test_matrix import check_run_and_resume

    name = "pixart-" + jobs.cell_name(*jobs.PIXART_CELL)
    check_run_and_resume(launched_jobs, name, 2)
    check_export_is_the_ema(launched_jobs / name, jobs.CELL_STEPS)
    assert (launched_jobs / name / "samples/final.png").is_file()  # the grid sampled the EMA PixArt with guidance


# ---------------------------------------------------------------------------- configuration


def test_pixart_options_are_checked():
    from pipeline.config import ConfigError
    from pipeline.training.dit import fresh_pixart
    from pipeline.training.dit_config import ModelConfig, TrainConfig

    with pytest.raises(ValueError, match="unknown pixart model 'DiT-tiny'"):
        ModelConfig(architecture="pixart")
    with pytest.raises(ValueError, match="qk_norm is a DiT option"):
        ModelConfig(architecture="pixart", name="PixArt-tiny", qk_norm=True)
    cfg = TrainConfig(model=ModelConfig(architecture="pixart", name="PixArt-tiny"))
    meta = {"latent_shape": [4, 8, 8], "text_encoders": {"t5": None, "clip": {"width": 64}}}
    with pytest.raises(ConfigError, match="reads T5 token embeddings") as err:
        fresh_pixart(cfg, meta)
    assert "\n" not in str(err.value)
