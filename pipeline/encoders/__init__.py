"""Frozen encoders: the VAE (images <-> latents) and the text encoders (T5, CLIP).

DESIGN.md §3 "Latents" and "Text conditions". Every encoder is loaded through the real
loading code of its library (``AutoencoderKL.from_pretrained``,
``T5EncoderModel.from_pretrained``, open_clip's ``create_model``), put in eval mode with
``requires_grad_(False)``, runs under ``torch.no_grad()``, and returns float32 whatever its
compute dtype. Offline, the tests and the demo feed them small models that
``data_tools.make_encoders`` writes in the same formats.

This package module holds ``TextEncoders``, the T5 + CLIP pair the trainer and
``data_tools.encode`` use::

    cfg = load_config(TextEncodersConfig, "runs/encoders/encoders.yaml")
    out = TextEncoders(cfg).encode(["a small red circle at the center on a white background"])
    out["t5"], out["t5_mask"], out["clip"]   # (B, L, D), (B, L) bool, (B, Dc)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .clip import ClipEncoderConfig, FrozenCLIP
from .common import EncoderLoadError, FrozenModule, check_local_source, check_texts, resolve_dtype
from .t5 import FrozenT5, T5EncoderConfig
from .vae import FrozenVAE, VAEConfig


@dataclass(kw_only=True)
class TextEncodersConfig:
    """The text encoders to condition on: T5 (token sequence), CLIP (pooled vector), or both."""

    t5: T5EncoderConfig | None = None
    clip: ClipEncoderConfig | None = None

    def __post_init__(self) -> None:
        if self.t5 is None and self.clip is None:
            raise ValueError("at least one text encoder (t5 or clip) must be configured")


class TextEncoders(FrozenModule):
    """The configured frozen text encoders behind one ``encode(texts)``."""

    def __init__(self, cfg: TextEncodersConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.t5 = FrozenT5(cfg.t5, device) if cfg.t5 is not None else None
        self.clip = FrozenCLIP(cfg.clip, device) if cfg.clip is not None else None
        self.eval()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Keys present per config: ``t5`` (B, L, D) + ``t5_mask`` (B, L) bool; ``clip`` (B, Dc),
        and ``clip_tokens`` (B, Lc, Dt) + ``clip_tokens_mask`` (B, Lc) bool when requested."""
        out: dict[str, torch.Tensor] = {}
        if self.t5 is not None:
            out["t5"], out["t5_mask"] = self.t5.encode(texts)
        if self.clip is not None:
            clip = self.clip.encode(texts)
            out["clip"] = clip["pooled"]
            if "tokens" in clip:
                out["clip_tokens"], out["clip_tokens_mask"] = clip["tokens"], clip["tokens_mask"]
        return out

    def describe(self) -> dict:
        """JSON-ready identities and widths: ``{"t5": {...} | None, "clip": {...} | None}``."""
        return {
            "t5": self.t5.describe() if self.t5 is not None else None,
            "clip": self.clip.describe() if self.clip is not None else None,
        }


__all__ = [
    "ClipEncoderConfig",
    "EncoderLoadError",
    "FrozenCLIP",
    "FrozenT5",
    "FrozenVAE",
    "T5EncoderConfig",
    "TextEncoders",
    "TextEncodersConfig",
    "VAEConfig",
    "check_local_source",
    "check_texts",
    "resolve_dtype",
]
