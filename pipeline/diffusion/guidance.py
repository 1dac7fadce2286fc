"""Classifier-free guidance (Ho & Salimans 2022), diffusers convention:
``v̂ = v_null + g·(v_cond − v_null)``; ``g = 1`` is no guidance (one model call). The null
condition is the model's own (``cond["drop"] = True``), so the conditional and unconditional
halves run as one batch.

Dual guidance for an image-conditioned model (Brooks et al. 2023, "InstructPix2Pix", eq. 3;
DESIGN.md §11): ``v = v_u + s_T·(v_both − v_img) + s_I·(v_img − v_u)``, where ``v_both`` sees the
text and the source image, ``v_img`` the source image only (text dropped) and ``v_u`` neither
(text dropped, ``cond["drop_image"]``: the null image). The three run as one 3× batch. With
``s_I = 1`` it is plain guidance with the source kept in both halves (one 2× batch).
"""

from __future__ import annotations

import torch

from pipeline.diffusion.flow import Model

Scale = float | torch.Tensor  # a number, or one per row (B,)


def with_null(cond: dict, batch: int) -> dict:
    """``cond`` twice along the batch: first half as given, second half dropped (null)."""
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    device = next((v.device for v in cond.values() if torch.is_tensor(v)), None)
    keep = cond.get("drop", torch.zeros(batch, dtype=torch.bool, device=device))
    doubled["drop"] = torch.cat([keep, torch.ones(batch, dtype=torch.bool, device=device)])
    return doubled


def with_dual_null(cond: dict, batch: int) -> dict:
    """``cond`` three times along the batch: [as given; text dropped; text and image dropped]."""
    tripled = {k: torch.cat([v, v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    device = next((v.device for v in cond.values() if torch.is_tensor(v)), None)
    zeros, ones = torch.zeros(batch, dtype=torch.bool, device=device), torch.ones(batch, dtype=torch.bool, device=device)
    text, image = cond.get("drop", zeros), cond.get("drop_image", zeros)
    tripled["drop"] = torch.cat([text, ones, ones])
    tripled["drop_image"] = torch.cat([image, image, ones])
    return tripled


def _is_one(scale: Scale | None) -> bool:
    return scale is None or (not torch.is_tensor(scale) and scale == 1.0)


def _rows(scale: Scale, like: torch.Tensor) -> Scale:
    """A per-row scale (B,) shaped to broadcast over ``like`` (B, ...); a number as is."""
    return scale.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype) if torch.is_tensor(scale) else scale


def guided_velocity(model: Model, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: Scale,
                    image_guidance: Scale | None = None) -> torch.Tensor:
    """``v_null + g·(v_cond − v_null)``; ``g`` a number or one per row (B,); one call when ``g == 1``.
    ``image_guidance`` ``s_I`` (an image-conditioned model; None or 1: the above, the source kept in
    both halves): InstructPix2Pix's dual guidance (module docstring), one call on a 3× batch."""
    if not _is_one(image_guidance):
        v = model(torch.cat([x, x, x]), torch.cat([t, t, t]), with_dual_null(cond, x.shape[0]))
        v_both, v_image, v_null = v.chunk(3)
        return v_null + _rows(guidance, v) * (v_both - v_image) + _rows(image_guidance, v) * (v_image - v_null)
    if _is_one(guidance):
        return model(x, t, cond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), with_null(cond, x.shape[0]))
    v_cond, v_null = v.chunk(2)
    return v_null + _rows(guidance, v) * (v_cond - v_null)
