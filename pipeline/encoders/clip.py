"""The frozen CLIP text encoder (open_clip): captions -> pooled vector, optionally its tokens.

DESIGN.md §3 "Text conditions": the DiT gets CLIP's pooled, projected text embedding
(``encode_text`` without normalisation, as SDXL's ``text_embeds``) through the timestep
modulation, and optionally the per-token features of the final layer (after ``ln_final``,
before the projection) through attention. The model comes from a local open_clip folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``, loaded as ``local-dir:PATH``), or
from an open_clip model name with a checkpoint. Only the text tower is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from .clip_tokens import fast_tokenizer
from .common import EncoderLoadError, FrozenModule, check_local_source, check_texts, resolve_dtype


@dataclass(kw_only=True)
class ClipEncoderConfig:
    """Which open_clip model to load: a local folder, or a model name plus checkpoint."""

    path: str | None = None
    """Local open_clip folder (``open_clip_config.json`` + weights); ``hf-hub:org/name`` online."""
    model: str | None = None
    """An open_clip model name (e.g. ``ViT-L-14``), used with ``checkpoint``."""
    checkpoint: str | None = None
    """With ``model``: a local checkpoint (.safetensors, .pt, .bin) or an open_clip pretrained tag."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    return_tokens: bool = False
    """Also return the per-token embeddings and their mask."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.model is None):
            raise ValueError("give exactly one of path (an open_clip folder) or model "
                             f"(an open_clip model name), got path={self.path!r}, model={self.model!r}")
        if self.path is not None and self.checkpoint is not None:
            raise ValueError("checkpoint goes with model, not with path (the folder holds its weights)")
        if self.model is not None and not self.checkpoint:
            raise ValueError(f"model {self.model!r} needs a checkpoint (a weights file or a pretrained tag)")
        resolve_dtype(self.dtype)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else f"{self.model}:{self.checkpoint}"


def load_open_clip(cfg: ClipEncoderConfig, device: str | torch.device = "cpu", image_tower: bool = False,
                   ) -> tuple[torch.nn.Module, object, object]:
    """open_clip model, tokenizer and image preprocessing; weights required, errors naming the
    source. The image tower is dropped (and the preprocessing is ``None``) unless asked for."""
    import open_clip  # here, not at the top: it imports torchvision (~3 s at every CLI start)
    from open_clip.transformer import TextTransformer

    if cfg.path is not None:
        name, pretrained = cfg.path, None
        if not cfg.path.startswith("hf-hub:"):
            check_local_source(cfg.path, "CLIP", required=("open_clip_config.json",))
            name = f"local-dir:{cfg.path}"
    else:
        name, pretrained = cfg.model, cfg.checkpoint
        if (os.path.sep in cfg.checkpoint or os.path.splitext(cfg.checkpoint)[1]) \
                and not os.path.isfile(cfg.checkpoint):
            raise EncoderLoadError(f"CLIP checkpoint file not found: '{cfg.checkpoint}'")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=cfg.dtype, device=device, require_pretrained=True, weights_only=True)
        tokenizer = fast_tokenizer(open_clip.get_tokenizer(name))
    except Exception as err:  # RuntimeError / ValueError / OSError from open_clip
        raise EncoderLoadError(f"cannot load an open_clip model from '{cfg.source}': {err}") from err
    if image_tower and getattr(model, "visual", None) is None:
        raise EncoderLoadError(f"'{cfg.source}' has no image tower")
    if not image_tower and getattr(model, "visual", None) is not None:
        model.visual, preprocess = None, None  # the text encoder never uses it: free its memory
    if isinstance(getattr(model, "text", None), TextTransformer):
        model.text.output_tokens = True  # forward returns (pooled, tokens)
    elif not isinstance(model, open_clip.CLIP):
        raise EncoderLoadError(f"'{cfg.source}': unsupported open_clip text tower "
                               f"({type(model).__name__}); expected open_clip's own text transformer")
    return model.eval().requires_grad_(False), tokenizer, preprocess


class FrozenCLIP(FrozenModule):
    """open_clip text tower: pooled (and per-token) caption embeddings; never trains."""

    def __init__(self, cfg: ClipEncoderConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.model, self.tokenizer, _ = load_open_clip(cfg, device)
        tower = self._tower()
        self.token_width = int(tower.transformer.width)
        projection = tower.text_projection
        if projection is None:
            self.width = self.token_width
        elif isinstance(projection, torch.nn.Linear):
            self.width = int(projection.out_features)
        else:
            self.width = int(projection.shape[1])
        self.context_length = int(tower.context_length)
        self.eval()


    def _tower(self) -> torch.nn.Module:
        """The module that holds the text weights: ``model.text`` or the CLIP model itself."""
        from open_clip.transformer import TextTransformer

        return self.model.text if isinstance(getattr(self.model, "text", None), TextTransformer) else self.model


    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, C) -> pooled (B, D) and final-layer tokens after ``ln_final`` (B, L, Dt), L ≤ C
        (at least the batch's longest caption)."""
        if self._tower() is not self.model:
            return self.model.text(ids)
        from open_clip.transformer import text_global_pool

        model = self.model  # open_clip.CLIP: encode_text, keeping the tokens
        mask = model.attn_mask
        if mask is not None and model.text_pool_type in ("argmax", "eos", "first"):
            # Causal attention: a position never sees the padding after it, so the tower can stop at
            # the batch's longest caption (25 of 77 positions for the demo's captions, a third of the cost).
            length = int(self._lengths(ids).max())
            ids, mask = ids[:, :length], mask[:length, :length]  # (B, L), (L, L)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast_dtype) + model.positional_embedding[: ids.shape[1]].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=mask))  # (B, L, Dt)
        pooled = text_global_pool(x, ids, model.text_pool_type,
                                  eos_token_id=getattr(model, "text_eos_id", None))  # (B, Dt)
        if isinstance(model.text_projection, torch.nn.Linear):
            pooled = model.text_projection(pooled)
        elif model.text_projection is not None:
            pooled = pooled @ model.text_projection  # (B, D)
        return pooled, x

    def _lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Real tokens per caption (B,), start and end tokens included."""
        tower = self._tower()
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool_type == "argmax":  # CLIP BPE: the end token has the largest id
            return ids.argmax(dim=-1) + 1
        eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if pool_type == "eos" and eos_id is not None:
            return (ids == eos_id).int().argmax(dim=-1) + 1
        return (ids != getattr(tower, "pad_id", 0)).sum(dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``{"pooled": (B, D)}`` float32, plus ``"tokens"`` (B, L, Dt) and
        ``"tokens_mask"`` (B, L) bool when ``return_tokens``; L = longest caption in tokens."""
        check_texts(texts)
        ids = self.tokenizer(list(texts)).to(self.device)  # (B, C), C = context length
        pooled, tokens = self._forward(ids)
        out = {"pooled": pooled.float()}
        if self.cfg.return_tokens:
            lengths = self._lengths(ids)  # (B,)
            length = int(lengths.max())
            mask = torch.arange(length, device=ids.device) < lengths.unsqueeze(1)  # (B, L)
            out["tokens"] = tokens[:, :length].float() * mask.unsqueeze(-1)  # (B, L, Dt), padding zeroed
            out["tokens_mask"] = mask
        return out

    def describe(self) -> dict:
        """JSON-ready identity and widths (for ``dataset.json``)."""
        return {
            "source": self.cfg.path if self.cfg.path is not None else self.cfg.model,
            "checkpoint": self.cfg.checkpoint,
            "width": self.width,
            "token_width": self.token_width,
            "context_length": self.context_length,
            "return_tokens": self.cfg.return_tokens,
            "dtype": self.cfg.dtype,
        }
