"""Latent adversarial distillation (``distill.adversarial``): a discriminator made of the frozen
teacher's block features and small trainable heads, composed with the consistency-distillation
loss of ``pipeline.training.distill``.

References: Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation" (LADD: the teacher as the discriminator's feature network, inputs re-noised
to a logit-normal ``s`` biased to high noise, heads conditioned on the noise level, hinge loss);
Chen et al. 2025, "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency Distillation"
(LADD composed with a consistency loss). The hinge losses are ``pipeline.training.gan_losses``'.

- Discriminator ``D(x0, s) = Σ_k head_k(teacher block_k(x_s), s)``, ``x_s = (1 − s)·x0 + s·ε``
  (``pipeline.diffusion.flow.interpolate``), ``s = sigmoid(s_mean + s_std·n)``; the teacher reads
  the batch's text; forward hooks on ``teacher.blocks[k]`` (``blocks``; default four spread over
  the upper three quarters of the depth: :func:`default_blocks`) give the image tokens (B, N, D).
  Each head: LayerNorm, a linear to ``head_width``, FiLM from an embedding of ``s`` (plus the
  pooled CLIP vector, when the teacher reads one), a 1D convolution over the tokens, a linear to
  one logit per token, averaged over the tokens: (B,). The last linear starts at zero: D starts
  at 0, so the generator term starts with no gradient and grows as the heads learn.
- Negatives: the student's ``x̂0 = f(x_t, t)`` of the consistency loss (the same forward), those
  rows whose ``t ≥ min_t`` (below it ``x_t`` nearly is the data and ``x̂0`` nearly a copy of the
  positive: the demo's discriminator learned nothing from such pairs); positives: the batch's
  latents. Each is re-noised with fresh ``s`` and ``ε``. The rows below ``min_t`` get weight 0
  (the shapes stay static: no sync).
- D (hinge, ``gan_losses.hinge_d_loss``: ``½·(E relu(1 − D(real)) + E_w relu(1 + D(fake)))``) on
  the window's detached fakes and reals: the teacher runs without a graph, only the heads get
  gradients (plain ``torch.autograd.backward``, never the DeepSpeed engine). G: ``−E D(fake)``
  (``E_w``: over the negatives) with the heads frozen, its gradient reaching the student through the teacher's activations
  (the teacher's parameters never get one); it joins the consistency loss in the recipe's one
  ``accelerator.backward``.

Schedule: G from optimizer step ``start_step`` on; the heads train from ``start_step − d_warmup``
(default 0: the same step) and take ``d_steps`` updates per student update, at the accumulation
window's boundary, each over every micro-batch of the window (gradients accumulated over them;
every update draws its own ``s`` and ``ε``), so the D:G ratio is ``d_steps`` whatever
``optim.grad_accum``. Before its step, each update's head gradients are averaged over the ranks
(one all-reduce of a flat buffer), so the replicated heads stay identical on every rank.

Precision: the heads' weights and their AdamW state are fp32 (a plain replicated module, not given
to accelerate or DeepSpeed); the teacher and the heads run under the run's autocast; logits and
losses are fp32. The heads' initial weights come from their own seeded generator (the training RNG
streams are not touched); the re-noising draws from the training streams, which the checkpoint
restores, so a resumed run continues exactly. With ``weight = 0`` nothing here is built or drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ConfigError
from pipeline.diffusion.flow import interpolate
from pipeline.models.dit_layers import ScalarEmbedder
from pipeline.training.checkpoint import load_tensors, save_tensors

HEADS_SEED = 1234  # the heads' initial weights: their own generator, the same on every rank


@dataclass(kw_only=True)
class AdversarialSection:
    """``distill.adversarial``: LADD's discriminator term (off at ``weight`` 0)."""

    weight: float = 0.0  # λ of the generator term: loss = consistency + λ·(−E D(fake)); 0: off, nothing built
    start_step: int = 0  # the generator term from this optimizer step on
    d_warmup: int = 0  # the heads start training this many steps before start_step
    d_steps: int = 1  # discriminator updates per student update (D:G ratio)
    lr: float = 1e-4  # the heads' AdamW (constant LR)
    betas: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 0.0  # max norm of the heads' gradients; 0: off
    blocks: list[int] | None = None  # teacher blocks whose outputs feed a head; None: 4 spread over the depth
    head_width: int = 128  # channels inside each head
    s_mean: float = 1.0  # the re-noise time s = sigmoid(s_mean + s_std·n): LADD biases it to high noise (at the
    # demo's 8x8 latents the heads separate nothing at 1 and learn at -1: configs/distill_demo.yaml's header)
    s_std: float = 1.0
    text: bool = True  # FiLM the heads with the pooled CLIP vector too (when the teacher reads one)
    min_t: float = 0.0  # negatives: the predictions from consistency times t >= min_t only

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0 (got {self.weight})")
        if self.start_step < 0 or self.d_warmup < 0:
            raise ValueError(f"start_step and d_warmup must be >= 0 (got {self.start_step}, {self.d_warmup})")
        if self.d_steps < 1 or self.head_width < 1:
            raise ValueError(f"d_steps and head_width must be >= 1 (got {self.d_steps}, {self.head_width})")
        if self.lr <= 0 or self.grad_clip < 0 or self.s_std <= 0:
            raise ValueError(f"lr and s_std must be > 0 and grad_clip >= 0 (got {self.lr}, {self.s_std}, {self.grad_clip})")
        if not 0 <= self.min_t < 1:
            raise ValueError(f"min_t must be in [0, 1) (got {self.min_t})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1) (got {self.betas})")
        if self.blocks is not None and (not self.blocks or min(self.blocks) < 0 or len(set(self.blocks)) != len(self.blocks)):
            raise ValueError(f"blocks must be distinct block indices >= 0, or null for the default (got {self.blocks})")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def d_start(self) -> int:
        """The first optimizer step whose window trains the heads."""
        return max(0, self.start_step - self.d_warmup)


def default_blocks(depth: int) -> list[int]:
    """Four block indices spread over ``[depth/4, depth − 1]`` (fewer when the model is shallower)."""
    points = torch.linspace(depth / 4, depth - 1, 4).tolist()
    return sorted({min(depth - 1, int(round(p))) for p in points})


def resolve_blocks(section: AdversarialSection, depth: int) -> list[int]:
    """The hooked blocks of a teacher of ``depth`` blocks; one line when an index is not one of them."""
    blocks = default_blocks(depth) if section.blocks is None else sorted(section.blocks)
    bad = [b for b in blocks if b >= depth]
    if bad:
        raise ConfigError(f"distill.adversarial.blocks: {bad} not a block of the teacher (its blocks are 0..{depth - 1})")
    return blocks


@contextmanager
def block_features(teacher: nn.Module, blocks: list[int]) -> Iterator[list[torch.Tensor]]:
    """Inside the context, each forward of ``teacher`` appends the image tokens (B, N, D) that
    ``teacher.blocks[k]`` returns, for each ``k`` of ``blocks`` in order (a joint block returns
    ``(image, text)``: its image stream)."""
    found: list[torch.Tensor] = []

    def keep(module, inputs, output):
        found.append(output[0] if isinstance(output, tuple) else output)

    handles = [teacher.blocks[k].register_forward_hook(keep) for k in blocks]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class Head(nn.Module):
    """Tokens (B, N, D) and a conditioning vector (B, W) -> one logit per sample (B,)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(width, hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.norm(tokens.to(self.proj.weight.dtype)))  # (B, N, H)
        scale, shift = self.film(c).chunk(2, dim=-1)  # (B, H) each
        h = F.silu(h * (1 + scale[:, None]) + shift[:, None])
        h = F.silu(self.conv(h.transpose(1, 2))).transpose(1, 2)  # (B, H, N) over the token sequence -> (B, N, H)
        return self.out(h).squeeze(-1).float().mean(1)  # (B, N) per-token logits -> (B,)


class Heads(nn.Module):
    """One :class:`Head` per hooked block, conditioned on the noise level ``s`` (and the pooled text);
    ``D`` is the sum of their logits."""

    def __init__(self, width: int, count: int, hidden: int, clip_dim: int = 0) -> None:
        super().__init__()
        self.s_embedder = ScalarEmbedder(hidden)
        self.clip_embedder = nn.Linear(clip_dim, hidden) if clip_dim else None
        self.heads = nn.ModuleList(Head(width, hidden) for _ in range(count))

    def forward(self, features: list[torch.Tensor], s: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
        """Block features [(B, N, D)] × count, noise levels (B,), pooled text (B, clip_dim) -> (B,)."""
        c = self.s_embedder(s)  # (B, H)
        if self.clip_embedder is not None and clip is not None:
            c = c + self.clip_embedder(clip.to(c.dtype))
        c = F.silu(c)
        return sum(head(tokens, c) for head, tokens in zip(self.heads, features, strict=True))


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the ranks (one all-reduce of a flat buffer); a no-op alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w·x / Σ w`` of (B,) values with 0/1 weights (B,); 0 when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp(min=1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, fake_weights: torch.Tensor) -> torch.Tensor:
    """``gan_losses.hinge_d_loss`` over the weighted negatives: ``½·(mean relu(1 − real) + E_w relu(1 + fake))``."""
    return 0.5 * (torch.relu(1 - real_logits).mean() + weighted_mean(torch.relu(1 + fake_logits), fake_weights))


def concat_cond(cond: dict, times: int) -> dict:
    """A batch's cond repeated ``times`` along the batch (the real and fake halves read the same text)."""
    return {k: torch.cat([v] * times) for k, v in cond.items()}


class Discriminator:
    """The frozen teacher's features and the trained heads with their optimizer, the window of
    (fake, real, cond) micro-batches the next D update reads, and its counters."""

    def __init__(self, section: AdversarialSection, teacher: nn.Module, autocast: Callable, device: torch.device) -> None:
        self.section, self.teacher, self.autocast = section, teacher, autocast
        config = teacher.config
        self.blocks = resolve_blocks(section, config["depth"])
        clip_dim = config.get("clip_dim", 0) if section.text else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEADS_SEED)
            self.heads = Heads(config["hidden_size"], len(self.blocks), section.head_width, clip_dim).to(device)
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=section.lr, betas=section.betas, weight_decay=0.0)
        self.window: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        self.updates = 0  # optimizer steps of the heads

    def logits(self, x0: torch.Tensor, cond: dict, through_teacher: bool = True) -> torch.Tensor:
        """``D`` of latents x0 (B, C, h, w), each re-noised at a fresh ``s``: (B,) fp32.
        ``through_teacher``: keep the graph through the teacher's activations (to x0: the
        generator term); else the teacher runs without one and only the heads get a graph (the
        D update). The teacher's own parameters never get gradients."""
        a = self.section
        s = torch.sigmoid(a.s_mean + a.s_std * torch.randn(x0.shape[0], device=x0.device))  # (B,)
        x_s = interpolate(x0, torch.randn_like(x0), s)
        grad = through_teacher and torch.is_grad_enabled()
        with self.autocast():
            with torch.set_grad_enabled(grad), block_features(self.teacher, self.blocks) as features:
                self.teacher(x_s, s, cond)
            return self.heads(features, s, cond.get("clip"))

    def generator_loss(self, fake: torch.Tensor, cond: dict, weights: torch.Tensor) -> torch.Tensor:
        """``−E_w D(fake)`` (``gan_losses.generator_loss`` over the weighted rows, ``weights`` (B,) 0/1)
        with the heads frozen: the gradient goes to ``fake`` (B, C, h, w) only."""
        self.heads.requires_grad_(False)
        try:
            fake_logits = self.logits(fake.float(), cond)
        finally:
            self.heads.requires_grad_(True)
        return -weighted_mean(fake_logits, weights)

    def remember(self, fake: torch.Tensor, real: torch.Tensor, cond: dict, weights: torch.Tensor) -> None:
        """Keep one micro-batch's detached fakes and reals (B, C, h, w), its cond and the fakes'
        weights (B,) for the window's D update."""
        self.window.append((fake.detach().float(), real.detach().float(), {k: v.detach() for k, v in cond.items()}, weights))

    def update(self) -> dict[str, torch.Tensor]:
        """``d_steps`` hinge updates of the heads over the window's micro-batches (the teacher without
        a graph), gradients averaged over the window and the ranks; clears the window. Returns the
        last update's D loss and mean logits (detached)."""
        stats: dict[str, torch.Tensor] = {}
        for _ in range(self.section.d_steps):
            stats = self.one_update()
        self.window.clear()
        return stats

    def one_update(self) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        total, real_mean, fake_mean, parts = 0.0, 0.0, 0.0, len(self.window)
        for fake, real, cond, weights in self.window:
            rows = fake.shape[0]
            logits = self.logits(torch.cat([real, fake]), concat_cond(cond, 2), through_teacher=False)  # (2B,): reals, fakes
            loss = hinge_d_loss(logits[:rows], logits[rows:], weights) / parts
            torch.autograd.backward(loss)  # the heads' gradients only (their inputs carry no graph)
            total = total + loss.detach()
            real_mean = real_mean + logits[:rows].detach().mean() / parts
            fake_mean = fake_mean + weighted_mean(logits[rows:].detach(), weights) / parts
        params = [p for p in self.heads.parameters() if p.grad is not None]
        all_reduce_mean([p.grad for p in params])
        if self.section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.section.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return {"d_loss": total, "d_real": real_mean, "d_fake": fake_mean}

    # ------------------------------------------------------------------ state

    def save(self, folder: Path) -> None:
        """The heads' weights (safetensors) and their optimizer state and counter (``torch.save``)."""
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}, str(folder / "ladd_heads.safetensors"))
        save_tensors({"optimizer": self.optimizer.state_dict(), "updates": self.updates}, folder / "ladd_optimizer.pt")

    def load(self, folder: Path) -> None:
        self.heads.load_state_dict(load_file(str(folder / "ladd_heads.safetensors"), device=str(next(self.heads.parameters()).device)))
        state = load_tensors(folder / "ladd_optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
