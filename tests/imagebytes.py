"""Image files built from bytes inside the tests: valid ones and every bad kind the shard tool meets."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid_jpeg(size=(64, 48), colour=RED) -> bytes:
    return encoded(Image.new("RGB", size, colour), "JPEG", quality=95)


def solid_png(size=(64, 48), colour=BLUE) -> bytes:
    return encoded(Image.new("RGB", size, colour), "PNG")


def noisy_jpeg(size=(96, 96), seed=0) -> bytes:
    """A JPEG whose entropy-coded data is long enough that cutting it in half truncates pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = noisy_jpeg()
    return data[: len(data) // 2]


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>\n"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_from_header(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written chunk by chunk, so the header may claim anything (bombs, 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows))
        + _png_chunk(b"IEND", b"")
    )


def bomb_png(side: int = 60_000) -> bytes:
    """Claims side×side 8-bit gray pixels (3.6 gigapixels) in a few hundred bytes."""
    return png_from_header(side, side, 8, 0, b"\x00" * 1024)


def png16_rgb(size=(8, 4), value=(65535, 32768, 0)) -> bytes:
    """A 16-bit-per-channel RGB PNG of one colour."""
    row = b"\x00" + struct.pack(">HHH", *value) * size[0]  # filter byte 0, then big-endian samples
    return png_from_header(size[0], size[1], 16, 2, row * size[1])


def png16_gray(size=(8, 4), value=32768) -> bytes:
    return encoded(Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16)), "PNG")


def cmyk_jpeg(size=(40, 40)) -> bytes:
    """Pure red in CMYK (C=0, M=100%, Y=100%, K=0)."""
    return encoded(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95)


def rgba_png(size=(40, 40)) -> bytes:
    """Left half opaque green, right half fully transparent (black underneath)."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size[0] // 2, size[1]), GREEN + (255,)), (0, 0))
    return encoded(image, "PNG")


def la_png(size=(40, 40)) -> bytes:
    """Gray+alpha, fully transparent black: must become white."""
    return encoded(Image.new("LA", size, (0, 0)), "PNG")


def palette_transparent_png(size=(40, 40)) -> bytes:
    """Palette image whose index 0 (black) is transparent; left half index 1 (blue)."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, size[0] // 2, size[1]))
    return encoded(image, "PNG", transparency=0)


def exif_rotated_jpeg(size=(60, 30), orientation: int = 6) -> bytes:
    """Stored landscape, left half red / right half blue, with an EXIF orientation tag.

    Orientation 6 means "rotate 90° clockwise to display": displayed it is portrait,
    red on top, blue at the bottom.
    """
    image = Image.new("RGB", size, BLUE)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())
