"""The autoencoder recipe (``pipeline.train_autoencoder``): an ``AutoencoderKL`` trained on image
shards with the latent-diffusion recipe, on the training core (``pipeline.training.core``).

References: Rombach et al. 2022 (the KL-regularised autoencoder); Esser et al. 2021 (patch-GAN,
hinge loss, the adaptive generator weight). Losses: ``pipeline.training.autoencoder_losses``;
networks: ``pipeline.models.autoencoder``.

L1 (+ optional L2) reconstruction + KL + a patch-GAN with hinge loss, adaptive weight and a
delayed start. At the end it measures ``scaling_factor`` / ``shift_factor`` on the training data,
exports a ``from_pretrained`` folder ``RUN/vae/``, reports held-out PSNR in ``RUN/eval.json`` and
draws originals beside reconstructions in ``RUN/reconstructions.png``. The last image shard is
held out (its first ``data.held_out`` samples) and never trained on.

Validation during training (``eval_every`` > 0), the DiT stages' scheme
(``pipeline.training.validation``): the first ``EVAL_IMAGES`` held-out images, reconstructed from
their posterior mean in fp32, every ``eval_every`` steps and at the last; each rank runs its share
of them and the sums are all-reduced. Logged: ``val_loss`` (the training reconstruction term, L1 +
``loss.l2_weight``·MSE) and ``psnr_held_out_64``; the main process plots ``RUN/val_loss.png``.

Precision and parallelism: one process or DDP (the VAE and the discriminator are small enough to
be replicated: 84M parameters for the KL-f8 VAE at 256 px); ``mixed_precision`` bf16/fp16 is
accelerate's autocast (fp16 with its gradient scaler), weights and optimizer state stay fp32.
DeepSpeed is not used for this stage: a DeepSpeed launch is refused with one line. Both updates
accumulate ``optim.grad_accum`` micro-batches inside the accumulation context, and both LR
schedules step once per optimizer step. In the generator update the discriminator is frozen, so
the generator loss never adds to the discriminator's accumulated gradients.

fp16 loss scaling (one ``GradScaler``, shared): each update unscales and clips its own optimizer's
gradients only, so the discriminator's partly accumulated gradients are not unscaled by the
generator's update; when that update changes the scale (a back-off after an overflow, or a growth)
they are brought to the new scale, so the discriminator's optimizer unscales its whole window at
one scale. A step the scaler skips (inf/nan gradients) is per optimizer: that optimizer's schedule
does not advance. The generator's skip decides the training step: the step counter counts generator
updates, so a skipped generator step advances nothing of the core's (step, logging, checkpoints,
``disc_start``) and is counted in ``overflow_steps``; a skipped discriminator step is counted in
``disc_overflow_steps`` and the step goes on.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.config import ConfigError
from pipeline.config.source import Source
from pipeline.data.images import collate_images, decode_image_sample, image_loader, tensor_to_images
from pipeline.data.latents import shard_list
from pipeline.data.shards import iter_samples
from pipeline.figures.sheets import pairs_sheet
from pipeline.data.stream import LoaderConfig
from pipeline.models.autoencoder import AutoencoderModelConfig, PatchDiscriminator, Reconstruction, build_autoencoder
from pipeline.data.quality import psnr
from pipeline.training.autoencoder_losses import adaptive_weight, measure_factors
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.adversarial import AdversarialUpdates
from pipeline.training.core import TrainerCore
from pipeline.training.distributed import create_accelerator, deepspeed_launch, dist_env
from pipeline.training.gan_losses import generator_loss, hinge_d_loss
from pipeline.training.optim import OptimConfig, build_optimizer
from pipeline.training.preflight import check_resume, check_shard_count, resume_target
from pipeline.training.tracking import LoggingConfig
from pipeline.training.validation import Unit, Validation

PROG = "pipeline.train_autoencoder"
EVAL_IMAGES, EVAL_BATCH = 64, 4  # held-out images validated during training; per forward (a few, so every rank has some)


@dataclass(kw_only=True)
class AEDataConfig:
    shards: Source = Path("runs/demo/shards")  # an image-shard folder, or its URL / a URL pattern (pipeline.data.remote)
    resolution: int = 32
    held_out: int = 256  # first samples of the last shard, never trained on
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass(kw_only=True)
class AELossConfig:
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50001  # optimizer step at which the GAN term and the discriminator start
    disc_lr: float | None = None  # None: optim.lr
    disc_channels: int = 64  # the patch-GAN's first width (taming's disc_ndf)
    disc_layers: int = 2  # its normalised conv layers after the first, the last at stride 1 (taming's disc_num_layers)
    sample_posterior: bool = True  # decode a posterior sample (LDM); false: its mean (the KL term still applies)

    def __post_init__(self) -> None:
        if min(self.l2_weight, self.kl_weight, self.disc_weight) < 0 or self.disc_start < 0:
            raise ValueError("loss weights and disc_start must be >= 0")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError(f"disc_channels and disc_layers must be >= 1 (got {self.disc_channels}, {self.disc_layers})")


@dataclass(kw_only=True)
class AutoencoderTrainConfig:
    run: str = "autoencoder"
    output_dir: Path = Path("runs/demo")
    seed: int = 0
    steps: int = 1000
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast for training steps; evaluation is fp32
    eval_every: int = 200  # held-out validation every N steps and at the last (0: off)
    factor_samples: int = 1000  # training images used to measure scaling/shift
    data: AEDataConfig = field(default_factory=AEDataConfig)
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.5, 0.9), grad_clip=0.0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run


def held_out_images(shard: str, count: int, resolution: int) -> torch.Tensor:
    samples = []
    for raw in iter_samples([shard]):
        sample = decode_image_sample(raw, resolution)
        if sample is not None:
            samples.append(sample)
        if len(samples) == count:
            break
    return collate_images(samples)["image"]  # (N, 3, H, W)


def training_shards(cfg: AutoencoderTrainConfig) -> tuple[list[str], str]:
    """The shards trained on and the held-out one (the last); a config error when there are not two."""
    try:
        shards = shard_list(cfg.data.shards)
    except ValueError:  # a folder without complete shards
        shards = []
    if len(shards) < 2:
        raise ConfigError(f"data.shards: '{cfg.data.shards}' has {len(shards)} shard(s); need at least 2 (the last one is held out)")
    return shards[:-1], shards[-1]


def preflight(cfg: AutoencoderTrainConfig, world_size: int) -> tuple[list[str], str]:
    """The stage's checks on every rank before any collective; its training and held-out shards."""
    if deepspeed_launch().enabled:
        raise ConfigError("the launch runs DeepSpeed, which pipeline.train_autoencoder does not use (a GAN's two models "
                          "and optimizers; DDP replicates them): launch with a plain file (launch/accelerate/gpu1.yaml, --multi_gpu)")
    train, held_out = training_shards(cfg)
    check_shard_count(train, cfg.data.loader, world_size)
    check_resume(resume_target(cfg), world_size, cfg.data.loader)
    return train, held_out


class AutoencoderTrainer(AdversarialUpdates, TrainerCore):
    """VAE + discriminator, two optimizers, on the training core."""

    prog = PROG

    def __init__(self, cfg: AutoencoderTrainConfig) -> None:
        train, held_out = preflight(cfg, dist_env().world_size)
        super().__init__(cfg, create_accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum))
        torch.manual_seed(cfg.seed)
        vae, disc = build_autoencoder(cfg.model), PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers)
        opt_g, sched_g = build_optimizer(vae.parameters(), cfg.optim, cfg.steps)
        disc_optim = OptimConfig(**{**cfg.optim.__dict__, "lr": cfg.loss.disc_lr or cfg.optim.lr})
        opt_d, sched_d = build_optimizer(disc.parameters(), disc_optim, cfg.steps)
        self.schedules = {"sched_g": sched_g, "sched_d": sched_d}
        self.model, self.disc, self.opt_g, self.opt_d = self.accelerator.prepare(Reconstruction(vae, cfg.loss.sample_posterior), disc, opt_g, opt_d)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.loader = image_loader(train, cfg.data.loader, rank, world, cfg.data.resolution, self.shard_sizes(train))
        self.held_out = held_out_images(held_out, cfg.data.held_out, cfg.data.resolution)
        if cfg.eval_every:
            images = list(self.held_out[:EVAL_IMAGES])  # (3, H, W) each
            self.validation = Validation(cfg.eval_every, images, [tuple(x.shape) for x in images], ("val_loss", "psnr_held_out_64"), [],
                                         EVAL_BATCH, rank, world, even=False)
        self.last_lr = cfg.optim.lr
        self.disc_overflow_steps = 0

    @property
    def vae(self):
        """The bare ``AutoencoderKL`` (inside the possibly DDP-wrapped reconstruction module)."""
        return self.accelerator.unwrap_model(self.model).vae

    # ------------------------------------------------------------------ one step

    def micro_step(self, batch: dict) -> dict:
        """Both updates for one micro-batch, forward and backward inside the accumulation context
        (DDP all-reduces only at the boundary, where the optimizers step)."""
        x = batch["image"].to(self.accelerator.device)
        with self.accumulation(self.model, self.disc):
            out = self.generator_step(x)
            out["d_loss"] = self.discriminator_step(x, out.pop("recon"))
        return out

    def generator_step(self, x: torch.Tensor) -> dict:
        cfg = self.cfg.loss
        recon, kl = self.model(x)  # (B, 3, H, W), (B,)
        rec = (recon - x).abs().mean() + cfg.l2_weight * ((recon - x) ** 2).mean()
        loss = rec + cfg.kl_weight * kl.mean()
        out = {"rec": rec.detach(), "gan_weight": 0.0}
        if self.step >= cfg.disc_start:
            disc = self.accelerator.unwrap_model(self.disc)  # frozen here: gradients reach the images only
            disc.requires_grad_(False)
            g_loss = generator_loss(disc(recon))
            disc.requires_grad_(True)
            weight = cfg.disc_weight * adaptive_weight(rec, g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + weight * g_loss
            out["gan_weight"] = weight
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.last_lr = self.opt_g.param_groups[0]["lr"]  # the LR this step used
            pending = self.step >= cfg.disc_start and self.cfg.optim.grad_accum > 1 and self.accelerator.scaler is not None
            scale = self.accelerator.scaler.get_scale() if pending else None
            self.update(self.model, self.opt_g, self.schedules["sched_g"])
            if pending:
                self.rescale_pending(self.disc, scale)
        out["recon"] = recon.detach()
        return out

    def discriminator_step(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        if self.step < self.cfg.loss.disc_start:
            return None
        loss = hinge_d_loss(self.disc(x), self.disc(recon))
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and not self.update(self.disc, self.opt_d, self.schedules["sched_d"]):
            self.disc_overflow_steps += 1
        return loss.detach()

    def step_was_skipped(self) -> bool:
        """The generator's skip decides the step (the discriminator's is counted on its own)."""
        return self.opt_g.step_was_skipped

    def train_state(self) -> dict:
        return {**super().train_state(), "disc_overflow_steps": self.disc_overflow_steps}

    def load_train_state(self, state: dict) -> None:
        super().load_train_state(state)
        self.disc_overflow_steps = state.get("disc_overflow_steps", 0)

    # ------------------------------------------------------------------ the core's hooks

    def metrics(self, running: list) -> dict:
        out = running[-1]  # the last micro-batch's figures
        metrics = {"l1_rec": float(out["rec"]), "gan_weight": float(out["gan_weight"]), "lr": self.last_lr,
                   "overflow_steps": self.overflow_steps, "disc_overflow_steps": self.disc_overflow_steps}
        if out["d_loss"] is not None:
            metrics["d_loss"] = float(out["d_loss"])
        return metrics

    def validation_values(self, units: list[Unit]) -> torch.Tensor:
        """The reconstruction term (L1 + ``l2_weight``·MSE) and PSNR of held-out images, (B, 2)."""
        x = torch.stack([self.validation.samples[i] for i, _ in units]).to(self.accelerator.device)  # (B, 3, H, W)
        recon = self.reconstruct(x)
        error = (recon - x).flatten(1)
        rec = error.abs().mean(1) + self.cfg.loss.l2_weight * (error**2).mean(1)
        return torch.stack([rec, psnr(recon, x)], dim=1)

    @contextlib.contextmanager
    def validation_mode(self):
        """The VAE in eval mode (fp32: no autocast)."""
        self.vae.eval()
        try:
            yield
        finally:
            self.vae.train()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) through the VAE, decoded from the posterior mean."""
        return self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample

    @torch.no_grad()
    def evaluate(self) -> tuple[float, torch.Tensor]:
        """Mean PSNR of every held-out image and their reconstructions (the export's; main process)."""
        with self.validation_mode():
            x = self.held_out.to(self.accelerator.device)
            recon = torch.cat([self.reconstruct(x[i : i + 128]) for i in range(0, len(x), 128)])
        return float(psnr(recon, x).mean()), recon

    def export(self) -> None:
        """vae/ with measured factors, eval.json, reconstructions.png."""
        cfg, vae = self.cfg, self.vae.eval()
        scale, shift = measure_factors(vae, self._factor_images().to(self.accelerator.device))
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        vae.save_pretrained(cfg.run_dir / "vae", safe_serialization=True)
        value, recon = self.evaluate()
        report = {"psnr_held_out": value, "held_out": len(self.held_out), "steps": self.step, "scaling_factor": scale, "shift_factor": shift}
        (cfg.run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        self.reconstructions(recon)
        print(f"{PROG}: held-out PSNR {value:.2f} dB over {len(self.held_out)} images; VAE in {cfg.run_dir / 'vae'}")

    def _factor_images(self) -> torch.Tensor:
        """One batch of ``factor_samples`` training images (a fresh loader: training data, own seed)."""
        cfg = self.cfg
        loader = image_loader(shard_list(cfg.data.shards)[:-1], LoaderConfig(batch_size=cfg.factor_samples, seed=1), resolution=cfg.data.resolution)
        return next(iter(loader))["image"]

    def reconstructions(self, recon: torch.Tensor, count: int = 16) -> Path:
        path = self.cfg.run_dir / "reconstructions.png"
        originals, rebuilt = tensor_to_images(self.held_out[:count]), tensor_to_images(recon[:count])
        pairs_sheet(originals, rebuilt, "original | reconstruction", path)
        return path
