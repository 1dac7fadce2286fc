"""Classifier-free guidance (Ho & Salimans 2022), diffusers convention:
``v̂ = v_null + g·(v_cond − v_null)``; ``g = 1`` is no guidance (one model call). The null
condition is the model's own (``cond["drop"] = True``), so the conditional and unconditional
halves run as one batch.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.flow import Model


def with_null(cond: dict, batch: int) -> dict:
    """``cond`` twice along the batch: first half as given, second half dropped (null)."""
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    device = next((v.device for v in cond.values() if torch.is_tensor(v)), None)
    keep = cond.get("drop", torch.zeros(batch, dtype=torch.bool, device=device))
    doubled["drop"] = torch.cat([keep, torch.ones(batch, dtype=torch.bool, device=device)])
    return doubled


def guided_velocity(model: Model, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float | torch.Tensor) -> torch.Tensor:
    """``v_null + g·(v_cond − v_null)``; ``g`` a number or one per row (B,); one call when ``g == 1``."""
    if not torch.is_tensor(guidance) and guidance == 1.0:
        return model(x, t, cond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), with_null(cond, x.shape[0]))
    v_cond, v_null = v.chunk(2)
    g = guidance.reshape(-1, *([1] * (x.dim() - 1))).to(v.dtype) if torch.is_tensor(guidance) else guidance
    return v_null + g * (v_cond - v_null)
