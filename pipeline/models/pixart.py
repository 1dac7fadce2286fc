"""PixArt-Σ (diffusers' ``PixArtTransformer2DModel``) behind our model contract, for one device.

References:
- Chen et al. 2024, "PixArt-Σ: Weak-to-Strong Training of Diffusion Transformer for 4K
  Text-to-Image Generation"; Chen et al. 2023, "PixArt-α" (adaLN-single, cross-attention to T5,
  the initialisation :func:`initialize_weights` follows: PixArt-alpha/PixArt-sigma ``PixArt.initialize_weights``).
- Esser et al. 2024 (SD3) and diffusers' flow schedulers for the time convention: the transformer
  gets ``timestep = σ·1000`` with σ = 1 noise (DESIGN.md §11), which is our ``t``.

:class:`PixArt` holds the diffusers model as ``.transformer`` (exported as it is: a stock
``PixArtSigmaPipeline`` loads it) and implements ``model(x, t, cond) -> v`` (``pipeline.models.dit``'s
contract): ``x`` (B, C, H, W), ``t`` (B,) in [0, 1] (0 = data), ``cond["t5"]`` (B, L, D) with
``cond["t5_mask"]`` (B, L); pooled or token CLIP keys are ignored (PixArt reads T5 only).

Classifier-free guidance: PixArt has no learned null. Stock ``PixArtSigmaPipeline`` uses the T5
encoding of the negative prompt ``""`` as its unconditional branch, so a row with
``cond["drop"]`` gets exactly that sequence: a non-persistent buffer (``null_t5`` (L0, D),
``null_t5_mask`` (L0,)) set once at build time with the run's frozen T5 (:meth:`PixArt.set_null`).
It is not in the state dict (the export is the plain transformer; the pipeline encodes ``""``
itself), so a model loaded back needs ``set_null`` again. Training with ``p_uncond`` then teaches
the model the unconditional velocity on exactly the branch stock sampling uses.

With ``out_channels = 2·in_channels`` (a pretrained PixArt that learned a variance, e.g. the
released Σ checkpoints) the first half is the prediction, as ``PixArtSigmaPipeline`` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel

PIXART_CONFIGS: dict[str, dict[str, int]] = {  # the keys of pipeline.models.dit.DIT_CONFIGS
    "PixArt-tiny": dict(depth=2, hidden_size=128, num_heads=4, patch_size=2),
    "PixArt-Sigma-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),  # caption_channels 4096: T5-XXL
}
IGNORED_KEYS = frozenset({"clip", "clip_tokens", "clip_tokens_mask"})
TIMESTEP_SCALE = 1000.0  # diffusers: timestep = σ · num_train_timesteps


def pixart_config(name: str, *, in_channels: int, sample_size: int, caption_channels: int, **overrides: Any) -> dict:
    """The ``PixArtTransformer2DModel`` kwargs of a registry size. ``overrides`` take our DiT keys
    (``depth``, ``hidden_size``, ``num_heads``, ``patch_size``) or any diffusers kwarg."""
    if name not in PIXART_CONFIGS:
        raise ValueError(f"unknown PixArt size {name!r} (known: {', '.join(PIXART_CONFIGS)})")
    ours = {**PIXART_CONFIGS[name], **{k: v for k, v in overrides.items() if k in PIXART_CONFIGS[name]}}
    theirs = {k: v for k, v in overrides.items() if k not in PIXART_CONFIGS[name]}
    width, heads = ours["hidden_size"], ours["num_heads"]
    if width % heads:
        raise ValueError(f"hidden_size {width} must be divisible by num_heads {heads}")
    return {
        "num_layers": ours["depth"], "num_attention_heads": heads, "attention_head_dim": width // heads,
        "cross_attention_dim": width, "patch_size": ours["patch_size"], "in_channels": in_channels,
        "out_channels": in_channels, "sample_size": sample_size, "caption_channels": caption_channels,
        "norm_type": "ada_norm_single", "use_additional_conditions": False, **theirs,
    }


def build_pixart(name: str, *, in_channels: int, sample_size: int, caption_channels: int, **overrides: Any) -> PixArt:
    """A registry size, freshly initialised (:func:`initialize_weights`), null not yet set."""
    from diffusers import PixArtTransformer2DModel  # here: its import loads every diffusers transformer (0.6 s of each training process's start)

    config = pixart_config(name, in_channels=in_channels, sample_size=sample_size, caption_channels=caption_channels, **overrides)
    transformer = PixArtTransformer2DModel(**config)
    initialize_weights(transformer)
    return PixArt(transformer)


def initialize_weights(transformer: PixArtTransformer2DModel) -> None:
    """PixArt's initialisation (DiT's, adapted): xavier-uniform Linears with zero biases, the patch
    embedding as a Linear; normal(0.02) for the timestep MLP, the adaLN-single projection and the
    caption MLP; zero for every cross-attention output and the final projection, so a fresh
    model outputs exactly zero (diffusers' constructor leaves PyTorch's defaults)."""
    def basic(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    transformer.apply(basic)
    w = transformer.pos_embed.proj.weight.data  # (D, C, p, p)
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(transformer.pos_embed.proj.bias)
    emb = transformer.adaln_single.emb.timestep_embedder
    normal = [emb.linear_1, emb.linear_2, transformer.adaln_single.linear]
    if transformer.caption_projection is not None:
        normal += [transformer.caption_projection.linear_1, transformer.caption_projection.linear_2]
    for layer in normal:
        nn.init.normal_(layer.weight, std=0.02)
    for layer in [*(block.attn2.to_out[0] for block in transformer.transformer_blocks), transformer.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class PixArt(nn.Module):
    """``model(x, t, cond) -> v`` over a ``PixArtTransformer2DModel`` (module docstring)."""

    architecture = "pixart"

    def __init__(self, transformer: PixArtTransformer2DModel) -> None:
        super().__init__()
        if transformer.config.caption_channels is None:
            raise ValueError("PixArt: the transformer has no caption projection (caption_channels): it cannot read T5")
        if transformer.use_additional_conditions:
            raise ValueError("PixArt: a transformer with use_additional_conditions (PixArt-α 1024 px) is not PixArt-Σ: "
                             "PixArtSigmaPipeline passes no resolution / aspect ratio")
        self.transformer = transformer
        width = transformer.config.caption_channels
        self.register_buffer("null_t5", torch.zeros(0, width), persistent=False)  # (L0, D): set_null fills it
        self.register_buffer("null_t5_mask", torch.zeros(0, dtype=torch.bool), persistent=False)  # (L0,)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (``pipeline.models.dit.compile_blocks`` compiles each)."""
        return self.transformer.transformer_blocks

    def set_null(self, embeddings: Tensor, mask: Tensor) -> None:
        """The T5 encoding of ``""``: embeddings (L0, D) and mask (L0,) (PixArtSigmaPipeline's negative prompt)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.transformer.config.caption_channels or mask.shape != embeddings.shape[:1]:
            raise ValueError(f"PixArt: the null text must be (L0, {self.transformer.config.caption_channels}) with a (L0,) mask, "
                             f"got {tuple(embeddings.shape)} and {tuple(mask.shape)}")
        self.null_t5 = embeddings.detach().to(self.null_t5.device, torch.float32)
        self.null_t5_mask = mask.detach().to(self.null_t5.device, torch.bool)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def save_pretrained(self, folder, **kwargs: Any) -> None:
        """The plain ``PixArtTransformer2DModel`` folder (what ``PixArtSigmaPipeline`` loads as ``transformer/``)."""
        self.transformer.save_pretrained(folder, **kwargs)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], cond["t5"] (B, L, D) -> velocity (B, C, H, W)."""
        text, mask = self._text(cond, x.shape[0])  # (B, L, D), (B, L)
        dtype = self.transformer.pos_embed.proj.weight.dtype  # DeepSpeed bf16: 16-bit weights, fp32 data (DESIGN.md §8)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=text.to(dtype),
            timestep=t.float() * TIMESTEP_SCALE,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]  # (B, C_out, H, W)
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out  # a learned variance's half dropped

    def _text(self, cond: Mapping[str, Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """T5 tokens and mask, dropped rows replaced by the null sequence (padded to a common length)."""
        unknown = set(cond) - IGNORED_KEYS - {"t5", "t5_mask", "drop"}
        if unknown:
            raise ValueError(f"PixArt: unknown cond keys {sorted(unknown)}")
        if "t5" not in cond:
            raise ValueError("PixArt: cond['t5'] (B, L, D) is required (PixArt-Σ reads T5 tokens)")
        text = cond["t5"]  # (B, L, D)
        mask = cond.get("t5_mask", torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)).bool()  # (B, L)
        if "drop" not in cond:
            return text, mask
        if self.null_t5_mask.numel() == 0:
            raise ValueError("PixArt: cond['drop'] needs the null text (set_null with the T5 encoding of \"\")")
        length = max(text.shape[1], self.null_t5.shape[0])
        text, mask = _pad(text, mask, length)
        null, null_mask = _pad(self.null_t5[None].to(text.dtype), self.null_t5_mask[None], length)  # (1, L, D), (1, L)
        drop = cond["drop"].bool()  # (B,)
        return torch.where(drop[:, None, None], null, text), torch.where(drop[:, None], null_mask, mask)


def _pad(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(B, L, D), (B, L) -> zero-padded, masked-out to (B, length, D), (B, length)."""
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    return nn.functional.pad(text, (0, 0, 0, extra)), nn.functional.pad(mask, (0, extra), value=False)


def flops_per_sample(model: PixArt, tokens_text: int) -> float:
    """Forward FLOPs of one sample at the config's ``sample_size`` (2 × multiply-accumulates):
    patch embedding, the caption MLP over L = ``tokens_text`` tokens, per block the self-attention
    (projections, N² scores and values), the cross-attention (q / out over N, k / v over L, N × L
    scores and values) and the MLP (4×), the adaLN-single projection once, the final projection.
    Not counted: norms, activations, softmax, the timestep MLP."""
    cfg = model.transformer.config
    D = cfg.num_attention_heads * cfg.attention_head_dim
    p, C, L = cfg.patch_size, cfg.in_channels, tokens_text
    n = (cfg.sample_size // p) ** 2
    block = 4 * n * D * D + 2 * n * n * D + 2 * n * D * D + 2 * L * D * D + 2 * n * L * D + 8 * n * D * D
    macs = n * C * p * p * D + L * (cfg.caption_channels * D + D * D) + cfg.num_layers * block + 6 * D * D
    macs += n * D * p * p * model.transformer.out_channels
    return 2.0 * macs
