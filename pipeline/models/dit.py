"""Diffusion transformer over latents: architecture only, for one device.

References:
- Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT): patchify, adaLN-Zero
  blocks, zero-initialised modulation and final layer, the size registry
  (facebookresearch/DiT ``models.py``, which this file follows in layout).
- Chen et al. 2023, "PixArt-α": cross-attention from image tokens to T5 tokens after the
  self-attention, with a plain pre-LayerNorm and no adaLN; adaLN-single (§2.3, ``adaln="single"``):
  one modulation MLP c -> 6D shared by every block (PixArt's ``t_block``) plus a learned (6, D)
  table per block (its ``scale_shift_table``), and the final layer's shift / scale from c plus its
  own (2, D) table.
- Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3): per-head QK RMS-norm; the model
  predicts the rectified-flow velocity ``v = ε − x0`` (DESIGN.md §3 "Time"); the MMDiT block
  (§2, Fig. 2; also Flux's double-stream blocks), ``text_attention="joint"``: text and image
  tokens as two streams with their own weights, joined in one attention over both.
- Zhuo et al. 2024, "Lumina-Next" (its context refiner) and Xie et al. 2024, "Sana": transformer
  layers over the text tokens inside the diffusion model (``text_refiner_depth``), so the model
  can learn which words belong together (a colour with its object's position) before the image
  tokens read them; here with 1D sin-cos positions, since the refiner must know word order.
- Brooks et al. 2023, "InstructPix2Pix" (§3.2) and Black Forest Labs' Flux Control:
  ``image_condition="concat"``, the source latent concatenated on the channels, the patch
  embedding's extra input channels zero-initialised, so a text-to-image teacher starts it exactly.
- Black Forest Labs 2025, "FLUX.1 Kontext" (§3): ``image_condition="sequence"``, the source
  latent's tokens appended after the noisy ones with their own positions (here the grid placed
  below the image: rows gh..2gh−1), the prediction sliced back to the noisy tokens.

Contract used by the loss and the samplers: ``model(x, t, cond) -> v`` with ``x`` (B, C, H, W),
``t`` (B,) float in [0, 1] (0 = data, 1 = noise) and ``cond`` a dict of optional tensors:

    "t5" (B, L, text_dim), "t5_mask" (B, L) bool (True = real token)
    "clip" (B, clip_dim) pooled vector
    "clip_tokens" (B, L', clip_token_dim), "clip_tokens_mask" (B, L') bool
    "drop" (B,) bool: replace the row's text by the learned null condition (classifier-free guidance)
    "guidance" (B,) float guidance scale (only with ``guidance_embed``)
    "image" (B, C, H, W) the source latent (required with ``image_condition``, refused without)
    "drop_image" (B,) bool: the row's source is the null image, the zero latent (image guidance)

The null condition lives here. A dropped row's token sequence becomes the learned null sequence:
one learned token (hidden width, after the text projections) at position 0 with every other key
masked out, so its output does not depend on its text at all. Its pooled CLIP vector is replaced
by a learned null vector in ``clip_dim`` space (before the CLIP MLP). A row with no real token
(mask all False, or L = 0) gets the null sequence too, so no row ever attends to zero keys. Keys
the model's config does not use are ignored; unknown keys and missing required keys raise
``ValueError``.

How the image tokens read the text (``text_attention``): ``"cross"`` (PixArt-α) keeps the text
fixed after the projections / refiner and adds a cross-attention from image tokens to it in every
block; ``"joint"`` (SD3 MMDiT) carries the text through the blocks as a second residual stream,
with one attention over [text; image] per block. Both use the same key mask, so padding and the
null sequence behave alike.

Activation checkpointing is the diffusers mechanism (``model.enable_gradient_checkpointing()``,
or ``gradient_checkpointing=True`` at construction; not saved in the config).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from pipeline.models.dit_layers import (
    DiTBlock,
    FinalLayer,
    JointBlock,
    RefinerBlock,
    ScalarEmbedder,
    TokenProjection,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)

COND_KEYS = frozenset({"t5", "t5_mask", "clip", "clip_tokens", "clip_tokens_mask", "drop", "guidance", "image", "drop_image"})
TEXT_ATTENTION = ("cross", "joint")  # how the image tokens read the text: PixArt-α or SD3 MMDiT
TEXT_INPUTS = ("t5", "t5_mask", "clip_tokens", "clip_tokens_mask", "drop")  # what the text context depends on
# (B, S, D) context, (B, 1, 1, S) key mask or None, each cross-attention block's (k, v) 2 × (B, H, S, Dh) or None
TextContext = tuple[Tensor | None, Tensor | None, list[tuple[Tensor, Tensor]] | None]
TEXT_MEMO_SIZE = 4  # distinct text conditions kept inside ``reusing_text`` (an edit alternates two)
IMAGE_CONDITION = ("concat", "sequence")  # how a source latent enters: InstructPix2Pix / Flux Control, or FLUX.1 Kontext
ADALN = ("block", "single")  # the blocks' modulation: DiT's adaLN-Zero MLP per block, or PixArt-α's adaLN-single
# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned DiT predicting the rectified-flow velocity; see the module docstring.

    ``sample_size`` is the default latent side (any multiple of ``patch_size`` works at forward
    time); ``text_dim`` / ``clip_token_dim`` are the T5 / CLIP token widths and ``clip_dim`` the
    pooled CLIP width (0 = not used); ``qk_norm`` adds per-head RMSNorm on queries and keys;
    ``guidance_embed`` adds an embedding of ``cond["guidance"]`` to the conditioning vector (for a
    guidance-distilled student). ``pos_interpolation`` scales every grid's positions to span the
    default ``sample_size`` grid (PixArt-α), instead of extending the indices (DiT).
    ``text_refiner_depth`` > 0 runs that many masked transformer layers over the concatenated text
    before any block reads it. When the model's own layers read the text with attention over it
    (a refiner, or joint blocks), 1D sin-cos positions are added to each projected token sequence
    first: word order is what tells which colour goes with which position.
    ``text_attention`` is ``"cross"`` (``DiTBlock``: self-attention, then cross-attention to the
    text) or ``"joint"`` (``JointBlock``, SD3's MMDiT: text and image tokens in two streams with
    their own weights and one attention over both; the last block updates only the image tokens;
    needs text tokens).
    ``image_condition`` (an image-to-image model, ``cond["image"]`` the source latent): ``"concat"``
    widens the patch embedding to ``2·in_channels`` inputs, [noisy ‖ source], its source half
    zero-initialised (InstructPix2Pix, Flux Control); ``"sequence"`` patchifies the source with
    the same embedding and appends its tokens, positioned on the grid below the image, to the noisy
    ones through every block, and keeps the first N tokens' prediction (FLUX.1 Kontext). The
    output has ``in_channels`` either way.
    ``adaln`` is ``"block"`` (DiT: each block and the final layer map c to their modulation with
    a SiLU + Linear of their own) or ``"single"`` (PixArt-α's adaLN-single: one SiLU + Linear
    c -> 6D, ``adaln_single``, computed once per forward, plus a learned (6, D) table per block;
    the final layer adds its (2, D) table to c; with ``text_attention="cross"`` only): about
    (depth − 1)·6·D² + 2·D² fewer parameters, a fifth of DiT-B/2's.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock", "JointBlock"]
    ignore_for_config = ["gradient_checkpointing"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        text_dim: int = 0,
        clip_dim: int = 0,
        clip_token_dim: int = 0,
        qk_norm: bool = False,
        guidance_embed: bool = False,
        pos_interpolation: bool = False,
        text_refiner_depth: int = 0,
        text_attention: str = "cross",
        image_condition: str | None = None,
        adaln: str = "block",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads ({num_heads}) and by 4")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be a multiple of patch_size {patch_size}")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.pos_base = sample_size // patch_size if pos_interpolation else None
        self.has_text = text_dim > 0 or clip_token_dim > 0
        if text_attention not in TEXT_ATTENTION:
            raise ValueError(f"text_attention must be one of {', '.join(map(repr, TEXT_ATTENTION))}, got {text_attention!r}")
        if text_attention == "joint" and not self.has_text:
            raise ValueError('text_attention="joint" needs text tokens (text_dim or clip_token_dim)')
        self.joint = text_attention == "joint"
        if image_condition is not None and image_condition not in IMAGE_CONDITION:
            raise ValueError(f"image_condition must be None or one of {', '.join(map(repr, IMAGE_CONDITION))}, got {image_condition!r}")
        self.image_condition = image_condition
        if adaln not in ADALN:
            raise ValueError(f"adaln must be one of {', '.join(map(repr, ADALN))}, got {adaln!r}")
        if adaln == "single" and self.joint:
            raise ValueError('adaln="single" needs text_attention="cross" (a joint block modulates two streams of its own)')
        single = adaln == "single"
        embedded = 2 * in_channels if image_condition == "concat" else in_channels  # [noisy ‖ source] channels
        self.x_embedder = nn.Conv2d(embedded, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = ScalarEmbedder(hidden_size)
        self.guidance_embedder = ScalarEmbedder(hidden_size) if guidance_embed else None
        self.clip_embedder = self._pooled_mlp(clip_dim, hidden_size) if clip_dim else None
        self.null_clip = nn.Parameter(torch.zeros(clip_dim)) if clip_dim else None  # (clip_dim,)
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if single else None
        self.t5_proj = TokenProjection(text_dim, hidden_size) if text_dim else None
        self.clip_token_proj = TokenProjection(clip_token_dim, hidden_size) if clip_token_dim else None
        self.null_text = nn.Parameter(torch.zeros(1, 1, hidden_size)) if self.has_text else None  # (1, 1, D)
        if text_refiner_depth and not self.has_text:
            raise ValueError("text_refiner_depth needs text tokens (text_dim or clip_token_dim)")
        self.text_refiner = nn.ModuleList(
            RefinerBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(text_refiner_depth)
        )
        self.blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, last=i == depth - 1)
            if self.joint
            else DiTBlock(hidden_size, num_heads, mlp_ratio, cross=self.has_text, qk_norm=qk_norm, single=single)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, single=single)
        self._pos_cache: dict[tuple, Tensor] = {}
        self._text_memo: list[tuple[tuple, TextContext]] | None = None  # inside reusing_text
        self.gradient_checkpointing = False
        self.initialize_weights()
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @staticmethod
    def _pooled_mlp(in_dim: int, hidden_size: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def initialize_weights(self) -> None:
        """The one place for initialisation (DiT): a fresh model outputs exactly zero.

        xavier-uniform for every Linear and the patch embedding (as a Linear over the noisy
        latent's channels; with ``image_condition="concat"`` the source's channels are zero, so
        the source has no effect until trained: InstructPix2Pix's initialisation), zero biases;
        normal(0.02) for the timestep / guidance / pooled-CLIP MLPs and the null condition; zero
        for every adaLN modulation output layer (both streams of a joint block), the
        cross-attention output projections and the final Linear. With ``adaln="single"`` the
        shared modulation Linear and every table are zero too (PixArt-α draws them at random,
        normal(0.02) and randn/√D: here adaLN-Zero holds, as for ``"block"``). A fresh block (any
        kind) is then the identity on every stream it returns.
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.weight.data  # (D, C, p, p); concat: (D, 2C, p, p)
        if self.image_condition == "concat":
            noisy = torch.empty_like(w[:, : self.in_channels])  # (D, C, p, p)
            nn.init.xavier_uniform_(noisy.view(w.shape[0], -1))  # as a text-to-image model's (D, C·p·p)
            w[:, : self.in_channels] = noisy
            w[:, self.in_channels :] = 0.0  # the source's channels
        else:
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear (D, C·p·p)
        nn.init.zeros_(self.x_embedder.bias)
        for mlp in (self.t_embedder.mlp, getattr(self.guidance_embedder, "mlp", None), self.clip_embedder):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        for null in (self.null_text, self.null_clip):
            if null is not None:
                nn.init.normal_(null, std=0.02)
        zero_init = [self.final_layer.linear]
        if self.adaln_single is not None:
            zero_init.append(self.adaln_single[-1])
            for table in [self.final_layer.scale_shift_table, *(block.scale_shift_table for block in self.blocks)]:
                nn.init.zeros_(table)
        else:
            zero_init.append(self.final_layer.adaLN_modulation[-1])
        for layer in self.text_refiner:
            zero_init += [layer.attn.proj, layer.mlp.fc2]
        for block in self.blocks:
            if isinstance(block, JointBlock):
                zero_init += [block.image.adaLN_modulation[-1], block.text.adaLN_modulation[-1]]
                continue
            if not block.single:
                zero_init.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zero_init.append(block.cross_attn.proj)
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], cond (module docstring) -> velocity (B, C, H, W)."""
        cond = self._check_inputs(x, t, {} if cond is None else cond)
        x, cond = self._cast_inputs(x, cond)
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        source = self._source(cond) if self.image_condition is not None else None  # (B, C, H, W)
        h = self._patches(torch.cat([x, source], dim=1) if self.image_condition == "concat" else x, gh, gw)  # (B, N, D)
        if self.image_condition == "sequence":
            h = torch.cat([h, self._patches(source, gh, gw, row_offset=gh)], dim=1)  # (B, 2N, D): [noisy; source]
        c = self._conditioning(t.expand(B) if t.ndim == 0 else t, cond)  # (B, D)
        block_c = c if self.adaln_single is None else self.adaln_single(c)  # (B, D), or the shared (B, 6D)
        context, mask, kv = self._text_context(cond, B)  # (B, S, D), (B, 1, 1, S) or None, per-block (k, v) or None
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                out = self._gradient_checkpointing_func(block, h, block_c, context, mask)
            else:
                out = block(h, block_c, context, mask) if kv is None else block(h, block_c, context, mask, kv[i])
            # DiTBlock -> h (B, N, D); JointBlock -> (h, context): the text stream moves on too.
            h, context = out if self.joint else (out, context)
        if self.image_condition == "sequence":
            h = h[:, : gh * gw]  # (B, N, D): the noisy tokens' prediction only (the loss covers the target alone)
        h = self.final_layer(h, c)  # (B, N, p·p·C)
        return self.unpatchify(h, gh, gw)

    def _patches(self, x: Tensor, gh: int, gw: int, row_offset: int = 0) -> Tensor:
        """Latent (B, C', H, W) -> tokens (B, N, D) with their sin-cos positions (rows offset by ``row_offset``)."""
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D), a strided view
        # Table first: the sum takes its contiguous layout, so the residual stream is contiguous
        # (with the view first, every later op inherited the (B, D, N) strides and LayerNorm copied).
        return torch.add(self._pos_embed(gh, gw, h.dtype, h.device, row_offset), h)  # (B, N, D)

    def _source(self, cond: Mapping[str, Tensor]) -> Tensor:
        """The source latent (B, C, H, W); rows with ``drop_image`` get the null image, zeros (no sync)."""
        image = cond["image"]
        if "drop_image" in cond:
            image = torch.where(cond["drop_image"].bool()[:, None, None, None], torch.zeros((), dtype=image.dtype, device=image.device), image)
        return image

    def unpatchify(self, h: Tensor, gh: int, gw: int) -> Tensor:
        """(B, N, p·p·C) -> (B, C, gh·p, gw·p); token order row-major, features ordered (p, p, C)."""
        p, C = self.patch_size, self.in_channels
        h = h.reshape(h.shape[0], gh, gw, p, p, C)  # (B, gh, gw, p, p, C)
        h = h.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return h.reshape(h.shape[0], C, gh * p, gw * p)  # (B, C, H, W)

    def _pos_embed(self, gh: int, gw: int, dtype: torch.dtype, device: torch.device, row_offset: int = 0) -> Tensor:
        """(1, gh·gw, D) sin-cos table for this grid (rows offset by ``row_offset``), cached per (grid, dtype, device)."""
        key = (gh, gw, dtype, device) if not row_offset else (gh, gw, dtype, device, row_offset)
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_pos_embed_2d(self.hidden_size, gh, gw, self.pos_base, row_offset)
            table = table.to(device=device, dtype=dtype)[None]  # (1, N, D)
            self._pos_cache[key] = table
        return table

    def _conditioning(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """c (B, D) = timestep MLP + pooled-CLIP MLP (null vector for dropped rows) + guidance MLP."""
        c = self.t_embedder(t)  # (B, D)
        if self.clip_embedder is not None:
            clip = cond["clip"]  # (B, clip_dim)
            if "drop" in cond:
                clip = torch.where(cond["drop"].bool()[:, None], self.null_clip.to(clip.dtype), clip)
            c = c + self.clip_embedder(clip.to(c.dtype))
        if self.guidance_embedder is not None:
            c = c + self.guidance_embedder(cond["guidance"])
        return c

    @contextmanager
    def reusing_text(self) -> Iterator["DiT"]:
        """Within the block, a forward whose text inputs (``TEXT_INPUTS``, compared by value) match
        one of the last ``TEXT_MEMO_SIZE`` seen reuses its text context: the projections, the
        refiner, the null rows and every cross-attention block's keys and values, which depend on
        neither x nor t (a joint block's text stream does: it is recomputed). A sampler calls the model with
        the same text at every step (the guided batch included), so a 50-step sample computes it
        once instead of 50 times. Only without autograd, and only while the weights stay put: for
        sampling, not training. Nested blocks share the outer memo."""
        outer = self._text_memo
        self._text_memo = [] if outer is None else outer
        try:
            yield self
        finally:
            self._text_memo = outer

    def _text_context(self, cond: Mapping[str, Tensor], batch: int) -> TextContext:
        """:meth:`_build_text_context` (no keys and values computed ahead), or its memo inside
        :meth:`reusing_text` with each cross-attention block's keys and values."""
        if self._text_memo is None or torch.is_grad_enabled() or not self.has_text:
            return (*self._build_text_context(cond, batch), None)
        inputs = (batch, *(cond.get(key) for key in TEXT_INPUTS))
        for seen, text in self._text_memo:
            if all(_same_value(a, b) for a, b in zip(seen, inputs)):
                return text
        context, mask = self._build_text_context(cond, batch)
        kv = None if self.joint else [block.cross_attn.keys_values(context) for block in self.blocks]
        kept = tuple(v.clone() if torch.is_tensor(v) else v for v in inputs)  # the caller may reuse its buffers
        self._text_memo[:] = [(kept, (context, mask, kv)), *self._text_memo[: TEXT_MEMO_SIZE - 1]]
        return context, mask, kv

    def _build_text_context(self, cond: Mapping[str, Tensor], batch: int) -> tuple[Tensor | None, Tensor | None]:
        """Projected token sequences, concatenated, with the learned null token where needed.

        Returns context (B, S, D) and key mask (B, 1, 1, S) bool. Without masks and without
        ``drop``, every key is real and the mask is None. Otherwise a row that is dropped or has no
        real token gets the null sequence: the null token at position 0, every other key masked
        out, so its output does not depend on its text. (With L = 0 the null token is the sequence.)
        """
        if not self.has_text:
            return None, None
        sequences, masks = [], []
        for key, proj in (("t5", self.t5_proj), ("clip_tokens", self.clip_token_proj)):
            if proj is not None:
                sequences.append(self._text_positions(proj(cond[key])))  # (B, L_k, D)
                masks.append(cond.get(f"{key}_mask"))  # (B, L_k) or None
        tokens = torch.cat(sequences, dim=1) if len(sequences) > 1 else sequences[0]  # (B, L, D)
        null = self.null_text.to(tokens.dtype)  # (1, 1, D)
        if tokens.shape[1] == 0:
            return null.expand(batch, 1, -1), None  # (B, 1, D): every row is text-less
        if "drop" not in cond and all(m is None for m in masks):
            return self._refine(tokens, None), None
        ones = [seq.new_ones(seq.shape[:2], dtype=torch.bool) for seq in sequences]  # (B, L_k) each
        real = torch.cat([o if m is None else m.bool() for m, o in zip(masks, ones)], dim=1)  # (B, L)
        first = torch.arange(tokens.shape[1], device=tokens.device)[None] == 0  # (1, L)
        # The refiner sees each row's real tokens (key 0 too, so a text-less row attends to something);
        # a dropped row's refined text is replaced by the null sequence below, whatever it was.
        refine_mask = (real | first)[:, None, None, :]  # (B, 1, 1, L)
        if "drop" in cond and len(self.text_refiner) and not torch.is_grad_enabled():
            # Inference (guidance's null half): only the kept rows are refined. Finding them costs a
            # device sync, so training (a tenth of the rows dropped) refines every row instead.
            kept = (~cond["drop"].bool()).nonzero().squeeze(1)  # (K,)
            tokens = tokens.index_copy(0, kept, self._refine(tokens[kept], refine_mask[kept]))
        else:
            tokens = self._refine(tokens, refine_mask)
        if "drop" in cond:
            real = real & ~cond["drop"].bool()[:, None]  # (B, L)
        null_slot = ~real.any(dim=1, keepdim=True) & first  # (B, L): position 0 of null rows
        context = torch.where(null_slot[:, :, None], null, tokens)  # (B, L, D)
        return context, (real | null_slot)[:, None, None, :]  # (B, 1, 1, L)

    def _text_positions(self, tokens: Tensor) -> Tensor:
        """(B, L, D) + the 1D sin-cos table when a refiner or joint blocks read word order from it."""
        if not len(self.text_refiner) and not self.joint:
            return tokens
        key = ("text", tokens.shape[1], tokens.dtype, tokens.device)
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_pos_embed_1d(self.hidden_size, tokens.shape[1]).to(device=tokens.device, dtype=tokens.dtype)
            self._pos_cache[key] = table  # (L, D)
        return tokens + table

    def _refine(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """The text refiner's layers over (B, L, D) with key mask (B, 1, 1, L) or None."""
        for layer in self.text_refiner:
            tokens = layer(tokens, mask)
        return tokens

    def _cast_inputs(self, x: Tensor, cond: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Latents and text features in the weights' dtype (DESIGN.md §8: inputs are cast where they
        meet the model). Under DeepSpeed bf16/fp16 the weights themselves are 16-bit while the data
        arrive in float32; under autocast the weights stay fp32 and this is a no-op. ``t`` and the
        guidance scale stay float32: their sinusoidal features are computed in float32."""
        dtype = self.x_embedder.weight.dtype
        cast = {k: v.to(dtype) if k in ("t5", "clip", "clip_tokens", "image") else v for k, v in cond.items()}
        return x.to(dtype), cast

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Shapes and keys, checked without touching tensor values (no device sync)."""
        unknown = set(cond) - COND_KEYS
        if unknown:
            raise ValueError(f"DiT: unknown cond keys {sorted(unknown)} (known: {sorted(COND_KEYS)})")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiT: x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DiT: latent size {H}x{W} is not a multiple of patch_size {self.patch_size}")
        if t.shape not in ((B,), ()):
            raise ValueError(f"DiT: t must be (B,) = ({B},), got {tuple(t.shape)}")
        cfg = self.config
        required = {"t5": cfg.text_dim, "clip": cfg.clip_dim, "clip_tokens": cfg.clip_token_dim}
        for key, width in required.items():
            if width and key not in cond:
                raise ValueError(f"DiT: cond[{key!r}] is required (the model was built with width {width})")
            if width and (cond[key].shape[0] != B or cond[key].shape[-1] != width):
                raise ValueError(f"DiT: cond[{key!r}] must be (B={B}, ..., {width}), got {tuple(cond[key].shape)}")
            mask = cond.get(f"{key}_mask")
            if width and mask is not None and mask.shape != cond[key].shape[:2]:
                raise ValueError(f"DiT: cond['{key}_mask'] {tuple(mask.shape)} != {tuple(cond[key].shape[:2])}")
        if cfg.guidance_embed and "guidance" not in cond:
            raise ValueError("DiT: cond['guidance'] (B,) is required (the model was built with guidance_embed)")
        for key in ("drop", "guidance", "drop_image"):
            if key in cond and cond[key].shape != (B,):
                raise ValueError(f"DiT: cond[{key!r}] must be (B,) = ({B},), got {tuple(cond[key].shape)}")
        if self.image_condition is None and "image" in cond:
            raise ValueError("DiT: cond['image'] given, but this model has no image_condition (a text-to-image model)")
        if self.image_condition is not None:
            if "image" not in cond:
                raise ValueError(f"DiT: cond['image'] (B, C, H, W), the source latent, is required (image_condition={self.image_condition!r})")
            if cond["image"].shape != x.shape:
                raise ValueError(f"DiT: cond['image'] must have x's shape {tuple(x.shape)}, got {tuple(cond['image'].shape)}")
        return cond


def _same_value(a: Any, b: Any) -> bool:
    """Equal numbers / None, or tensors of one shape, dtype and device holding equal values."""
    if torch.is_tensor(a) != torch.is_tensor(b):
        return False
    if not torch.is_tensor(a):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Counting, FLOPs and the size registry
# ----------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not); works on ``meta``-device models."""
    return sum(p.numel() for p in model.parameters())


def _full_config(config: Mapping[str, Any] | DiT) -> dict[str, Any]:
    """A DiT config with every constructor default filled in."""
    given = dict(config.config) if isinstance(config, DiT) else dict(config)
    defaults = {
        name: p.default
        for name, p in inspect.signature(DiT.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **given}


def flops_per_sample(config: Mapping[str, Any] | DiT, tokens_text: int) -> float:
    """Forward FLOPs of one sample at the config's ``sample_size`` (2 × multiply-accumulates).

    Counted: patch embedding; per block the self-attention qkv / output projections and its
    score and value matmuls over the N image tokens, the MLP and the adaLN modulation; with text
    (``text_dim`` or ``clip_token_dim``), the text projection (assumed from ``text_dim`` when set)
    and the text refiner's layers over ``tokens_text`` = L tokens, and per block:
    - ``text_attention="cross"``: the cross-attention q / output projections over N, k / v
      projections over the L keys and its N × L score and value matmuls;
    - ``"joint"``: the text stream's qkv / output projections, MLP and adaLN modulation over L, and
      the scores and values over all (L + N)² query-key pairs (instead of the image-only N²); in
      the last block the text stream has only its k / v projections and a shift / scale
      modulation, and only the N image tokens query the L + N keys.
    Then the final layer. With ``adaln="single"`` the adaLN modulation is counted once (one
    shared c -> 6D) instead of per block, and the final layer has none. With ``image_condition``:
    ``"concat"`` doubles the patch embedding's input channels; ``"sequence"`` embeds the source too
    and runs the blocks over 2N image tokens (N of them from the source; the final layer over the N
    noisy ones). Not counted: norms, activations, softmax and the timestep / CLIP / guidance MLPs
    (per sample, tiny). Training (forward + backward) ≈ 3 × this; with activation
    checkpointing ≈ 4 ×.
    """
    cfg = _full_config(config)
    D, p, C, depth = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"], cfg["depth"]
    out = (cfg["sample_size"] // p) ** 2  # the noisy latent's tokens (what the final layer predicts)
    image_condition = cfg.get("image_condition")
    n = 2 * out if image_condition == "sequence" else out  # image tokens through the blocks: [noisy; source]
    hidden_mlp = int(D * cfg["mlp_ratio"])
    text_width = cfg["text_dim"] or cfg["clip_token_dim"]
    L = tokens_text if text_width else 0
    macs = n * C * p * p * D * (2 if image_condition == "concat" else 1)  # patch embedding
    image = 4 * n * D * D + 2 * n * D * hidden_mlp + 6 * D * D  # qkv + out projections, MLP, adaLN modulation
    if text_width and cfg["text_attention"] == "joint":
        text = 4 * L * D * D + 2 * L * D * hidden_mlp + 6 * D * D  # the same over the L text tokens
        joint = 2 * (n + L) * (n + L) * D  # scores + values over [text; image]
        last = 2 * L * D * D + 2 * D * D + 2 * n * (n + L) * D  # text k + v, its shift / scale; N queries
        macs += (depth - 1) * (image + text + joint) + image + last
    else:
        block = image + 2 * n * n * D  # scores + values
        if text_width:
            block += 2 * n * D * D + 2 * L * D * D + 2 * n * L * D  # q + out, k + v, scores + values
        macs += depth * block
    if text_width:
        macs += L * text_width * D  # text projection
    if L:  # the text refiner: qkv + out projections, scores + values, MLP over the L text tokens
        macs += cfg["text_refiner_depth"] * (4 * L * D * D + 2 * L * L * D + 2 * L * D * hidden_mlp)
    if cfg["adaln"] == "single":  # one shared modulation instead of one per block and the final layer's
        macs += 6 * D * D - depth * 6 * D * D
    else:
        macs += 2 * D * D  # final adaLN
    macs += out * D * p * p * C  # final Linear
    return 2.0 * macs


DIT_CONFIGS: dict[str, dict[str, int]] = {
    "DiT-tiny": dict(depth=6, hidden_size=128, num_heads=4, patch_size=2),
    "DiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}


def compile_blocks(model: DiT) -> DiT:
    """``torch.compile`` each transformer block in place (torchtitan's per-block compilation): the
    blocks share one compiled graph, so compiling costs one block's time whatever the depth, and
    parameter names stay as they are. Apply after any copy of the model is taken (an EMA). With
    ``text_attention="joint"`` the last block (no text stream after it) compiles once more."""
    for block in model.blocks:
        block.compile()
    return model


def build_dit(name: str, **overrides: Any) -> DiT:
    """A registry size with constructor overrides, e.g. ``build_dit("DiT-S/2", text_dim=4096, clip_dim=768)``."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT size {name!r} (known: {', '.join(DIT_CONFIGS)})")
    return DiT(**{**DIT_CONFIGS[name], **overrides})
