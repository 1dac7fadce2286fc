"""Fidelity and diversity of a generated image set, from features: k-NN manifolds and the Vendi score.

- Precision and recall (k = 3): Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
  for Assessing Generative Models" (arXiv:1904.06991). Each set's manifold is the union of balls
  around its samples, each reaching its k-th nearest neighbour in the same set; precision is the
  share of generated samples inside the real manifold, recall the share of real samples inside
  the generated one. A sample on a ball's boundary is inside (their eq. 1: ``≤``).
- Density and coverage (k = 5): Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
  Generative Models" (arXiv:2002.09797). Density counts, per generated sample, the real balls
  that hold it, divided by k (mean 1 when both sets come from one distribution, their Lemma 1);
  coverage is the share of real balls that hold at least one generated sample
  (``1 − Π_{j=1..k} (N − j) / (N + M − j)`` in expectation for one distribution, their Lemma 2;
  ``→ 1 − 2^-k`` when M = N grows). Their reference code is the ``prdc`` package.
- Vendi score: Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric for Machine
  Learning" (arXiv:2210.02410): ``exp(−Σ λ_i log λ_i)`` over the eigenvalues of ``K / n``, here
  with the cosine-similarity kernel on the features; 1 for n copies of one sample, n for n
  orthogonal ones: the effective number of distinct samples.

Everything is torch: distances are computed in blocks of ``chunk`` rows against one whole set
(a (chunk, N) matrix at a time, never the (N, N) one), in float64, on the features' device.
"""

from __future__ import annotations

import torch

K_PRECISION_RECALL = 3
K_DENSITY_COVERAGE = 5
CHUNK = 1024


def _blocks(rows: torch.Tensor, chunk: int):
    for start in range(0, len(rows), chunk):
        yield rows[start:start + chunk]


def _check(features: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if features.dim() != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {tuple(features.shape)}")
    if len(features) <= k:
        raise ValueError(f"k-NN metrics with k = {k} need more than {k} {name} samples (got {len(features)})")
    return features.double()


def knn_radii(features: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """(N,) distance of each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for block in _blocks(features, chunk):
        distances = torch.cdist(block, features)  # (B, N); each row holds its own 0
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_PRECISION_RECALL,
                     chunk: int = CHUNK) -> dict[str, float]:
    """Kynkäänniemi et al.'s precision (fake inside the real manifold) and recall (real inside the fake one)."""
    real, fake = _check(real, k, "real"), _check(fake, k, "generated")
    real_radii, fake_radii = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)  # (N,), (M,)
    inside_real = torch.cat([(torch.cdist(block, real) <= real_radii).any(1) for block in _blocks(fake, chunk)])  # (M,)
    inside_fake = torch.cat([(torch.cdist(block, fake) <= fake_radii).any(1) for block in _blocks(real, chunk)])  # (N,)
    return {"precision": inside_real.double().mean().item(), "recall": inside_fake.double().mean().item()}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = K_DENSITY_COVERAGE,
                     chunk: int = CHUNK) -> dict[str, float]:
    """Naeem et al.'s density (real balls per generated sample, / k) and coverage (real balls hit)."""
    real, fake = _check(real, k, "real"), _check(fake, k, "generated")
    radii = knn_radii(real, k, chunk)  # (N,)
    balls = torch.cat([(torch.cdist(block, real) <= radii).sum(1) for block in _blocks(fake, chunk)])  # (M,)
    nearest = torch.cat([torch.cdist(block, fake).min(1).values for block in _blocks(real, chunk)])  # (N,)
    return {"density": balls.double().mean().item() / k, "coverage": (nearest <= radii).double().mean().item()}


def vendi_score(features: torch.Tensor) -> float:
    """exp(entropy) of the eigenvalues of K / n, K the cosine-similarity kernel (n, n).

    K / n = X Xᵀ / n (X the unit-normalised rows) has the non-zero eigenvalues of Xᵀ X / n (D, D),
    so the smaller of the two is decomposed."""
    if features.dim() != 2 or len(features) == 0:
        raise ValueError(f"the Vendi score needs (N, D) features with N >= 1, got shape {tuple(features.shape)}")
    x = torch.nn.functional.normalize(features.double(), dim=1)  # (N, D)
    n = len(x)
    gram = x @ x.T if n <= x.shape[1] else x.T @ x  # (n, n) or (D, D)
    eigenvalues = torch.linalg.eigvalsh(gram / n).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 0]
    return torch.exp(-(eigenvalues * eigenvalues.log()).sum()).item()


def diversity(real: torch.Tensor | None, fake: torch.Tensor, chunk: int = CHUNK) -> dict:
    """Every metric of this module that the sets allow: the Vendi score of each set, and with a
    real set precision / recall (k = 3) and density / coverage (k = 5)."""
    result: dict = {"vendi": vendi_score(fake)}
    if real is not None:
        result["vendi_reference"] = vendi_score(real)
        result |= precision_recall(real, fake, K_PRECISION_RECALL, chunk)
        result |= density_coverage(real, fake, K_DENSITY_COVERAGE, chunk)
        result |= {"k_precision_recall": K_PRECISION_RECALL, "k_density_coverage": K_DENSITY_COVERAGE}
    return result
