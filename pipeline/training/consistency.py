"""What consistency distillation and teacher-free consistency training share: the distance between
two consistency-function outputs, and the teacher-free recipe's settings (``ct`` section) with its
``r(t)`` curricula.

References: Song et al. 2023, "Consistency Models" (consistency training, Alg. 3); Song & Dhariwal
2023, "Improved Techniques for Training Consistency Models" (iCT: pseudo-Huber, no EMA teacher, N
doubling); Geng et al. 2024, "Consistency Models Made Easy" (ECT: r(t) from a pretrained
diffusion model, ``r = t·(1 − q^−(stage+1)·(1 + k·σ(−b·t)))``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class CTSection:
    """``distill.mode: ct`` (``pipeline.training.consistency_training``): TO BE FILLED."""


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float | None) -> torch.Tensor:
    """Per-sample L2 (mean squared), L1 (mean absolute) or pseudo-Huber ``sqrt(||a − b||² + c²) − c`` (B,)."""
    diff = (a.float() - b.float()).flatten(1)
    if kind == "l2":
        return (diff**2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    c = 0.00054 * diff.shape[1] ** 0.5 if c is None else c
    return torch.sqrt((diff**2).sum(1) + c**2) - c
