"""The exported model folder is a diffusers pipeline (``pipeline.data.model_folder``,
``pipeline.inference.diffusers_pipeline``): it loads with ``LatentDiffusionPipeline.from_pretrained``
and with stock diffusers' ``custom_pipeline`` route, reproduces our own sampler, takes diffusers'
flow schedulers, and its components load with their libraries' own classes.

Tolerance of the round trips: the pipeline makes the same model calls on the same batches as
``TextToImage`` (the guided batch [cond; null], the same per-image noise streams). Only the σ grid
is computed apart: the scheduler shifts ``linspace(1, 1/n, n)`` in float64 NumPy and hands the model
``timestep / 1000``, ours shifts in float32 torch, so each σ may differ by an ulp (6e-8). Over 50
Euler steps that moves the latents by far less than 1e-5 (seen: 3e-8 on latents of size ~3), so
the tests allow ``atol = 1e-5``; a convention error (σ reversed, a velocity sign, a missed shift)
moves them by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.model_folder import export_model
from pipeline.inference.diffusers_pipeline import LatentDiffusionPipeline
from pipeline.inference.pipeline import TextToImage
from pipeline.models.student import load_teacher, student_from

PROMPTS = ["a large red circle at the center on a white background", "a small blue square at the top left on a black background"]
SEEDS = [3, 4]
TOL = {"atol": 1e-5, "rtol": 0.0}


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def pipe_latents(pipe, steps: int, guidance: float = 4.0, **kwargs) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators(), output_type="latent",
                **kwargs).images


@pytest.fixture(scope="module")
def student_dir(teacher_dir, latent_shards, tmp_path_factory) -> Path:
    """The teacher as a fresh consistency student (zero guidance embedding), exported."""
    meta = json.loads((latent_shards / "dataset.json").read_text())
    folder = tmp_path_factory.mktemp("student") / "model"
    extra = {"kind": "consistency_student", "sampler": "consistency", "teacher": str(teacher_dir),
             "sampling": {"steps": 4, "guidance": 4.0, "shift": 2.0}}
    return export_model(folder, student_from(load_teacher(teacher_dir)), meta, extra)


@pytest.fixture(scope="module")
def teacher_pipe(teacher_dir):
    return LatentDiffusionPipeline.from_pretrained(teacher_dir)


def test_the_teacher_reproduces_our_sampler_at_50_steps(teacher_dir, teacher_pipe):
    ours = TextToImage.from_folder(teacher_dir).latents(PROMPTS, 50, 4.0, 1.0, SEEDS)
    theirs = pipe_latents(teacher_pipe, 50)
    torch.testing.assert_close(theirs, ours, **TOL)
    images = teacher_pipe(PROMPTS, num_inference_steps=2, generator=generators()).images
    assert [im.size for im in images] == [(32, 32)] * 2  # the model's own size: its latent 8x8 × the VAE's 4


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_students_reproduce_the_consistency_sampler(student_dir, steps):
    """At shift 2 (the student's scheduler carries it): the grid, the fresh noise per step and image."""
    ours = TextToImage.from_folder(student_dir).latents(PROMPTS, steps, 4.0, 2.0, SEEDS)
    theirs = pipe_latents(LatentDiffusionPipeline.from_pretrained(student_dir), steps)
    torch.testing.assert_close(theirs, ours, **TOL)
    if steps == 4:
        with pytest.raises(ValueError, match="no negative prompt"):
            pipe_latents(LatentDiffusionPipeline.from_pretrained(student_dir), 1, negative_prompt="x")


def test_flow_schedulers_swap_in_and_stay_close_to_euler(teacher_dir, teacher_pipe):
    """DPM-Solver++ (flow sigmas, as Sana ships) and Heun solve the same ODE as Euler: at 50 steps
    they land within a few thousandths of it (Euler's own error at 50 steps is of that order)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    euler = pipe_latents(teacher_pipe, 50)
    swaps = [DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0),
             FlowMatchHeunDiscreteScheduler(shift=1.0)]
    original = teacher_pipe.scheduler
    try:
        for scheduler in swaps:
            teacher_pipe.scheduler = scheduler
            other = pipe_latents(teacher_pipe, 50)
            assert (other - euler).abs().max() < 0.01 * euler.abs().max(), type(scheduler).__name__
        teacher_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # another shift: our sampler at shift 3
        shifted = pipe_latents(teacher_pipe, 4)
    finally:
        teacher_pipe.scheduler = original
    torch.testing.assert_close(shifted, TextToImage.from_folder(teacher_dir).latents(PROMPTS, 4, 4.0, 3.0, SEEDS), **TOL)


def test_time_and_velocity_conventions():
    """Diffusers' σ = 1 is noise and the model gets ``timestep = σ·1000``; the exported scheduler's
    σ grid is our ``time_grid``; its Euler step with our velocity ``v = ε − x0`` from our
    ``x_t = (1 − t)·x0 + t·ε`` walks onto the data; dynamic shifting with ``mu = log s`` is the
    static shift ``s`` (SD3's resolution shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.diffusion.flow import interpolate, velocity
    from pipeline.diffusion.samplers import time_grid

    steps, shift = 6, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps))
    torch.testing.assert_close(scheduler.sigmas, time_grid(steps, shift), atol=1e-6, rtol=0)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=float(np.log(shift)))
    torch.testing.assert_close(dynamic.sigmas, scheduler.sigmas)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x = noise  # σ_0 = 1: pure noise
    for timestep in scheduler.timesteps:
        sigma = timestep / 1000
        torch.testing.assert_close(x, interpolate(x0, noise, sigma.expand(2)), atol=1e-5, rtol=0)  # on the path at σ
        x = scheduler.step(velocity(x0, noise), timestep, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_the_folder_loads_with_each_librarys_own_classes(teacher_dir, latent_shards):
    """Every component is where diffusers looks and loads with its own class; the VAE config holds
    the latents' factors; the CLIP component is a ``from_pretrained`` class."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, T5EncoderModel

    from pipeline.encoders.clip_component import OpenCLIPTextEncoder
    from pipeline.encoders.vae import FrozenVAE, VAEConfig

    index = json.loads((teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline" and index["transformer"] == ["pipeline.models.dit", "DiT"]
    meta = json.loads((latent_shards / "dataset.json").read_text())
    source = FrozenVAE(VAEConfig(**{k: v for k, v in meta["config"]["vae"].items() if k != "path"},
                                 path=str((latent_shards / meta["config"]["vae"]["path"]).resolve())))
    vae = AutoencoderKL.from_pretrained(teacher_dir / "vae")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (source.scaling_factor, source.shift_factor)
    assert T5EncoderModel.from_pretrained(teacher_dir / "text_encoder").config.d_model == meta["text_encoders"]["t5"]["width"]
    assert AutoTokenizer.from_pretrained(teacher_dir / "tokenizer")("a red circle")["input_ids"][-1] == 1  # T5's </s>
    clip = OpenCLIPTextEncoder.from_pretrained(teacher_dir / "text_encoder_2")
    assert clip.encode(["a red circle"])["pooled"].shape == (1, meta["text_encoders"]["clip"]["width"])
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(teacher_dir / "scheduler").config.shift == 1.0


def test_overridden_factors_reach_the_exported_vae_and_referenced_encoders_load(teacher_dir, latent_shards, tmp_path):
    """A VAE scaling factor given in the latents' config (not the VAE's own) is written into the
    exported ``vae/config.json``, the source untouched (the weights are hard links); with
    ``encoders="reference"`` nothing is copied and the pipeline loads them from where they are,
    sampling exactly as the copied export."""
    meta = json.loads((latent_shards / "dataset.json").read_text())
    source_config = (latent_shards / meta["config"]["vae"]["path"] / "config.json").resolve()
    before = source_config.read_text()
    meta["config"]["vae"] = {**meta["config"]["vae"], "path": str(source_config.parent), "scaling_factor": 0.25}
    copied = export_model(tmp_path / "copied", load_teacher(teacher_dir), meta)
    assert json.loads((copied / "vae/config.json").read_text())["scaling_factor"] == 0.25
    assert source_config.read_text() == before
    referenced = export_model(tmp_path / "referenced", load_teacher(teacher_dir), meta, encoders="reference")
    index = json.loads((referenced / "model_index.json").read_text())
    assert index["vae"] == index["text_encoder"] == index["text_encoder_2"] == [None, None]
    assert not (referenced / "vae").exists() and not (referenced / "text_encoder").exists()
    pipes = [LatentDiffusionPipeline.from_pretrained(folder) for folder in (copied, referenced)]
    assert pipes[1].vae.config.scaling_factor == 0.25
    a, b = (pipe(PROMPTS, num_inference_steps=2, generator=generators(), output_type="np").images for pipe in pipes)
    assert np.array_equal(a, b)


def test_a_negative_prompt_replaces_the_null_condition(teacher_pipe):
    """``v_neg + g·(v_cond − v_neg)``: with the prompts themselves as negatives, any ``g`` gives the
    unguided result (the null condition would not)."""
    unguided = pipe_latents(teacher_pipe, 3, guidance=1.0)
    torch.testing.assert_close(pipe_latents(teacher_pipe, 3, guidance=4.0, negative_prompt=PROMPTS), unguided, **TOL)
    with pytest.raises(ValueError, match="negative prompts for"):
        pipe_latents(teacher_pipe, 3, negative_prompt=["a", "b", "c"])


def test_stock_diffusers_loads_the_folder_by_its_custom_pipeline(teacher_dir, tmp_path):
    """``DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline="latent_diffusion_pipeline")`` in a
    process that imports only diffusers: refused without ``trust_remote_code`` (diffusers 0.42 runs
    no local module without it), then the same latents as our own sampler."""
    out = tmp_path / "latents.safetensors"
    script = f"""
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
assert not [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]
try:
    DiffusionPipeline.from_pretrained({str(teacher_dir)!r}, custom_pipeline="latent_diffusion_pipeline")
    raise SystemExit("loaded without trust_remote_code")
except ValueError as err:
    assert "trust_remote_code" in str(err), err
pipe = DiffusionPipeline.from_pretrained({str(teacher_dir)!r}, custom_pipeline="latent_diffusion_pipeline", trust_remote_code=True)
gens = [torch.Generator().manual_seed(s) for s in {SEEDS!r}]
latents = pipe({PROMPTS!r}, num_inference_steps=8, guidance_scale=4.0, generator=gens, output_type="latent").images
save_file({{"latents": latents.contiguous()}}, {str(out)!r})
print(type(pipe).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "LatentDiffusionPipeline"
    ours = TextToImage.from_folder(teacher_dir).latents(PROMPTS, 8, 4.0, 1.0, SEEDS)
    torch.testing.assert_close(load_file(out)["latents"], ours, **TOL)


def test_a_lora_file_loads_into_the_exported_pipeline_and_fuses(teacher_dir, tmp_path):
    """``pytorch_lora_weights.safetensors`` as training writes it (``pipeline.training.lora``) loads
    with ``pipe.load_lora_weights`` on the exported teacher; the pipeline then samples what the
    model with the adapter samples, and ``fuse_lora`` + unloading leaves a plain DiT that does too."""
    from pipeline.training.dit_config import LoraConfig
    from pipeline.training.lora import add_lora, save_adapter

    torch.manual_seed(0)
    adapted = add_lora(load_teacher(teacher_dir).requires_grad_(True), LoraConfig(rank=4, targets="all_linear"))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained adapter (B starts at zero)
    save_adapter(tmp_path / "lora", adapted)
    pipe = LatentDiffusionPipeline.from_pretrained(teacher_dir)
    before = pipe_latents(pipe, 3)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = pipe_latents(pipe, 3)
    assert (with_lora - before).abs().max() > 5e-5  # the adapter acts (a 6-step teacher: its adaLN gates are still near zero)
    reference = LatentDiffusionPipeline.from_pretrained(teacher_dir, transformer=adapted.eval())
    torch.testing.assert_close(with_lora, pipe_latents(reference, 3), **TOL)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not [k for k in pipe.transformer.state_dict() if "lora" in k]
    torch.testing.assert_close(pipe_latents(pipe, 3), with_lora, atol=1e-4, rtol=0)
