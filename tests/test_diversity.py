"""pipeline.evaluation.diversity and pipeline.evaluation.features: the k-NN metrics against the
authors' own package (prdc) and on closed-form cases, the Vendi score's limits, and the DINOv2
extractor through ``Dinov2Model.from_pretrained`` on a small random-weight model saved locally."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluation import diversity, features
from pipeline.evaluation.metrics import MetricError


def gaussian(n: int, dim: int, g: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=g, dtype=torch.float64) + shift  # (n, dim)


@pytest.mark.parametrize("n_real, n_fake, chunk", [(300, 250, 64), (120, 200, 1024)])
def test_knn_metrics_match_the_authors_prdc(n_real, n_fake, chunk):
    """Our chunked torch k-NN gives prdc's numbers (Naeem et al.'s reference code: k = 3 for
    precision / recall, k = 5 for density / coverage), whatever the chunk size."""
    from prdc import compute_prdc

    g = torch.Generator().manual_seed(1)
    real, fake = gaussian(n_real, 10, g), gaussian(n_fake, 10, g, shift=0.3)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        theirs_3 = compute_prdc(real.numpy(), fake.numpy(), nearest_k=3)
        theirs_5 = compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    ours = diversity.precision_recall(real, fake, chunk=chunk) | diversity.density_coverage(real, fake, chunk=chunk)
    for key, theirs in (("precision", theirs_3), ("recall", theirs_3), ("density", theirs_5), ("coverage", theirs_5)):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key
    assert 0.3 < ours["precision"] < 0.99 and 0.3 < ours["recall"] < 0.99  # not a degenerate case


def test_two_samples_of_one_gaussian_give_the_published_values():
    """Naeem et al. 2020 (arXiv:2002.09797), §3.2: for real and fake sets drawn from one
    distribution, E[density] = 1 (Lemma 1) and E[coverage] = 1 − Π_{j=1..k} (N − j) / (N + M − j)
    (Lemma 2; → 1 − 2^-k = 0.969 for k = 5 and M = N). Precision and recall have no such value:
    by symmetry (M = N) their expectations are equal, and they "fail to detect the match between
    two identical distributions" as the dimension grows (abstract; their prdc README shows 0.477 /
    0.471 for N(0, I) in 1000-d with k = 5), while density and coverage keep theirs.

    Eight draws of N = M = 1000 keep the means within a few standard errors of 0.003 (density:
    0.007): a radius off by one neighbour (coverage 0.938 or 0.984, density 0.8 or 1.2) fails."""
    n, k, draws = 1000, diversity.K_DENSITY_COVERAGE, 8
    expected_coverage = 1 - np.prod([(n - j) / (2 * n - j) for j in range(1, k + 1)])
    means = {}
    for dim in (4, 64):
        g = torch.Generator().manual_seed(dim)
        rows = [diversity.precision_recall(real, fake) | diversity.density_coverage(real, fake)
                for real, fake in ((gaussian(n, dim, g), gaussian(n, dim, g)) for _ in range(draws))]
        means[dim] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    low, high = means[4], means[64]
    assert low["density"] == pytest.approx(1.0, abs=0.03) and high["density"] == pytest.approx(1.0, abs=0.06)
    assert low["coverage"] == pytest.approx(expected_coverage, abs=0.006)
    assert high["coverage"] == pytest.approx(expected_coverage, abs=0.01)
    assert low["precision"] == pytest.approx(low["recall"], abs=0.01) and low["precision"] > 0.93
    assert high["precision"] == pytest.approx(high["recall"], abs=0.04) and high["precision"] < 0.75


def test_copies_of_one_point_have_no_recall_and_no_coverage():
    """Mode collapse: every generated sample is the real distribution's mode. All of them lie in
    the real manifold (precision 1), but the generated manifold is a point (recall 0) that hits
    about k of the N real balls (coverage ≈ k / N), and the Vendi score is 1."""
    g = torch.Generator().manual_seed(2)
    real = gaussian(500, 8, g)
    fake = torch.zeros(500, 8, dtype=torch.float64)
    result = diversity.diversity(real, fake)
    assert result["precision"] == 1.0 and result["recall"] == 0.0
    assert result["coverage"] < 0.03
    assert result["vendi"] == pytest.approx(1.0, abs=1e-9)
    assert result["vendi_reference"] > 5


def test_a_shifted_set_lowers_precision_more_the_further_it_moves():
    g = torch.Generator().manual_seed(3)
    real, noise = gaussian(600, 8, g), gaussian(600, 8, g)
    rows = [diversity.diversity(real, noise + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    precision, recall, density = ([r[key] for r in rows] for key in ("precision", "recall", "density"))
    assert precision == sorted(precision, reverse=True) and len(set(precision)) == 4
    assert precision[0] > 0.85 and precision[-1] < 0.2
    assert recall == sorted(recall, reverse=True) and density == sorted(density, reverse=True)


def test_vendi_score_counts_distinct_samples():
    """Friedman & Dieng 2023: n identical samples score 1, n orthogonal ones n; the (D, D) route
    for n > D gives the (n, n) kernel's value."""
    assert diversity.vendi_score(torch.ones(50, 16)) == pytest.approx(1.0, abs=1e-9)
    assert diversity.vendi_score(torch.eye(16)) == pytest.approx(16.0, rel=1e-9)
    assert diversity.vendi_score(torch.eye(8).repeat(5, 1)) == pytest.approx(8.0, rel=1e-9)  # 40 rows, 8 kinds
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(gaussian(40, 6, g), dim=1)  # n > D: the (D, D) route
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / 40).clamp(min=1e-300)  # the (n, n) kernel, directly
    direct = torch.exp(-(eigenvalues * eigenvalues.log()).sum()).item()
    assert diversity.vendi_score(x) == pytest.approx(direct, rel=1e-9) and 1 < direct < 6


def test_bad_shapes_and_small_sets_are_one_clear_error():
    with pytest.raises(ValueError, match="need more than 3 real samples"):
        diversity.precision_recall(torch.randn(3, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        diversity.density_coverage(torch.randn(10, 4), torch.randn(10, 4, 1))


def save_tiny_dinov2(folder: Path, processor_size: int | None = None) -> Path:
    """A 2-layer, 32-wide ``Dinov2Model`` with seeded random weights, saved by ``save_pretrained``;
    with ``processor_size`` also the DINOv2 image processor (resize + centre crop to that size)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=224)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(folder)
    if processor_size is not None:
        BitImageProcessor(size={"shortest_edge": processor_size}, crop_size={"height": processor_size, "width": processor_size},
                          image_mean=features.IMAGENET_MEAN, image_std=features.IMAGENET_STD).save_pretrained(folder)
    return folder


def scenes(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def test_dinov2_features_are_the_cls_token_of_the_saved_model(tmp_path):
    from transformers import Dinov2Model

    folder = save_tiny_dinov2(tmp_path / "dinov2")
    extractor = features.load_extractor("dinov2", folder)
    images = scenes(5)
    one_batch = features.extract(extractor, images, batch_size=8)
    assert one_batch.shape == (5, 32) and one_batch.dtype == torch.float64 and extractor.dim == 32
    torch.testing.assert_close(features.extract(extractor, images, batch_size=2), one_batch, rtol=1e-5, atol=1e-5)
    assert torch.cdist(one_batch, one_batch).topk(2, largest=False).values[:, 1].min() > 1e-3  # distinct images, distinct features
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(pixel_values=features._imagenet_pixels(images)).last_hidden_state  # (5, 1 + 256, 32), layer-normed
    torch.testing.assert_close(one_batch.float(), hidden[:, 0], rtol=1e-5, atol=1e-5)


def test_dinov2_uses_the_folders_image_processor_and_names_bad_folders(tmp_path):
    plain = features.extract(features.load_extractor("dinov2", save_tiny_dinov2(tmp_path / "plain")), scenes(3))
    processed = features.extract(features.load_extractor("dinov2", save_tiny_dinov2(tmp_path / "processor", 56)), scenes(3))
    assert processed.shape == plain.shape and not torch.allclose(processed, plain)  # 56 px crops, not 224 px
    with pytest.raises(MetricError, match="DINOv2 folder not found or without config.json: '.*nowhere'"):
        features.load_extractor("dinov2", tmp_path / "nowhere")
    with pytest.raises(MetricError, match="unknown feature extractor 'clip'"):
        features.load_extractor("clip", tmp_path)
