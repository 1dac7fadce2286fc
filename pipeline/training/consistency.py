"""What consistency distillation and teacher-free consistency training share: the distance between
two consistency-function outputs, and the teacher-free recipe's settings (``ct`` section) with its
``r(t)`` curricula.

References: Song et al. 2023, "Consistency Models" (consistency training, Alg. 3); Song & Dhariwal
2023, "Improved Techniques for Training Consistency Models" (iCT: pseudo-Huber, no EMA teacher, N
doubling); Geng et al. 2024, "Consistency Models Made Easy" (ECT: r(t) from a pretrained
diffusion model, ``r = t·(1 − q^−(stage+1)·(1 + k·σ(−b·t)))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

T_MAX = 1 - 1e-3  # t is clamped here wherever σ = t/(1 − t) is taken (σ ≤ 999; EDM's σ_max is 80)


@dataclass(kw_only=True)
class CTSection:
    """``distill.mode: ct`` (``pipeline.training.consistency_training``): the ``r(t)`` curriculum,
    the target network and the loss weighting. The distance and its constant are ``distill.loss``
    / ``distill.huber_c``; the EMA target's decay is ``distill.target_decay``; the iCT grid's
    resolution shift is ``distill.shift``.

    - ``ict`` (iCT §3.4): ``N(k) = min(s0·2^⌊k/K'⌋, s1) + 1`` grid points at optimizer step ``k``
      of ``K = steps``, ``K' = ⌊K / (⌊log2⌊s1/s0⌋⌋ + 1)⌋``; ``t = grid[n+1]``, ``r = grid[n]`` with
      ``n`` the interval holding a ``timesteps``-distributed draw (``index: timesteps``, iCT's
      lognormal index sampling is the same idea) or uniform (``index: uniform``). ``K`` is ``steps``:
      resuming with more steps stretches the schedule (a run resumes exactly under its own ``steps``).
    - ``ect`` (ECT, locuslab/ect ``training/loss.py::t_to_r_sigmoid``): ``t`` from ``timesteps``
      (logit-normal(m, s) in t is ECT's lognormal(P_mean = m, P_std = s) in σ = t/(1 − t)), and in
      σ-space ``σ_r = max(0, σ_t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·σ_t))))``, ``stage =
      ⌊step / stage_steps⌋`` (ECT's ``cur_tick // double_ticks``; its CIFAR-10 defaults q 2, k 8,
      b 1). At stage 0 most small-t samples get ``r = 0``: their target is the data itself.
    - ``weighting: inverse_gap``: ``w = 1/(σ_t − σ_r)`` in σ-space (ECT's first release divides by
      ``t − r`` in EDM's σ, its t), times the curriculum's nominal relative gap (ECT ``q^−(stage+1)``,
      iCT ``1 / intervals``) so that the loss keeps its scale when a stage halves the gap.
    """

    curriculum: Literal["ict", "ect"] = "ect"
    target: Literal["stopgrad", "ema"] = "stopgrad"  # iCT: the current model under no_grad; ema: an EMA (distill.target_decay)
    weighting: Literal["none", "inverse_gap"] = "none"
    start_intervals: int = 10  # ict: s0 (paper 10)
    end_intervals: int = 1280  # ict: s1 (paper 1280)
    index: Literal["timesteps", "uniform"] = "timesteps"  # ict: how the interval n is drawn
    q: float = 2.0  # ect: the gap shrinks by q per stage
    k: float = 8.0  # ect: the gap's boost at small σ, 1 + k·sigmoid(−b·σ)
    b: float = 1.0
    stage_steps: int = 100  # ect: optimizer steps per stage

    def __post_init__(self) -> None:
        if not 1 <= self.start_intervals <= self.end_intervals:
            raise ValueError(f"need 1 <= start_intervals <= end_intervals (got {self.start_intervals}, {self.end_intervals})")
        if self.q <= 1 or self.k < 0 or self.b < 0:
            raise ValueError(f"need q > 1, k >= 0 and b >= 0 (got q={self.q}, k={self.k}, b={self.b})")
        if self.stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1 (got {self.stage_steps})")

    def ict_intervals(self, step: int, total: int) -> int:
        """iCT's ``N(k) − 1``: the intervals of the grid at optimizer step ``step`` of ``total``."""
        doublings = int(math.log2(self.end_intervals // self.start_intervals))  # ⌊log2⌊s1/s0⌋⌋
        per_stage = max(total // (doublings + 1), 1)  # K'
        return min(self.start_intervals * 2 ** (step // per_stage), self.end_intervals)

    def ect_stage(self, step: int) -> int:
        return step // self.stage_steps

    def ect_r(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """ECT's ``r(t)`` (B,) for times ``t`` (B,) at optimizer step ``step``: ``0 <= r < t``."""
        sigma = to_sigma(t)
        decay = self.q ** -(self.ect_stage(step) + 1)
        sigma_r = (sigma * (1 - decay * (1 + self.k * torch.sigmoid(-self.b * sigma)))).clamp_min(0.0)
        return torch.minimum(sigma_r / (1 + sigma_r), t)

    def relative_gap(self, step: int, total: int) -> float:
        """The curriculum's nominal gap at ``step``: ECT ``q^−(stage+1)``, iCT ``1 / intervals``."""
        if self.curriculum == "ect":
            return self.q ** -(self.ect_stage(step) + 1)
        return 1.0 / self.ict_intervals(step, total)

    def weight(self, t: torch.Tensor, r: torch.Tensor, step: int, total: int) -> torch.Tensor:
        """The per-sample loss weight (B,): 1, or the inverse σ-space gap times :meth:`relative_gap`."""
        if self.weighting == "none":
            return torch.ones_like(t)
        gap = (to_sigma(t) - to_sigma(r)).clamp_min(1e-6)  # t = 0 (uniform draws) would give 0
        return self.relative_gap(step, total) / gap

    def describe(self) -> dict:
        """What the exported model's info records of the curriculum."""
        keys = {"ict": ("start_intervals", "end_intervals", "index"), "ect": ("q", "k", "b", "stage_steps")}[self.curriculum]
        return {"curriculum": self.curriculum, "target": self.target, "weighting": self.weighting, **{k: getattr(self, k) for k in keys}}


def to_sigma(t: torch.Tensor) -> torch.Tensor:
    """EDM's noise level of our time: ``σ = t / (1 − t)``, t clamped at ``T_MAX`` (t = 1 is σ = ∞)."""
    t = t.float().clamp(0.0, T_MAX)
    return t / (1 - t)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float | None) -> torch.Tensor:
    """Per-sample L2 (mean squared), L1 (mean absolute) or pseudo-Huber ``sqrt(||a − b||² + c²) − c`` (B,)."""
    diff = (a.float() - b.float()).flatten(1)
    if kind == "l2":
        return (diff**2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    c = 0.00054 * diff.shape[1] ** 0.5 if c is None else c
    return torch.sqrt((diff**2).sum(1) + c**2) - c
