"""The exported text-to-image model folder, and loading it back for sampling.

``MODEL/transformer/`` is a ``from_pretrained`` folder (safetensors + config.json) of the DiT;
``MODEL/pipeline.json`` names the VAE and text encoders (the configs ``data_tools.encode``
used, recorded in the latent ``dataset.json``) and the latent shape, so sampling needs no
flags that training already knew. Its local paths are relative to ``MODEL`` (``pipeline.paths``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import from_dict
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.data.paths import map_paths, relative_to, resolved_from
from pipeline.data.shards import write_json_atomic

PIPELINE_FILE = "pipeline.json"


def export_model(folder: Path, model: torch.nn.Module, latent_meta: dict, extra: dict | None = None) -> Path:
    """Save ``model`` (a ``ModelMixin``) and the encoders' description into ``folder``."""
    folder = Path(folder)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    config = latent_meta["config"]
    info = {
        "kind": "text_to_image",
        "transformer": "transformer",
        "vae": config["vae"],
        "text": config["text"],
        "latent_shape": latent_meta["latent_shape"],
        "resolution": latent_meta["resolution"],
        **(extra or {}),
    }
    write_json_atomic(folder / PIPELINE_FILE, map_paths(info, relative_to(folder)))
    return folder


@dataclass
class LoadedPipeline:
    transformer: torch.nn.Module
    vae: FrozenVAE
    text: TextEncoders
    info: dict


def load_pipeline(folder: Path, device: str | torch.device = "cpu") -> LoadedPipeline:
    """A model folder written by :func:`export_model` (or by the distillation stage)."""
    from pipeline.models.dit import DiT

    folder = Path(folder)
    info_path = folder / PIPELINE_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no {PIPELINE_FILE})")
    info = map_paths(json.loads(info_path.read_text()), resolved_from(folder))
    transformer = DiT.from_pretrained(folder / info["transformer"]).to(device).eval()
    vae = FrozenVAE(from_dict(VAEConfig, info["vae"]), device)
    text = TextEncoders(from_dict(TextEncodersConfig, info["text"]), device)
    return LoadedPipeline(transformer, vae, text, info)
