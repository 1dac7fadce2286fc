"""Shared pytest fixtures: tiny frozen encoders saved in their native formats.

Nothing can be downloaded here (DESIGN.md §7), so these fixtures build small models from
configs with a fixed seed, save them the way real checkpoints are saved, and hand out the
folder; tests load them back through ``pipeline.encoders`` only. Session-scoped: built once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),  # downsampling factor 2 ** (3 - 1) = 4
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.5,
    shift_factor=0.1,
)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers ``AutoencoderKL`` folder (4 latent channels, /4, scale 0.5, shift 0.1)."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny_vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_text_encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data_tools.make_encoders`` output: ``t5/``, ``clip/`` and ``encoders.yaml`` (seed 0)."""
    from data_tools import make_encoders

    folder = tmp_path_factory.mktemp("tiny_text_encoders")
    assert make_encoders.main(["--output", str(folder), "--seed", "0"]) == 0
    return folder
