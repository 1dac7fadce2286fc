"""pipeline.train_autoencoder: the losses by hand, a smoke run that exports a loadable VAE with
measured factors, exact resume across the discriminator's start, one-line config errors, and fp16
loss scaling per optimizer (skipped steps, the discriminator's accumulated gradients)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file

from pipeline import train_autoencoder
from pipeline.training.autoencoder_losses import adaptive_weight
from pipeline.training.gan_losses import hinge_d_loss
from tests.helpers import ROOT


def test_hinge_loss_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> mean 0.25; fake: relu(1 - 2) = 0, relu(1 + 0) = 1 -> 0.5
    assert hinge_d_loss(real, fake).item() == 0.5 * (0.25 + 0.5)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gan = (3 * w).sum(), (w**2).sum()  # grads (3, 3) and (2, 4)
    expected = np.hypot(3, 3) / (np.hypot(2, 4) + 1e-4)
    assert abs(adaptive_weight(rec, gan, w).item() - expected) < 1e-5


def args(shards, out, *extra):
    tiny = ["model.block_out_channels=[32, 32]", "data.held_out=8", "factor_samples=32", "data.loader.batch_size=8"]
    return [f"data.shards={shards}", f"output_dir={out}", "run=ae", "eval_every=2", "logging.every=1", *tiny, *extra]


def test_smoke_run_exports_a_loadable_vae_with_measured_factors(image_shards, tmp_path):
    assert train_autoencoder.main(args(image_shards, tmp_path, "steps=4", "loss.disc_start=2")) == 0
    run = tmp_path / "ae"
    vae = AutoencoderKL.from_pretrained(run / "vae")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert np.isfinite(scale) and np.isfinite(shift) and scale > 0
    report = json.loads((run / "eval.json").read_text())
    assert report["psnr_held_out"] == pytest.approx(held_out_psnr(vae, image_shards), abs=1e-3) and report["scaling_factor"] == scale
    assert (run / "reconstructions.png").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4] and (run / "val_loss.png").exists()  # eval_every=2
    assert lines[-1]["psnr_held_out_64"] == pytest.approx(report["psnr_held_out"], abs=1e-4)  # all 8 held out, the final weights


def held_out_psnr(vae: AutoencoderKL, shards) -> float:
    """PSNR of the exported VAE's round trip (posterior mean) of the 8 held-out images, computed here."""
    from pipeline.data.latents import shard_list
    from pipeline.data.quality import psnr
    from pipeline.training.autoencoder import held_out_images

    x = held_out_images(shard_list(shards)[-1], 8, 32)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float(psnr(recon, x).mean())


def test_resume_equals_an_uninterrupted_run(image_shards, tmp_path):
    same = ["loss.disc_start=3", "checkpoint.every=3", "checkpoint.keep=5"]
    assert train_autoencoder.main(args(image_shards, tmp_path / "full", "steps=6", *same)) == 0
    assert train_autoencoder.main(args(image_shards, tmp_path / "part", "steps=3", *same)) == 0
    assert train_autoencoder.main(args(image_shards, tmp_path / "part", "steps=6", *same)) == 0
    for name in ("accelerate/model.safetensors", "accelerate/model_1.safetensors"):  # the VAE (in its reconstruction module), the discriminator
        a, b = (load_file(str(tmp_path / d / "ae/checkpoints/step-000006" / name)) for d in ("full", "part"))
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_bad_key_is_one_line():
    result = subprocess.run([sys.executable, "-m", "pipeline.train_autoencoder", "loss.kl_wieght=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "kl_wieght" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_too_few_shards_is_one_line(image_shards, tmp_path, capsys):
    (tmp_path / "one").mkdir()
    first = sorted(image_shards.glob("*.tar"))[0]
    (tmp_path / "one" / first.name).write_bytes(first.read_bytes())
    assert train_autoencoder.main(args(image_shards, tmp_path, "steps=1", f"data.shards={tmp_path / 'one'}")) == 2
    err = capsys.readouterr().err
    assert "config error: data.shards" in err and "need at least 2" in err and len(err.strip().splitlines()) == 1


def test_two_process_run_trains_and_exports(image_shards, tmp_path):
    from tests.helpers import accelerate_launch

    result = accelerate_launch(["-m", "pipeline.train_autoencoder", *args(image_shards, tmp_path, "steps=2", "loss.disc_start=1")])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "ae/checkpoints/step-000002"
    assert (ckpt / "data_rank0.json").exists() and (ckpt / "data_rank1.json").exists()
    trained = load_file(str(ckpt / "accelerate/model.safetensors"))  # the reconstruction module at step 2: vae.*
    exported = AutoencoderKL.from_pretrained(tmp_path / "ae/vae").state_dict()
    assert exported and all(np.array_equal(trained[f"vae.{k}"], v.numpy()) for k, v in exported.items())


def test_reconstruction_samples_the_posterior_or_takes_its_mean():
    from pipeline.models.autoencoder import AutoencoderModelConfig, Reconstruction, build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderModelConfig(block_out_channels=[32, 32]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean_a, kl = Reconstruction(vae, sample_posterior=False)(x)
    mean_b, _ = Reconstruction(vae, sample_posterior=False)(x)
    sampled, _ = Reconstruction(vae)(x)
    assert torch.equal(mean_a, mean_b) and not torch.equal(mean_a, sampled)
    assert kl.shape == (2,) and (kl > 0).all()


def test_discriminator_size_is_the_loss_sections(image_shards, tmp_path, capsys):
    """``loss.disc_channels`` / ``loss.disc_layers`` (taming's disc_ndf / disc_num_layers) build the
    patch-GAN that trains and is checkpointed; a zero is one line naming them."""
    extra = ["steps=2", "loss.disc_start=1", "loss.disc_channels=16", "loss.disc_layers=3", "checkpoint.every=2"]
    assert train_autoencoder.main(args(image_shards, tmp_path, *extra)) == 0
    disc = load_file(str(tmp_path / "ae/checkpoints/step-000002/accelerate/model_1.safetensors"))
    convs = sorted((k for k in disc if k.endswith("weight") and disc[k].ndim == 4), key=lambda k: int(k.split(".")[1]))
    assert [disc[k].shape[0] for k in convs] == [16, 32, 64, 128, 1]  # widths double per layer, one logit map
    capsys.readouterr()  # the run's progress bar
    with pytest.raises(SystemExit) as info:
        train_autoencoder.main(args(image_shards, tmp_path / "bad", "steps=1", "loss.disc_layers=0"))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "disc_layers" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- fp16 loss scaling (torch's GradScaler)


def probed_trainer(image_shards, out, *extra: str):
    """An ``AutoencoderTrainer`` under fp16 with torch's loss scaler (``tests.jobs.loss_scaler``, on
    the CPU too) that records the gradients each optimizer applies (``applied["g"|"d"]``, after
    unscaling and clipping), the counters at each window's start (``windows``), and turns a
    network's gradients into inf before its update when asked (``poison``: a set of ``(network,
    step)``, each used once). The discriminator's BatchNorm is in eval mode: with batch statistics
    a batch of 8 and two of 4 differ by design."""
    from pipeline.config import load_config
    from pipeline.training.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer
    from tests import jobs

    class Probed(AutoencoderTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.accelerator.unwrap_model(self.disc).eval()
            self.applied, self.poison, self.windows = {}, set(), []
            for name, opt in (("g", self.opt_g), ("d", self.opt_d)):
                opt.optimizer.register_step_pre_hook(lambda o, args, kwargs, name=name: self.applied.__setitem__(
                    name, [p.grad.detach().clone() for group in o.param_groups for p in group["params"]]))

        def micro_step(self, batch):
            if self.micro == 0:
                self.windows.append((self.step, *(self.schedules[s].last_epoch for s in ("sched_g", "sched_d")),
                                     self.overflow_steps, self.disc_overflow_steps))
            return super().micro_step(batch)

        def update(self, model, optimizer, scheduler):
            key = ("g" if optimizer is self.opt_g else "d", self.step)
            if key in self.poison:
                self.poison.discard(key)
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))
            return super().update(model, optimizer, scheduler)

    jobs._reset_accelerate()
    overrides = args(image_shards, out, "mixed_precision=fp16", "loss.sample_posterior=false", "factor_samples=16", "eval_every=0", *extra)
    with jobs.loss_scaler():
        trainer = Probed(load_config(AutoencoderTrainConfig, None, overrides))
    assert trainer.accelerator.scaler.get_scale() == jobs.LOSS_SCALE
    return trainer


def test_each_optimizer_skips_its_own_overflowing_step(image_shards, tmp_path):
    """fp16: an overflowing generator step is skipped and counted (``overflow_steps``): the step
    counter and the generator's schedule stay, the discriminator steps; an overflowing
    discriminator step skips its own schedule only (``disc_overflow_steps``)."""
    from tests import jobs

    trainer = probed_trainer(image_shards, tmp_path, "steps=3", "loss.disc_start=1", "checkpoint.every=3")
    trainer.poison = {("g", 1), ("d", 2)}
    trainer.fit()
    # at each window's start: step, generator / discriminator schedule steps, overflow_steps, disc_overflow_steps
    assert trainer.windows == [(0, 0, 0, 0, 0), (1, 1, 0, 0, 0), (1, 1, 1, 1, 0), (2, 2, 2, 1, 0)]
    assert (trainer.step, trainer.schedules["sched_g"].last_epoch, trainer.schedules["sched_d"].last_epoch) == (3, 3, 2)
    lines = [json.loads(line) for line in (tmp_path / "ae/metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["overflow_steps"], m["disc_overflow_steps"]) for m in lines] == [(1, 0, 0), (2, 1, 0), (3, 1, 1)]
    state = json.loads((tmp_path / "ae/checkpoints/step-000003/train_state.json").read_text())
    assert (state["overflow_steps"], state["disc_overflow_steps"]) == (1, 1)
    jobs._reset_accelerate()


def test_discriminator_gradient_with_accumulation_is_the_large_batch_one(image_shards, tmp_path):
    """fp16 loss scaling, clipping and accumulation 2 against one batch of twice the size: the
    discriminator's gradient its optimizer applies is the same (unscaled once, by its own optimizer,
    though the generator's update ran between its micro-batches), also when the generator's step
    overflowed there and the scaler backed off mid-window."""
    from tests import jobs

    clip = ["optim.grad_clip=1e-3", "loss.disc_start=0"]
    large = probed_trainer(image_shards, tmp_path / "large", "data.loader.batch_size=8", *clip)
    batch = next(iter(large.loader))
    large.micro_step(batch)
    scale = max(g.abs().max().item() for g in large.applied["d"])  # fp32 sums in another order: 1e-4 of the largest entry
    # (1.004e-5 was seen on one CPU; a wrong accumulation, a half or a doubled step, is off by the entries themselves)
    assert scale > 0
    for poison in (set(), {("g", 0)}):
        small = probed_trainer(image_shards, tmp_path / f"small{len(poison)}", "data.loader.batch_size=4", "optim.grad_accum=2", *clip)
        small.poison = set(poison)
        small.micro_step({k: v[:4] for k, v in batch.items()})
        small.micro = 1
        small.micro_step({k: v[4:] for k, v in batch.items()})
        assert ("g" in small.applied) == (not poison) and small.accelerator.scaler.get_scale() == jobs.LOSS_SCALE / (2 if poison else 1)
        for big, got in zip(large.applied["d"], small.applied["d"], strict=True):
            assert (got - big).abs().max().item() <= 1e-4 * scale, f"poison {poison}"
    jobs._reset_accelerate()
