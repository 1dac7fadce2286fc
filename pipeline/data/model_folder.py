"""The exported text-to-image model folder: its format, written by training, read by inference.

``MODEL/transformer/`` is a ``from_pretrained`` folder (safetensors + config.json) of the DiT;
``MODEL/pipeline.json`` names the VAE and text encoders (the configs ``data_tools.encode``
used, recorded in the latent ``dataset.json``), the latent shape and the sampler, so sampling
needs no flags that training already knew. Its local paths are relative to ``MODEL``
(``pipeline.data.paths``), so a run folder can move.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def read_model_info(folder: Path) -> dict:
    """``pipeline.json`` of a model folder written by :func:`export_model`, local paths resolved."""
    info_path = Path(folder) / PIPELINE_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no {PIPELINE_FILE})")
    return map_paths(json.loads(info_path.read_text()), resolved_from(Path(folder)))
