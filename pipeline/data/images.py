"""Image shards (written by ``data_tools.shard``, or img2dataset's) -> batches of tensors.

Images become float (3, H, W) in [-1, 1] (DESIGN.md §3); one of another size is brought to
``resolution`` with the shard tool's own centre-crop resize.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.images import resize, to_rgb
from pipeline.data.latents import shard_list
from pipeline.data.stream import LoaderConfig, ShardLoader

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
    except (OSError, ValueError, SyntaxError):
        return None
    return image, raw.get("txt", b"").decode("utf-8", "replace")


def decode_image_sample(raw: dict, resolution: int | None = None) -> dict | None:
    """Raw tar members -> {"image", "caption", "key"}; ``None`` (skipped) when undecodable."""
    decoded = decode_image(raw)
    if decoded is None:
        return None
    image, caption = decoded
    if resolution is not None and image.size != (resolution, resolution):
        image = resize(image, resolution, "center_crop")
    return {"image": image_to_tensor(image), "caption": caption, "key": raw["__key__"]}


def collate_images(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def image_loader(
    shards: str | Path | list[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1, resolution: int | None = None
) -> ShardLoader:
    """Endless, resumable batches of images from an image-shard folder (or a shard list)."""
    decode = partial(decode_image_sample, resolution=resolution)
    return ShardLoader(shard_list(shards), cfg, decode, collate_images, rank, world_size)
