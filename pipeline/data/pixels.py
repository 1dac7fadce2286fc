"""PIL-only pixel work shared by the shard tool (``data_tools.images``) and the image loader
(``pipeline.data.images``): any mode to 8-bit RGB, and the centre-crop / keep-ratio resize.

No torch here: ``python -m data_tools.shard`` imports this module, and its start-up counts
(``benchmarks/shard_throughput.py``).
"""

from __future__ import annotations

from typing import Literal

from PIL import Image

ResizeMode = Literal["center_crop", "keep_ratio", "none"]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int / float) grayscale -> 8-bit RGB by scaling, not clipping."""
    import numpy as np  # here, not at the top: only 16-bit and float inputs need it, and it costs start-up

    pixels = np.asarray(image, dtype=np.float64)  # (H, W)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
        pixels = pixels / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def resize(image: Image.Image, resolution: int, mode: ResizeMode) -> Image.Image:
    """``center_crop``: short side to S, centre S×S crop; ``keep_ratio``: short side to S."""
    if mode == "none":
        return image
    w, h = image.size
    if mode == "keep_ratio":
        scale = resolution / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)  # the centre square, in source pixels
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
