"""The frozen T5 text encoder: captions -> token embeddings (B, L, D) and their mask.

DESIGN.md §3 "Text conditions": the DiT attends to the T5 token sequence. Loaded with
transformers' ``AutoTokenizer`` and ``T5EncoderModel`` (never ``trust_remote_code``), so the
same config points at a small local model offline or at T5-XXL with network access. The
batch is padded to its longest caption; padded positions are zeroed and masked, and the
real tokens do not depend on the batch (padded keys are masked out of attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # transformers is imported where a T5 is loaded (~2 s at every CLI start otherwise)
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

from .common import EncoderLoadError, FrozenModule, check_local_source, check_texts, resolve_dtype


@dataclass(kw_only=True)
class T5EncoderConfig:
    """Where the T5 encoder and its tokenizer live, and how captions are cut."""

    path: str
    """Folder (or hub id) with T5 encoder weights and tokenizer files (transformers format)."""
    tokenizer: str | None = None
    """The tokenizer's folder (or hub id) where it is not ``path`` (a diffusers pipeline folder's
    ``tokenizer/`` beside its ``text_encoder/``)."""
    max_length: int = 128
    """Captions are truncated to this many tokens (including the end-of-sequence token)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        resolve_dtype(self.dtype)


@contextlib.contextmanager
def _whole() -> Iterator[None]:
    """Build whole, on this process alone, also inside a DeepSpeed ZeRO-3 run.

    accelerate registers a ZeRO-3 run's DeepSpeed config with transformers, whose
    ``from_pretrained`` then partitions every model it builds (``deepspeed.zero.Init``, with
    collectives): a frozen encoder that rank 0 alone loads for a sample grid or a report would
    wait for the other ranks forever. The registration is lifted while the encoder loads."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def load_t5(cfg: T5EncoderConfig, device: str | torch.device = "cpu",
            ) -> tuple[PreTrainedTokenizerBase, T5EncoderModel]:
    """Tokenizer + encoder from ``cfg.path`` with errors that name the path; eval, frozen, whole."""
    from transformers import AutoTokenizer, T5EncoderModel

    check_local_source(cfg.path, "T5 encoder", required=("config.json",))
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path)
        with _whole():
            model = T5EncoderModel.from_pretrained(cfg.path, dtype=resolve_dtype(cfg.dtype))
    except Exception as err:  # OSError / ValueError from transformers or the hub
        raise EncoderLoadError(f"cannot load a T5 encoder and tokenizer from '{cfg.path}': {err}") from err
    return tokenizer, model.to(device).eval().requires_grad_(False)


class FrozenT5(FrozenModule):
    """T5 encoder token embeddings for a batch of captions; never trains."""

    def __init__(self, cfg: T5EncoderConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer, self.model = load_t5(cfg, device)
        self.width = int(self.model.config.d_model)
        self.eval()



    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, L, D) float32 and mask (B, L) bool; L = longest in batch."""
        check_texts(texts)
        batch = self.tokenizer(list(texts), padding="longest", truncation=True,
                               max_length=self.cfg.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return hidden.float() * mask.unsqueeze(-1), mask

    def describe(self) -> dict:
        """JSON-ready identity and width (for ``dataset.json``)."""
        return {
            "source": self.cfg.path,
            "width": self.width,
            "max_length": self.cfg.max_length,
            "vocab_size": len(self.tokenizer),
            "dtype": self.cfg.dtype,
        }
