"""Adversarial losses over discriminator logits, shared by the GAN recipes (the autoencoder's
patch-GAN, the pix2pix baseline): small pure functions, no ``.item()``.

References: Goodfellow et al. 2014, "Generative Adversarial Nets" (the cross-entropy game and the
non-saturating generator loss ``−log D(G(z))``); Lim & Ye 2017, "Geometric GAN", and Miyato et al.
2018, "Spectral Normalization for GANs" (the hinge loss); Esser et al. 2021, "Taming Transformers"
(hinge loss for the autoencoder's patch-GAN).

``kind``: ``"hinge"`` — D: ``½·(E relu(1 − D(real)) + E relu(1 + D(fake)))``, G: ``−E D(fake)``;
``"bce"`` — D: ``½·(E softplus(−D(real)) + E softplus(D(fake)))`` (binary cross-entropy on
logits, real = 1, fake = 0; the ½ as pix2pix halves D's objective), G (non-saturating):
``E softplus(−D(fake)) = −E log σ(D(fake))``. Means run over every logit (a PatchGAN's patches).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GanKind = Literal["hinge", "bce"]
GAN_KINDS = ("hinge", "bce")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``½·(mean relu(1 − real) + mean relu(1 + fake))``."""
    return 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The hinge generator loss ``−mean fake``."""
    return -fake_logits.mean()


def bce_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator cross-entropy on logits: ``½·(mean softplus(−real) + mean softplus(fake))``."""
    return 0.5 * (F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean())


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Goodfellow's non-saturating generator loss ``mean softplus(−fake) = −mean log σ(fake)``."""
    return F.softplus(-fake_logits.float()).mean()


def _check(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"GAN loss kind must be one of {', '.join(GAN_KINDS)} (got {kind!r})")


def d_loss(kind: GanKind, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss of ``kind`` (``"hinge"`` | ``"bce"``), a scalar."""
    _check(kind)
    return hinge_d_loss(real_logits, fake_logits) if kind == "hinge" else bce_d_loss(real_logits, fake_logits)


def g_loss(kind: GanKind, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss of ``kind`` (hinge: ``−mean``; bce: non-saturating), a scalar."""
    _check(kind)
    return generator_loss(fake_logits) if kind == "hinge" else non_saturating_g_loss(fake_logits)
