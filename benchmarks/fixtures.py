"""Inputs the benchmarks build for themselves: synthetic image shards, a demo-sized VAE."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_tools import shard, synth

ROOT = Path(__file__).resolve().parents[1]


def image_shards(folder: Path, count: int, resolution: int = 32) -> Path:
    """``count`` synthetic images in PNG image shards of 128."""
    synth.generate(folder / "synth", count=count, resolution=resolution, seed=0)
    args = ["--input", str(folder / "synth"), "--output", str(folder / "shards"), "--resolution", str(resolution)]
    shard.main([*args, "--format", "png", "--samples-per-shard", "128"])
    return folder / "shards"


def demo_vae(folder: Path) -> Path:
    """An ``AutoencoderKL`` with the demo autoencoder's architecture, saved with save_pretrained."""
    from pipeline.models.autoencoder import build_autoencoder
    from pipeline.config import from_dict
    from pipeline.training.autoencoder import AutoencoderTrainConfig

    cfg = from_dict(AutoencoderTrainConfig, yaml.safe_load((ROOT / "configs/autoencoder_demo.yaml").read_text()))
    torch.manual_seed(0)
    build_autoencoder(cfg.model).save_pretrained(folder, safe_serialization=True)
    return folder
