"""The CLIP text encoder as a diffusers pipeline component (``text_encoder_2/`` of an exported model).

open_clip models are not ``from_pretrained`` classes, so the component folder is an open_clip folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``) plus this class's ``config.json``;
``OpenCLIPTextEncoder.from_pretrained(folder)`` loads it through open_clip's own loader
(``pipeline.encoders.clip``) and ``save_pretrained`` copies the files. ``DiffusionPipeline``
finds the class by its ``model_index.json`` entry ``["pipeline.encoders.clip_component",
"OpenCLIPTextEncoder"]`` (a ``ModelMixin``, so diffusers loads and saves it like its own models).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .clip import ClipEncoderConfig, FrozenCLIP

OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


class OpenCLIPTextEncoder(ModelMixin, ConfigMixin):
    """open_clip's text tower behind ``encode(texts)`` (``FrozenCLIP``), loadable by diffusers."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, return_tokens: bool = False, dtype: str = "fp32") -> None:
        super().__init__()
        self.encoder: FrozenCLIP | None = None  # set by from_pretrained / from_encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> OpenCLIPTextEncoder:
        """The component folder (diffusers' loading options such as ``torch_dtype`` are not used:
        the dtype is the component's config)."""
        folder = Path(pretrained_model_name_or_path)
        component = cls.from_config(cls.load_config(folder))
        cfg = ClipEncoderConfig(path=str(folder), return_tokens=component.config.return_tokens, dtype=component.config.dtype)
        component.encoder = FrozenCLIP(cfg)
        return component

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The open_clip files this encoder was loaded from, and the component's config."""
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        source = Path(self.encoder.cfg.path)
        if source.resolve() != target.resolve():
            for name in OPEN_CLIP_FILES:
                shutil.copyfile(source / name, target / name)
        self.save_config(target)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"pooled": (B, D)}`` and, with ``return_tokens``, ``"tokens"`` / ``"tokens_mask"``."""
        return self.encoder.encode(texts)
