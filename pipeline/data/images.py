"""Image shards (written by ``data_tools.shard``, or img2dataset's) -> batches of tensors.

Images become float (3, H, W) in [-1, 1] (DESIGN.md §3); one of another size is brought to
``resolution`` with the same centre-crop resize the shard tool uses (both use
:func:`pipeline.data.pixels.to_rgb` and :func:`~pipeline.data.pixels.resize`). :func:`tensor_to_images` is the way back.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.latents import shard_list
from pipeline.data.pixels import ResizeMode, resize, to_rgb  # noqa: F401  (re-exported: the loader's and the shard tool's one resize)
from pipeline.data.stream import LoaderConfig, ShardLoader

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Fit = Callable[[Image.Image], tuple[Image.Image, Any]]  # image -> (resized image, what it was fitted to)


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def decode_image(raw: dict) -> tuple[Image.Image, str] | None:
    """Raw tar members -> (RGB image, caption); ``None`` when there is no decodable image."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return None
    try:
        image = to_rgb(Image.open(io.BytesIO(raw[ext])))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # a bomb: over 2× Image.MAX_IMAGE_PIXELS
        return None
    return image, raw.get("txt", b"").decode("utf-8", "replace")


def decode_image_sample(raw: dict, resolution: int | None = None, fit: Fit | None = None) -> dict | None:
    """Raw tar members -> {"image", "caption", "key"}; ``None`` (skipped) when undecodable.

    The image is centre-cropped to ``resolution``², or brought to a size by ``fit`` (e.g. an
    aspect-ratio bucket: ``pipeline.data.buckets.Bucketing.assign``), or kept as it is."""
    decoded = decode_image(raw)
    if decoded is None:
        return None
    image, caption = decoded
    if fit is not None:
        image = fit(image)[0]
    elif resolution is not None and image.size != (resolution, resolution):
        image = resize(image, resolution, "center_crop")
    return {"image": image_to_tensor(image), "caption": caption, "key": raw["__key__"]}


def collate_images(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def image_loader(
    shards: str | Path | list[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1, resolution: int | None = None,
    sizes: list[int] | None = None,
) -> ShardLoader:
    """Endless, resumable batches of images from an image-shard folder (or a shard list); ``sizes``:
    the shards' sample counts when the caller found them (``pipeline.data.sizes.sizes_once``)."""
    decode = partial(decode_image_sample, resolution=resolution)
    return ShardLoader(shard_list(shards), cfg, decode, collate_images, rank, world_size, image_size, sizes)


def image_size(sample: dict) -> tuple[int, ...]:
    """An image sample's bucket: its shape (3, H, W); a batch holds one (unless ``resolution`` crops all to one)."""
    return tuple(sample["image"].shape)


# ---------------------------------------------------------------------------- paired shards (data_tools.pairs)

SOURCE_MEMBER, MASK_MEMBER = "src.png", "mask.png"


def decode_pair_sample(raw: dict, resolution: int | None = None) -> dict | None:
    """Raw members of a paired shard -> {"image" (target), "source", "mask", "caption", "key"};
    ``None`` (skipped) when the target or the source is missing or undecodable, or their sizes
    differ. Both are centre-cropped to ``resolution`` alike; ``mask`` (1, H, W) is 1 on kept pixels
    (all ones when the pair has no ``KEY.mask.png``)."""
    target = decode_image_sample(raw, resolution)
    source = _member_image(raw, SOURCE_MEMBER, resolution)
    if target is None or source is None or source.shape != target["image"].shape:
        return None
    mask = _member_image(raw, MASK_MEMBER, resolution) if MASK_MEMBER in raw else None
    target["source"] = source  # (3, H, W)
    target["mask"] = torch.ones(1, *source.shape[1:]) if mask is None else (mask[:1] > 0).float()  # (1, H, W)
    return target


def _member_image(raw: dict, member: str, resolution: int | None) -> torch.Tensor | None:
    if member not in raw:
        return None
    sample = decode_image_sample({"png": raw[member], "__key__": raw["__key__"]}, resolution)
    return None if sample is None else sample["image"]


def collate_pairs(samples: list[dict]) -> dict:
    batch = collate_images(samples)
    batch["source"] = torch.stack([s["source"] for s in samples])  # (B, 3, H, W)
    batch["mask"] = torch.stack([s["mask"] for s in samples])  # (B, 1, H, W)
    return batch


def pair_loader(
    shards: str | Path | list[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1, resolution: int | None = None,
    sizes: list[int] | None = None,
) -> ShardLoader:
    """Endless, resumable batches of pairs from a paired image-shard folder (``data_tools.pairs``):
    ``{"image": (B, 3, H, W) target, "source": (B, 3, H, W), "mask": (B, 1, H, W), "caption", "key"}``."""
    decode = partial(decode_pair_sample, resolution=resolution)
    return ShardLoader(shard_list(shards), cfg, decode, collate_pairs, rank, world_size, image_size, sizes)
