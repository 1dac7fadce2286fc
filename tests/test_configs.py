"""Every YAML in configs/ loads into its stage's config class (typos in shipped configs fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    if path.name.startswith("dit_"):
        from pipeline.train_config import TrainConfig

        return TrainConfig, []
    if path.name.startswith("distill_"):
        from pipeline.distill import DistillConfig

        return DistillConfig, []
    if path.name.startswith("encode_"):
        from data_tools.encode import EncodeConfig

        return EncodeConfig, ["input=in", "output=out"]
    if path.name.startswith("autoencoder_"):
        from pipeline.train_autoencoder import AutoencoderTrainConfig

        return AutoencoderTrainConfig, []
    raise AssertionError(f"{path.name}: no config class known for this name; add it here")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    cls, extra = config_class(path)
    load_config(cls, path, extra)
