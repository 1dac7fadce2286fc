"""Two networks trained against each other on the training core (a generator and a discriminator,
each with its own optimizer and LR schedule): each update steps one optimizer alone, and with fp16
one loss scaler is shared by both. The autoencoder (``pipeline.training.autoencoder``, whose
docstring details the fp16 rule) and pix2pix (``pipeline.training.pix2pix``) recipes mix it in.
"""

from __future__ import annotations

import torch


class AdversarialUpdates:
    """The per-optimizer update of a recipe with two networks (mixed into a ``TrainerCore``)."""

    def update(self, model: torch.nn.Module, optimizer, scheduler) -> bool:
        """Unscale and clip this optimizer's gradients only (``optim.grad_clip`` > 0; the other
        network's partly accumulated ones stay as they are), step, advance its schedule once unless
        the loss scaler skipped the step (inf/nan gradients), clear the gradients; whether it stepped.
        Under DDP the gradients are all-reduced by now: every rank clips and decides alike."""
        if self.cfg.optim.grad_clip > 0:
            self.accelerator.unscale_gradients(optimizer=optimizer)  # a no-op unless fp16
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()
        stepped = not optimizer.step_was_skipped
        if stepped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return stepped

    def rescale_pending(self, model: torch.nn.Module, scale: float) -> None:
        """Bring ``model``'s partly accumulated gradients, scaled by ``scale``, to the loss scale now
        (another optimizer's step may have changed it), so its optimizer unscales them with the
        rest of its window (a power of 2: exact)."""
        ratio = self.accelerator.scaler.get_scale() / scale
        if ratio != 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(ratio)
