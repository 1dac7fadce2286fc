"""Image bytes in, clean RGB image bytes out — or a named reason why not.

The per-image half of ``data_tools.shard``: open from the header only, refuse what should not
be decoded (empty, not an image, decompression bomb, too small, too elongated), decode, apply
the EXIF orientation, convert every mode to 8-bit RGB (CMYK, 16-bit, palettes, transparency
composited on white), resize and re-encode. Each refusal raises :class:`Skipped` whose
``reason`` is a short stable name that the shard statistics count.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.pixels import ResizeMode, resize, to_rgb

OutputFormat = Literal["jpg", "png", "webp"]

# EXIF orientations 5-8 are transposes: width and height swap when applied.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class Skipped(Exception):
    """A sample that is skipped; ``reason`` is the category the statistics count."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """What ``prepare_image`` does; mirrors the ``data_tools.shard`` flags."""

    resolution: int = 256
    resize: ResizeMode = "center_crop"
    min_size: int = 0
    max_aspect: float | None = None
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    format: OutputFormat = "jpg"
    quality: int = 95


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # encoded in ImageOptions.format
    width: int
    height: int
    original_width: int  # as displayed, i.e. after the EXIF orientation
    original_height: int


def open_checked(data: bytes, opts: ImageOptions) -> tuple[Image.Image, tuple[int, int]]:
    """Open ``data`` lazily (header only) and apply every check that needs no decoding.

    Returns the still-undecoded image and its displayed size ``(width, height)``.
    """
    if not data:
        raise Skipped("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Skipped("decompression_bomb", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Skipped("not_an_image", str(e)) from None
    width, height = image.size
    if width * height > opts.max_pixels:
        raise Skipped("decompression_bomb", f"{width}x{height} > {opts.max_pixels} pixels")
    if image.getexif().get(_EXIF_ORIENTATION_TAG) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    if min(width, height) < opts.min_size:
        raise Skipped("too_small", f"{width}x{height} < {opts.min_size}")
    if opts.max_aspect is not None and max(width, height) > opts.max_aspect * max(1, min(width, height)):
        raise Skipped("bad_aspect", f"{width}x{height} beyond {opts.max_aspect}")
    return image, (width, height)


def decode(image: Image.Image, target_short_side: int | None) -> Image.Image:
    """Decode pixels (JPEG at a reduced DCT scale when that still covers the target) and orient."""
    if target_short_side and image.format == "JPEG":
        w, h = image.size
        scale = target_short_side / min(w, h)
        image.draft(image.mode, (max(1, round(w * scale)), max(1, round(h * scale))))
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise Skipped("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise Skipped(reason, str(e)) from None
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the pixels when upright
    return image


def encode(image: Image.Image, fmt: OutputFormat, quality: int) -> bytes:
    """RGB image -> bytes in ``fmt`` (quality applies to jpg and webp)."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=_PIL_FORMAT[fmt], quality=quality)
    return buffer.getvalue()


def prepare_image(data: bytes, opts: ImageOptions) -> PreparedImage:
    """The whole path: check, decode, orient, convert, resize, encode."""
    image, (orig_w, orig_h) = open_checked(data, opts)
    target = None if opts.resize == "none" else opts.resolution
    rgb = to_rgb(decode(image, target))
    out = resize(rgb, opts.resolution, opts.resize)
    return PreparedImage(encode(out, opts.format, opts.quality), out.width, out.height, orig_w, orig_h)
