"""Train a tiny preview decoder to imitate the frozen VAE's decoder (distillation of the decoder).

Bohan Ollin Boer Bohan 2023, "TAESD": the tiny decoder learns the full decoder's output on the
latents it will see. Here those are the latent shards' own (``data_tools.encode``'s normalised
latents, DESIGN.md §3): the first ``samples`` of the folder, in shard order, decoded once by the
frozen VAE into the targets; the last ``held_out`` of them are never trained on and give the
reported PSNR against the full decoder (``pipeline.data.quality.psnr``). The loss is the
autoencoder stage's pixel loss, L1 + ``l2_weight``·MSE (no LPIPS, no GAN: a preview). The result
is a stock ``AutoencoderTiny`` folder (``save_pretrained``) plus ``train.json`` (config, losses, PSNR).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.latents import decode_latent_sample, latent_meta, shard_list
from pipeline.data.quality import psnr
from pipeline.data.remote import iter_shard
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.models.tiny_decoder import TinyDecoderConfig, build_tiny_decoder

PROG = "pipeline.train_tiny_decoder"


@dataclass(kw_only=True)
class TinyDecoderTrainConfig:
    """What the tiny decoder imitates, on which latents, for how long."""

    latents: str
    """Latent-shard folder (its dataset.json gives the latents' VAE scale and shift)."""
    output: str
    """Folder for the ``AutoencoderTiny`` (e.g. a model folder's ``tiny_vae/``)."""
    vae: str | None = None
    """The VAE folder whose decoder it imitates; None: the one the latents' dataset.json names."""
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    samples: int = 2048
    """Latents read (the folder's first, in shard order), held-out ones included."""
    held_out: int = 256
    """The last ``held_out`` of them: PSNR only, never trained on."""
    l2_weight: float = 10.0
    seed: int = 0
    model: TinyDecoderConfig = field(default_factory=TinyDecoderConfig)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.held_out < self.samples:
            raise ValueError(f"held_out must be in [0, samples), got {self.held_out} (samples {self.samples})")
        if not self.lr > 0 or self.l2_weight < 0:
            raise ValueError(f"lr must be > 0 and l2_weight >= 0, got {self.lr}, {self.l2_weight}")


def read_latents(folder: str, count: int) -> torch.Tensor:
    """The first ``count`` latents of a latent-shard folder (of the first one's shape), float32 (N, C, h, w)."""
    found: list[torch.Tensor] = []
    for shard in shard_list(folder):
        for raw in iter_shard(shard):
            sample = decode_latent_sample(raw)
            if sample is not None and (not found or sample["latent"].shape == found[0].shape):
                found.append(sample["latent"].float())
            if len(found) == count:
                return torch.stack(found)
    if not found:
        raise ValueError(f"{folder}: no latents found")
    return torch.stack(found)


def load_teacher(cfg: TinyDecoderTrainConfig) -> FrozenVAE:
    """The frozen VAE, with the scale and shift the latents were normalised with (their dataset.json)."""
    vae = latent_meta(cfg.latents)["vae"]
    return FrozenVAE(VAEConfig(path=cfg.vae or vae["source"], subfolder=None if cfg.vae else vae.get("subfolder"),
                               scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"]))


@torch.no_grad()
def decode_all(decode, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``decode`` over ``latents`` (N, C, h, w) in batches -> images (N, 3, H, W)."""
    return torch.cat([decode(latents[i:i + batch]) for i in range(0, len(latents), batch)])


def pixel_loss(prediction: torch.Tensor, target: torch.Tensor, l2_weight: float) -> torch.Tensor:
    """L1 + ``l2_weight``·MSE (the autoencoder stage's pixel terms)."""
    return F.l1_loss(prediction, target) + l2_weight * F.mse_loss(prediction, target)


def train_tiny_decoder(cfg: TinyDecoderTrainConfig, progress: bool = True) -> dict:
    """Train, save ``cfg.output`` (``AutoencoderTiny`` + ``train.json``), return the record."""
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg)
    latents = read_latents(cfg.latents, cfg.samples)  # (N, C, h, w)
    targets = decode_all(teacher.decode, latents)  # (N, 3, H, W) in [-1, 1]
    split = len(latents) - cfg.held_out
    tiny = build_tiny_decoder(cfg.model, teacher.latent_channels, teacher.downsample)
    tiny = tiny.to(memory_format=torch.channels_last).train()  # channels-last: ~2x faster on CPU
    optimizer = torch.optim.Adam(tiny.decoder.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps, eta_min=cfg.lr * 0.05)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[torch.Tensor] = []
    for _ in tqdm(range(cfg.steps), desc=PROG, unit="step", disable=not progress):
        index = torch.randint(0, split, (min(cfg.batch_size, split),), generator=generator)
        z = latents[index].contiguous(memory_format=torch.channels_last)
        loss = pixel_loss(tiny.decode(z).sample, targets[index], cfg.l2_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())  # no sync per step
    tiny = tiny.to(memory_format=torch.contiguous_format).eval()
    losses = torch.stack(losses).tolist()
    record = {"config": asdict(cfg), "samples": len(latents), "first_loss": losses[0], "final_loss": losses[-1],
              "losses": losses[:: max(1, len(losses) // 50)]}
    if cfg.held_out:
        preview = decode_all(lambda z: tiny.decode(z).sample.clamp(-1, 1), latents[split:])
        record["psnr_vs_vae_held_out"] = float(psnr(preview, targets[split:]).mean())
    save(tiny, Path(cfg.output), record)
    return record


def save(tiny: torch.nn.Module, folder: Path, record: dict) -> None:
    """``save_pretrained`` (safetensors) and ``train.json`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny.save_pretrained(folder, safe_serialization=True)
    (folder / "train.json").write_text(json.dumps(record, indent=2) + "\n")
