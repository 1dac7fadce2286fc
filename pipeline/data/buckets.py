"""Aspect-ratio buckets: shapes of about equal pixel count that images are cropped to.

References: NovelAI's aspect-ratio bucketing (2022); SDXL (Podell et al. 2023, §2.3, a table of
about 1024² pixels in steps of 64); PixArt-α/Σ's ``ASPECT_RATIO_512`` tables.

A table holds ``(width, height)`` pairs, multiples of ``step`` pixels (the VAE's downsampling
× the DiT's patch size, so every bucket makes whole tokens), each of about ``base²`` pixels,
aspect ratios up to ``max_ratio``. For each width the height closest to ``base²/width`` is
taken, and the table is made symmetric (every landscape bucket has its portrait twin). An image
goes to the bucket nearest in log aspect ratio, is scaled to cover it and centre-cropped.

Buckets are named ``"WxH"`` in pixels; ``dataset.json`` holds the histogram and each latent
sample's ``KEY.json`` its bucket (DESIGN.md §10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_table(base: int, step: int, max_ratio: float = 4.0) -> list[Bucket]:
    """The SDXL-style table of about ``base²`` pixels, sorted by aspect (portrait first)."""
    if base < step or base % step:
        raise ValueError(f"bucket base {base} must be a positive multiple of the step {step} (VAE factor × patch size)")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (got {max_ratio})")
    area, found = base * base, set()
    for width in range(step, area // step + 1, step):
        height = max(step, step * round(area / (width * step)))
        if max(width / height, height / width) <= max_ratio:
            found.update({(width, height), (height, width)})
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def load_table(path: Path, step: int) -> list[Bucket]:
    """A table from YAML: a list of ``[width, height]`` (or ``"WxH"``) entries, each a multiple of ``step``."""
    entries = yaml.safe_load(Path(path).read_text())
    if isinstance(entries, dict):
        entries = entries.get("buckets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list of [width, height] buckets")
    table = [parse_bucket(e) if isinstance(e, str) else (int(e[0]), int(e[1])) for e in entries]
    bad = [b for b in table if b[0] % step or b[1] % step or min(b) <= 0]
    if bad:
        raise ValueError(f"{path}: buckets {bad} are not positive multiples of {step} pixels (VAE factor × patch size)")
    return sorted(set(table), key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, table: list[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(table, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale ``image`` to cover ``bucket`` and centre-crop it (one resample, Lanczos)."""
    width, height = image.size
    if (width, height) == bucket:
        return image
    scale = max(bucket[0] / width, bucket[1] / height)
    crop_w, crop_h = bucket[0] / scale, bucket[1] / scale  # the crop, in source pixels
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return image.resize(bucket, Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0)


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket(text: str) -> Bucket:
    """``"48x24"`` -> (48, 24)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 48x24)") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return width, height


@dataclass(frozen=True)
class Bucketing:
    """How ``data_tools.encode`` assigns images to buckets."""

    table: tuple[Bucket, ...]

    @classmethod
    def build(cls, base: int | None, table_path: Path | None, step: int) -> Bucketing | None:
        if table_path is not None:
            return cls(tuple(load_table(table_path, step)))
        return cls(tuple(bucket_table(base, step))) if base else None

    def assign(self, image: Image.Image) -> tuple[Image.Image, Bucket]:
        bucket = nearest_bucket(*image.size, list(self.table))
        return fit_to_bucket(image, bucket), bucket
