"""The pix2pix baseline (``pipeline.train_pix2pix``): a U-Net generator translating a degraded
source image into its target, trained on paired image shards (``data_tools.pairs``) with a
conditional PatchGAN and an L1 term, or with MSE alone (the regression baseline), on the
training core (``pipeline.training.core``).

References: Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"
(``L_cGAN(G, D) + λ·L1``, λ = 100, a PatchGAN that sees ``[source ‖ image]``, dropout as the
generator's noise); Goodfellow et al. 2014 (the non-saturating loss, ``loss.gan=bce``); Lim & Ye
2017 and Miyato et al. 2018 (the hinge loss, ``loss.gan=hinge``); Arjovsky et al. 2017, "Wasserstein
GAN" (``n_critic = 5`` discriminator updates per generator update, ``loss.d_steps=5``).
Networks: ``pipeline.models.translator`` (generator), ``pipeline.models.autoencoder``
(``PatchDiscriminator``, the autoencoder's, 6 input channels when conditional); losses:
``pipeline.training.gan_losses``.

``loss.kind``:

- ``cgan``: generator loss ``g_loss(gan, D([s ‖ G(s)])) + l1_weight·|G(s) − x|₁``; discriminator
  loss ``d_loss(gan, D([s ‖ x]), D([s ‖ G(s)]))`` (``loss.conditional=false``: D sees the image alone).
- ``l2``: ``|G(s) − x|²`` only, no discriminator: the regression baseline, whose output is the
  conditional mean of the targets, blurry where the source leaves the target uncertain (the
  colours of a grayscale scene, the edges of a 4× upsampling).

One training step = one generator update, then ``loss.d_steps`` discriminator updates. Order and
data: each step's micro-batch is drawn once and reused: the generator's output on it (one forward,
dropout drawn once) is the fake image of all the discriminator's updates of that step (WGAN draws a
fresh batch per critic update; here the data position stays one batch per micro-batch, so resume
and the step's data are those of every other recipe). The generator's update uses the
discriminator as it stood before this step's updates (the autoencoder's order), so a window of
accumulated micro-batches sees one discriminator and accumulation equals a larger batch.
``d_steps > 1`` needs ``optim.grad_accum = 1`` (each discriminator update needs its own window).
The discriminator's LR schedule runs over ``steps·d_steps`` updates.

Precision and parallelism as the autoencoder (``pipeline.training.autoencoder``): one process or
DDP, fp32 master weights, ``mixed_precision`` bf16/fp16 is accelerate's autocast, losses in fp32,
no DeepSpeed; both optimizers step inside the accumulation context; with fp16 one shared loss
scaler, each update unscales and clips its own gradients (``pipeline.training.adversarial``, shared
with the autoencoder). The last shard is held out (never trained on); validation every
``eval_every`` steps on its first ``EVAL_IMAGES`` pairs: ``val_loss`` (L1 to the target) and
``psnr_held_out_64``. At the end: ``RUN/generator/`` (``Translator.from_pretrained``, recording the
shards' degradations), ``RUN/eval.json`` (held-out PSNR overall, per degradation, and of the source
as it is) and ``RUN/samples.png`` (source | output | target).
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
from pipeline.data.images import decode_pair_sample, pair_loader, tensor_to_images
from pipeline.data.quality import psnr
from pipeline.data.remote import SourceNotFound, dataset_meta
from pipeline.data.shards import iter_samples
from pipeline.figures.sheets import strips_sheet
from pipeline.models.autoencoder import PatchDiscriminator
from pipeline.models.translator import Translator, TranslatorConfig, build_translator
from pipeline.training.adversarial import AdversarialUpdates
from pipeline.training.autoencoder import AEDataConfig, training_shards
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.core import TrainerCore
from pipeline.training.distributed import create_accelerator, deepspeed_launch, dist_env
from pipeline.training.gan_losses import d_loss, g_loss
from pipeline.training.optim import OptimConfig, build_optimizer
from pipeline.training.preflight import check_resume, check_shard_count, resume_target
from pipeline.training.tracking import LoggingConfig
from pipeline.training.validation import Unit, Validation

PROG = "pipeline.train_pix2pix"
EVAL_IMAGES, EVAL_BATCH = 64, 16  # held-out pairs validated during training; per forward
SHEET_ROWS = 16


@dataclass(kw_only=True)
class P2PDataConfig(AEDataConfig):
    """The autoencoder's data section (resolution, held-out pairs of the last shard, loader) on paired shards."""

    shards: Source = Path("runs/demo/cond_shards")  # a paired image-shard folder (data_tools.pairs), or its URL


@dataclass(kw_only=True)
class P2PLossConfig:
    kind: Literal["cgan", "l2"] = "cgan"  # l2: MSE regression, no discriminator
    gan: Literal["hinge", "bce"] = "bce"  # bce: non-saturating cross-entropy (pix2pix's)
    l1_weight: float = 100.0  # λ (pix2pix)
    d_steps: int = 1  # discriminator updates per generator update (5: WGAN's n_critic)
    conditional: bool = True  # D sees [source ‖ image]; false: the image alone
    disc_lr: float | None = None  # None: optim.lr
    disc_channels: int = 64
    disc_layers: int = 2  # normalised conv layers after the first (pix2pix's 70×70 at 256 px: 3)

    def __post_init__(self) -> None:
        if self.l1_weight < 0 or self.d_steps < 1:
            raise ValueError(f"l1_weight must be >= 0 and d_steps >= 1 (got {self.l1_weight}, {self.d_steps})")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError(f"disc_channels and disc_layers must be >= 1 (got {self.disc_channels}, {self.disc_layers})")


@dataclass(kw_only=True)
class Pix2PixTrainConfig:
    run: str = "pix2pix"
    output_dir: Path = Path("runs/demo")
    seed: int = 0
    steps: int = 1000
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast for training steps; evaluation is fp32
    eval_every: int = 200  # held-out validation every N steps and at the last (0: off)
    data: P2PDataConfig = field(default_factory=P2PDataConfig)
    model: TranslatorConfig = field(default_factory=TranslatorConfig)
    loss: P2PLossConfig = field(default_factory=P2PLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999), grad_clip=0.0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.loss.d_steps > 1 and self.optim.grad_accum > 1:
            raise ValueError(f"loss.d_steps > 1 needs optim.grad_accum = 1 (got {self.loss.d_steps}, {self.optim.grad_accum}): "
                             "each discriminator update needs its own accumulation window")

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run


def paired_degradations(shards: Source) -> list[str]:
    """The degradation specs a paired image-shard folder records (its dataset.json's ``pairs``)."""
    try:
        meta = dataset_meta(shards)
    except (SourceNotFound, FileNotFoundError, ValueError):
        meta = {}
    specs = (meta.get("pairs") or {}).get("degradations")
    if not specs:
        raise ConfigError(f"data.shards: '{shards}' is not a paired image-shard folder (its dataset.json records no "
                          "pairs.degradations); make one with python -m data_tools.pairs")
    return list(specs)


def held_out_pairs(shard: str, count: int, resolution: int) -> dict:
    """The first ``count`` pairs of ``shard``: ``source``, ``image`` (N, 3, H, W) and each one's
    ``degradation`` spec (from its KEY.json's ``pair``)."""
    sources, targets, specs = [], [], []
    for raw in iter_samples([shard]):
        sample = decode_pair_sample(raw, resolution)
        if sample is None:
            continue
        sources.append(sample["source"])
        targets.append(sample["image"])
        specs.append((json.loads(raw.get("json", b"{}")).get("pair") or {}).get("degradation", "?"))
        if len(specs) == count:
            break
    return {"source": torch.stack(sources), "image": torch.stack(targets), "degradation": specs}


def preflight(cfg: Pix2PixTrainConfig, world_size: int) -> tuple[list[str], str, list[str]]:
    """Checks on every rank before any collective: training shards, held-out shard, degradations."""
    if deepspeed_launch().enabled:
        raise ConfigError("the launch runs DeepSpeed, which pipeline.train_pix2pix does not use (a GAN's two models "
                          "and optimizers; DDP replicates them): launch with a plain file (launch/accelerate/gpu1.yaml, --multi_gpu)")
    train, held_out = training_shards(cfg)
    degradations = paired_degradations(cfg.data.shards)
    check_shard_count(train, cfg.data.loader, world_size)
    check_resume(resume_target(cfg), world_size, cfg.data.loader)
    return train, held_out, degradations


class Pix2PixTrainer(AdversarialUpdates, TrainerCore):
    """U-Net generator (+ conditional PatchGAN for ``cgan``), one or two optimizers, on the core."""

    prog = PROG

    def __init__(self, cfg: Pix2PixTrainConfig) -> None:
        train, held_out, degradations = preflight(cfg, dist_env().world_size)
        super().__init__(cfg, create_accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum))
        torch.manual_seed(cfg.seed)
        generator = build_translator(cfg.model, degradations)
        opt_g, sched_g = build_optimizer(generator.parameters(), cfg.optim, cfg.steps)
        self.schedules = {"sched_g": sched_g}
        self.gan = cfg.loss.kind == "cgan"
        if self.gan:
            disc = PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers, in_channels=6 if cfg.loss.conditional else 3)
            disc_optim = OptimConfig(**{**cfg.optim.__dict__, "lr": cfg.loss.disc_lr or cfg.optim.lr})
            opt_d, sched_d = build_optimizer(disc.parameters(), disc_optim, cfg.steps * cfg.loss.d_steps)
            self.schedules["sched_d"] = sched_d
            self.model, self.disc, self.opt_g, self.opt_d = self.accelerator.prepare(generator, disc, opt_g, opt_d)
        else:
            self.model, self.opt_g = self.accelerator.prepare(generator, opt_g)
            self.disc = self.opt_d = None
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.loader = pair_loader(train, cfg.data.loader, rank, world, cfg.data.resolution, self.shard_sizes(train))
        self.held_out = held_out_pairs(held_out, cfg.data.held_out, cfg.data.resolution)
        if cfg.eval_every:
            pairs = list(zip(self.held_out["source"][:EVAL_IMAGES], self.held_out["image"][:EVAL_IMAGES]))
            self.validation = Validation(cfg.eval_every, pairs, [tuple(s.shape) for s, _ in pairs], ("val_loss", "psnr_held_out_64"), [],
                                         EVAL_BATCH, rank, world, even=False)
        self.last_lr = cfg.optim.lr
        self.d_updates, self.disc_overflow_steps = 0, 0

    @property
    def generator(self) -> Translator:
        return self.accelerator.unwrap_model(self.model)

    def d_input(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees: ``[source ‖ image]`` (B, 6, H, W), or the image alone."""
        return torch.cat([source, image], dim=1) if self.cfg.loss.conditional else image

    # ------------------------------------------------------------------ one step

    def micro_step(self, batch: dict) -> dict:
        """The generator's update, then the discriminator's ``d_steps`` on the same micro-batch,
        inside the accumulation context (DDP all-reduces only at the window's boundary)."""
        device = self.accelerator.device
        source, target = batch["source"].to(device), batch["image"].to(device)  # (B, 3, H, W) each
        models = (self.model, self.disc) if self.gan else (self.model,)
        with self.accumulation(*models):
            out = self.generator_step(source, target)
            fake = out.pop("fake")
            out["d_loss"] = self.discriminator_steps(source, target, fake) if self.gan else None
        return out

    def generator_step(self, source: torch.Tensor, target: torch.Tensor) -> dict:
        cfg = self.cfg.loss
        fake = self.model(source).float()  # (B, 3, H, W); losses in fp32
        l1, mse = (fake - target).abs().mean(), ((fake - target) ** 2).mean()
        out = {"l1": l1.detach(), "mse": mse.detach(), "g_adv": None}
        if self.gan:
            disc = self.accelerator.unwrap_model(self.disc)  # frozen here: gradients reach the generator only
            disc.requires_grad_(False)
            adv = g_loss(cfg.gan, disc(self.d_input(source, fake)))
            disc.requires_grad_(True)
            loss = adv + cfg.l1_weight * l1
            out["g_adv"] = adv.detach()
        else:
            loss = mse
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.last_lr = self.opt_g.param_groups[0]["lr"]  # the LR this step used
            pending = self.gan and self.cfg.optim.grad_accum > 1 and self.accelerator.scaler is not None
            scale = self.accelerator.scaler.get_scale() if pending else None
            self.update(self.model, self.opt_g, self.schedules["sched_g"])
            if pending:
                self.rescale_pending(self.disc, scale)
        out["fake"] = fake.detach()
        return out

    def discriminator_steps(self, source: torch.Tensor, target: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``d_steps`` discriminator updates on this micro-batch's real and generated pairs; the last loss."""
        real_in, fake_in = self.d_input(source, target), self.d_input(source, fake)
        for _ in range(self.cfg.loss.d_steps):
            loss = d_loss(self.cfg.loss.gan, self.disc(real_in).float(), self.disc(fake_in).float())
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.d_updates += 1
                if not self.update(self.disc, self.opt_d, self.schedules["sched_d"]):
                    self.disc_overflow_steps += 1
        return loss.detach()

    def step_was_skipped(self) -> bool:
        """The generator's skip decides the step (the discriminator's are counted on their own)."""
        return self.opt_g.step_was_skipped

    def train_state(self) -> dict:
        return {**super().train_state(), "d_updates": self.d_updates, "disc_overflow_steps": self.disc_overflow_steps}

    def load_train_state(self, state: dict) -> None:
        super().load_train_state(state)
        self.d_updates, self.disc_overflow_steps = state.get("d_updates", 0), state.get("disc_overflow_steps", 0)

    # ------------------------------------------------------------------ the core's hooks

    def metrics(self, running: list) -> dict:
        out = running[-1]  # the last micro-batch's figures
        metrics = {"l1": float(out["l1"]), "mse": float(out["mse"]), "lr": self.last_lr, "overflow_steps": self.overflow_steps}
        if self.gan:
            metrics.update(g_adv=float(out["g_adv"]), d_loss=float(out["d_loss"]), d_updates=self.d_updates,
                           disc_overflow_steps=self.disc_overflow_steps)
        return metrics

    def validation_values(self, units: list[Unit]) -> torch.Tensor:
        """L1 to the target and PSNR of held-out pairs' translations, (B, 2)."""
        pairs = [self.validation.samples[i] for i, _ in units]
        device = self.accelerator.device
        source, target = torch.stack([s for s, _ in pairs]).to(device), torch.stack([t for _, t in pairs]).to(device)
        output = self.generator.translate(source).float()  # (B, 3, H, W), fp32
        return torch.stack([(output - target).abs().flatten(1).mean(1), psnr(output, target)], dim=1)

    @contextlib.contextmanager
    def validation_mode(self):
        """The generator in eval mode (no dropout; fp32: no autocast)."""
        self.generator.eval()
        try:
            yield
        finally:
            self.generator.train()

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, torch.Tensor]:
        """Held-out PSNR of the translations (overall, per degradation) and of the sources as they
        are; the translations (main process)."""
        source, target = self.held_out["source"], self.held_out["image"]
        output = torch.cat([self.generator.translate(source[i : i + 128]).float().cpu() for i in range(0, len(source), 128)])
        values, baseline, specs = psnr(output, target), psnr(source, target), self.held_out["degradation"]
        report = {"psnr_held_out": float(values.mean()), "psnr_source": float(baseline.mean()), "held_out": len(specs), "by_degradation": {}}
        for spec in dict.fromkeys(specs):
            rows = torch.tensor([s == spec for s in specs])
            report["by_degradation"][spec] = {"psnr": float(values[rows].mean()), "psnr_source": float(baseline[rows].mean()), "count": int(rows.sum())}
        return report, output

    def export(self) -> None:
        """generator/, eval.json, samples.png."""
        cfg = self.cfg
        self.generator.save_pretrained(cfg.run_dir / "generator", safe_serialization=True)
        report, output = self.evaluate()
        report.update(steps=self.step, kind=cfg.loss.kind, degradations=self.generator.degradations)
        (cfg.run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        self.samples_sheet(output)
        print(f"{PROG}: held-out PSNR {report['psnr_held_out']:.2f} dB (source as is {report['psnr_source']:.2f} dB) over "
              f"{report['held_out']} pairs; generator in {cfg.run_dir / 'generator'}")

    def samples_sheet(self, output: torch.Tensor) -> Path:
        """``RUN/samples.png``: source | output | target for the first held-out pairs."""
        n = SHEET_ROWS
        columns = [tensor_to_images(t[:n]) for t in (self.held_out["source"], output, self.held_out["image"])]
        captions = [f"{spec}: src | {self.cfg.loss.kind} | tgt" for spec in self.held_out["degradation"][:n]]
        return strips_sheet([list(row) for row in zip(*columns)], captions, self.cfg.run_dir / "samples.png", gap=2)
