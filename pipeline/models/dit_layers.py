"""The DiT's parts (``pipeline.models.dit`` assembles them): timestep / guidance embedders, the 1D
and 2D sin-cos position tables, text-token projections, the text refiner, attention, the adaLN-Zero
block and the final layer.

References: Peebles & Xie 2023 (DiT: adaLN-Zero blocks, ``timestep_embedding``, the position
table); Chen et al. 2023 (PixArt-α: cross-attention to T5 tokens with a pre-LayerNorm, no adaLN);
Esser et al. 2024 (SD3: per-head QK RMS-norm); Zhuo et al. 2024 (Lumina-Next) and Xie et al. 2024
(Sana): a few transformer layers that refine the frozen text encoder's tokens inside the
diffusion model, before the image tokens read them.
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


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base: int | None = None) -> Tensor:
    """2D sin-cos positional embedding (MAE / DiT) for a grid_h × grid_w grid of patches.

    Positions are patch indices 0..g−1 on each axis, so the default grid matches DiT and larger or
    non-square grids extend it. With ``base`` (PixArt-α's interpolation, Chen et al. 2023 §2.3),
    each axis's indices are scaled by ``base / g``: every grid spans the positions of the
    ``base × base`` grid the model was trained at. Returns (grid_h · grid_w, dim) float32,
    row-major over (h, w).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    scale_h, scale_w = (base / grid_h, base / grid_w) if base else (1.0, 1.0)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64) * scale_h, torch.arange(grid_w, dtype=torch.float64) * scale_w, indexing="ij"
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

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        if self.cross:
            S = context.shape[1]
            q = self.q(x).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
            kv = self.kv(context).view(B, S, 2, H, Dh).transpose(1, 3)  # (B, H, 2, S, Dh)
            k, v = kv.unbind(2)  # 2 × (B, H, S, Dh)
        else:
            qkv = self.qkv(x).view(B, N, 3, H, Dh).transpose(1, 3)  # (B, H, 3, N, Dh)
            q, k, v = qkv.unbind(2)  # 3 × (B, H, N, Dh); backward stacks straight into the Linear's layout
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, mask)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D) -> (B, N, D)


class Mlp(nn.Module):
    """Linear -> GELU (tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, PixArt-style cross-attention (pre-LayerNorm, no adaLN), adaLN-Zero MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross: bool, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, cross=False)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if cross else None
        self.cross_attn = Attention(hidden_size, num_heads, qk_norm, cross=True) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), c (B, D), context (B, S, D), mask (B, 1, 1, S) bool -> (B, N, D)."""
        modulation = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)  # 6 × (B, 1, D)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


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
    """adaLN (shift, scale) then Linear to p·p·C per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # 2 × (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p·p·C)
