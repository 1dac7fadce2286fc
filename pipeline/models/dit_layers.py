"""The DiT's parts (``pipeline.models.dit`` assembles them): timestep / guidance embedders, the 1D
and 2D sin-cos position tables, text-token projections, the text refiner, attention, the adaLN-Zero
block with cross-attention (``DiTBlock``), the two-stream joint-attention block (``JointBlock``)
and the final layer (these two with DiT's per-block adaLN or PixArt-α's adaLN-single tables).

References: Peebles & Xie 2023 (DiT: adaLN-Zero blocks, ``timestep_embedding``, the position
table); Chen et al. 2023 (PixArt-α: cross-attention to T5 tokens with a pre-LayerNorm, no adaLN;
adaLN-single, §2.3: one shared modulation MLP and a learned (6, D) table per block);
Esser et al. 2024 (SD3: per-head QK RMS-norm; the MMDiT block, §2 and Fig. 2: text and image
tokens keep their own weights and meet in one attention over both); Zhuo et al. 2024
(Lumina-Next) and Xie et al. 2024 (Sana): a few transformer layers that refine the frozen text
encoder's tokens inside the diffusion model, before the image tokens read them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FREQ_DIM = 256  # width of the sinusoidal timestep / guidance features (DiT)
TIME_SCALE = 1000.0  # t ∈ [0, 1] and guidance scales are embedded as value · 1000 (DiT / Flux)


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding(values: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """(B,) -> (B, dim) cos/sin features (ADM / DiT ``timestep_embedding``), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base: int | None = None, row_offset: int = 0) -> Tensor:
    """2D sin-cos positional embedding (MAE / DiT) for a grid_h × grid_w grid of patches.

    Positions are patch indices 0..g−1 on each axis, so the default grid matches DiT and larger or
    non-square grids extend it. With ``base`` (PixArt-α's interpolation, Chen et al. 2023 §2.3),
    each axis's indices are scaled by ``base / g``: every grid spans the positions of the
    ``base × base`` grid the model was trained at. ``row_offset`` shifts the row indices (the
    grid placed that many rows lower, before any scaling: FLUX.1 Kontext's own positions for the
    condition tokens). Returns (grid_h · grid_w, dim) float32, row-major over (h, w).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    scale_h, scale_w = (base / grid_h, base / grid_w) if base else (1.0, 1.0)
    ys, xs = torch.meshgrid(
        (torch.arange(grid_h, dtype=torch.float64) + row_offset) * scale_h, torch.arange(grid_w, dtype=torch.float64) * scale_w, indexing="ij"
    )  # (gh, gw) each
    out_w = xs.reshape(-1, 1) * omega[None]  # (N, dim/4)
    out_h = ys.reshape(-1, 1) * omega[None]  # (N, dim/4)
    # First half encodes the column (w), second half the row (h), as in DiT's get_2d_sincos_pos_embed.
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # (N, dim)
    return emb.float()


def sincos_pos_embed_1d(dim: int, length: int) -> Tensor:
    """(length, dim) float32 sin-cos table over positions 0..length−1 (Vaswani et al. 2017)."""
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)  # (dim/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (L, dim)


class ScalarEmbedder(nn.Module):
    """A scalar per row (timestep or guidance scale) -> (B, hidden): sinusoid of value·1000, then MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, values: Tensor) -> Tensor:
        features = sinusoidal_embedding(values.float() * TIME_SCALE, self.freq_dim)  # (B, freq_dim), float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, hidden)


class TokenProjection(nn.Module):
    """Text tokens (B, L, in_dim) -> (B, L, hidden): Linear, then LayerNorm."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.linear(tokens))


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------


SDPA_MIN_SCORES = 128 * 128  # on CPU, below N·S = this, attention is computed with plain matmuls


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention (B, H, N, Dh), (B, H, S, Dh) × 2 -> (B, H, N, Dh); mask (B, 1, 1, S) bool, True = attend.

    ``F.scaled_dot_product_attention`` everywhere except on CPU with short sequences
    (N·S < ``SDPA_MIN_SCORES``), where its flash CPU kernel measured 2–3× slower (forward + backward)
    than the same maths as matmul + softmax: the DiT-tiny demo has N = 16 image and ~16 text tokens.
    """
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] >= SDPA_MIN_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, N, S)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v  # (B, H, N, Dh)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) · (1 + scale) + shift, with shift and scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def split_heads(fused: Tensor, parts: int, num_heads: int) -> tuple[Tensor, ...]:
    """A fused projection (B, N, parts · D) -> parts × (B, H, N, Dh).

    Viewed as (B, N, parts, H, Dh) and transposed to (B, H, parts, N, Dh) before the unbind, so the
    backward stacks the gradients straight into the Linear's layout.
    """
    B, N, _ = fused.shape
    return fused.view(B, N, parts, num_heads, -1).transpose(1, 3).unbind(2)


def merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, Dh) -> (B, N, H · Dh)."""
    B, H, N, Dh = out.shape
    return out.transpose(1, 2).reshape(B, N, H * Dh)


class Attention(nn.Module):
    """Multi-head attention with fused projections and SDPA; self-attention when ``context`` is None.

    Self-attention uses one fused qkv Linear; cross-attention a q Linear on the image tokens and a
    fused kv Linear on the context. ``mask`` (B, 1, 1, S) bool marks the keys that take part.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, cross: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention's keys (k-normed with ``qk_norm``) and values: context (B, S, D) -> 2 × (B, H, S, Dh)."""
        k, v = split_heads(self.kv(context), 2, self.num_heads)
        return (self.k_norm(k) if self.qk_norm else k), v

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, D), context (B, S, D) or None, mask (B, 1, 1, S) bool or None -> (B, N, D);
        ``kv``: cross-attention's :meth:`keys_values` of ``context``, computed before (a sampler's memo)."""
        if self.cross:
            (q,) = split_heads(self.q(x), 1, self.num_heads)  # (B, H, N, Dh)
            k, v = self.keys_values(context) if kv is None else kv  # 2 × (B, H, S, Dh)
            q = self.q_norm(q) if self.qk_norm else q
        else:
            q, k, v = split_heads(self.qkv(x), 3, self.num_heads)  # 3 × (B, H, N, Dh)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, mask)  # (B, H, N, Dh)
        return self.proj(merge_heads(out))  # (B, N, D) -> (B, N, D)


class Mlp(nn.Module):
    """Linear -> GELU (tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, PixArt-style cross-attention (pre-LayerNorm, no adaLN), adaLN-Zero MLP.

    ``single`` (PixArt-α's adaLN-single, §2.3): the block holds no modulation MLP, only a learned
    table (6, D) (PixArt's ``scale_shift_table``), added to the shared modulation (B, 6D) that the
    model computes once per forward and passes in place of c.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross: bool, qk_norm: bool, single: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, cross=False)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if cross else None
        self.cross_attn = Attention(hidden_size, num_heads, qk_norm, cross=True) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.single = single
        if single:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))  # (6, D)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """c (B, D), or the shared modulation (B, 6D) with ``single`` -> 6 × (B, 1, D): shift,
        scale, gate for the attention, then for the MLP."""
        if self.single:
            return (c.view(c.shape[0], 6, -1) + self.scale_shift_table).chunk(6, dim=1)  # (B, 6, D) -> 6 × (B, 1, D)
        return self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, 6D) -> 6 × (B, 1, D)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, D), c (B, D) or (B, 6D) (``single``), context (B, S, D), mask (B, 1, 1, S) bool -> (B, N, D);
        ``kv``: the cross-attention's keys and values of ``context``, when computed before."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)  # 6 × (B, 1, D)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask, kv)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


def joint_mask(text_mask: Tensor | None, num_image: int) -> Tensor | None:
    """Key mask over the joint sequence [text; image]: (B, 1, 1, S) -> (B, 1, 1, S + N), every
    image token a key; None (every text token real) stays None."""
    if text_mask is None:
        return None
    image = text_mask.new_ones(*text_mask.shape[:-1], num_image)  # (B, 1, 1, N)
    return torch.cat([text_mask, image], dim=-1)  # (B, 1, 1, S + N)


class JointStream(nn.Module):
    """One stream (image or text tokens) of a ``JointBlock``, with weights of its own: adaLN-Zero
    modulation from c, non-affine LayerNorms, a fused qkv Linear, optional per-head qk RMSNorm, an
    output projection and an MLP.

    ``keys_only`` builds the text stream of the last block (SD3's ``context_pre_only``): its tokens
    are only read as keys and values, so it holds a fused kv Linear (and the k-norm) and a shift /
    scale modulation of its pre-attention norm (2·D, SD3's ``AdaLayerNormContinuous``), and no
    query, output projection, gates or MLP: no parameter is left without a gradient (DDP).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, keys_only: bool = False) -> None:
        super().__init__()
        self.num_heads, self.keys_only = num_heads, keys_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if keys_only:
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm and not keys_only else None
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None
        self.proj = None if keys_only else nn.Linear(dim, dim)
        self.norm2 = None if keys_only else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = None if keys_only else Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if keys_only else 6) * dim))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """c (B, D) -> 6 × (B, 1, D): shift, scale, gate for the attention, then for the MLP
        (with ``keys_only``, 2 × (B, 1, D): the attention's shift and scale)."""
        return self.adaLN_modulation(c)[:, None].chunk(2 if self.keys_only else 6, dim=-1)

    def heads(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, ...]:
        """x (B, L, D) -> q, k, v (B, H, L, Dh) each (k, v with ``keys_only``), from the modulated norm."""
        x = modulate(self.norm1(x), shift, scale)  # (B, L, D)
        fused = self.kv(x) if self.keys_only else self.qkv(x)  # (B, L, 2D) or (B, L, 3D)
        *q, k, v = split_heads(fused, 2 if self.keys_only else 3, self.num_heads)
        if self.k_norm is not None:
            q, k = [self.q_norm(q_) for q_ in q], self.k_norm(k)
        return (*q, k, v)

    def update(
        self, x: Tensor, out: Tensor, gate_msa: Tensor, shift_mlp: Tensor, scale_mlp: Tensor, gate_mlp: Tensor
    ) -> Tensor:
        """x (B, L, D) plus this stream's attention output out (B, H, L, Dh) through its gate, then the gated MLP."""
        x = torch.addcmul(x, gate_msa, self.proj(merge_heads(out)))  # (B, L, D)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """MMDiT block (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3 §2 and Fig. 2;
    diffusers' ``JointTransformerBlock``): image and text tokens are two streams with weights of
    their own (``JointStream``), both modulated by c, and one attention runs over their
    concatenation [text; image], so every token reads both; each stream adds its share of the
    output back through its own gate.

    The key mask covers the text keys (padding and the null sequence, as for cross-attention) and
    lets every image key through; the same text mask is applied in every block, so a masked text
    position, whatever the block makes of it, is never read by a real token. With ``last`` (the
    model's last block, SD3's ``context_pre_only``) the text only supplies keys and values: no text
    queries, and the text stream is returned unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, last: bool) -> None:
        super().__init__()
        self.image = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.text = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm, keys_only=last)

    def forward(self, x: Tensor, c: Tensor, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, D), c (B, D), context (B, S, D), mask (B, 1, 1, S) bool or None -> x (B, N, D), context (B, S, D)."""
        S, N = context.shape[1], x.shape[1]
        image_mod = self.image.modulation(c)  # 6 × (B, 1, D)
        text_mod = self.text.modulation(c)  # 6 × (B, 1, D), or 2 (shift, scale) in the last block
        q_image, k_image, v_image = self.image.heads(x, *image_mod[:2])  # 3 × (B, H, N, Dh)
        *q_text, k_text, v_text = self.text.heads(context, *text_mod[:2])  # 3 (or 2) × (B, H, S, Dh)
        q = torch.cat([*q_text, q_image], dim=2)  # (B, H, S + N, Dh); (B, H, N, Dh) in the last block
        k = torch.cat([k_text, k_image], dim=2)  # (B, H, S + N, Dh)
        v = torch.cat([v_text, v_image], dim=2)  # (B, H, S + N, Dh)
        out = attention(q, k, v, joint_mask(mask, N))  # (B, H, S + N, Dh) or (B, H, N, Dh)
        x = self.image.update(x, out[:, :, -N:], *image_mod[2:])  # (B, N, D)
        if self.text.keys_only:
            return x, context
        return x, self.text.update(context, out[:, :, :S], *text_mod[2:])  # (B, S, D)


class RefinerBlock(nn.Module):
    """A pre-LayerNorm transformer encoder layer over the text tokens (no timestep): masked
    self-attention, then MLP. Both residual branches start at zero, so a fresh refiner is the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, cross=False)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) bool (True = a key to attend to) -> (B, S, D)."""
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p·p·C per token. The shift and scale come from c through
    a SiLU + Linear (DiT), or with ``single`` from c plus a learned table (2, D) (PixArt-α's final
    layer: no projection of its own)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, single: bool = False) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.single = single
        if single:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))  # (2, D)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, D), c (B, D) -> (B, N, p·p·C)."""
        if self.single:
            shift, scale = (c[:, None] + self.scale_shift_table).chunk(2, dim=1)  # (B, 2, D) -> 2 × (B, 1, D)
        else:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # 2 × (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p·p·C)
