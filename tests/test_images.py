"""data_tools.images: every image kind is converted correctly or refused with its reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.images import ImageOptions, Skipped, prepare_image
from tests import imagebytes as ib

AS_IS = ImageOptions(resize="none", format="png")


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)  # (H, W, 3)


def reason(data: bytes, opts: ImageOptions = AS_IS) -> str:
    with pytest.raises(Skipped) as info:
        prepare_image(data, opts)
    return info.value.reason


def test_refusals_are_named():
    assert reason(b"") == "empty_file"
    assert reason(ib.html_page()) == "not_an_image"
    assert reason(ib.truncated_jpeg()) == "truncated_image"
    assert reason(ib.bomb_png()) == "decompression_bomb"
    assert reason(ib.solid_png((40, 40)), ImageOptions(max_pixels=1000)) == "decompression_bomb"
    assert reason(ib.solid_png((20, 40)), ImageOptions(min_size=32)) == "too_small"
    assert reason(ib.solid_png((100, 20)), ImageOptions(max_aspect=3.0)) == "bad_aspect"


def test_bomb_is_refused_before_decoding():
    # 3.6 gigapixels decoded would need gigabytes; refusing from the header takes no time.
    import time

    start = time.perf_counter()
    assert reason(ib.bomb_png(), ImageOptions(max_pixels=10**12 // 10**3)) == "decompression_bomb"
    assert time.perf_counter() - start < 1.0


def test_limits_pass_when_inside():
    out = prepare_image(ib.solid_png((40, 40)), ImageOptions(min_size=40, max_aspect=1.0, max_pixels=1600, format="png"))
    assert (out.width, out.height) == (256, 256)


def test_cmyk_jpeg_becomes_red():
    mean = pixels(prepare_image(ib.cmyk_jpeg(), AS_IS).data).mean(axis=(0, 1))
    assert mean[0] > 200 and mean[1] < 60 and mean[2] < 60


def test_rgba_transparency_composited_on_white():
    p = pixels(prepare_image(ib.rgba_png(), AS_IS).data)
    assert np.abs(p[:, :20] - ib.GREEN).max() <= 1
    assert (p[:, 20:] == 255).all()


def test_la_and_palette_transparency_composited_on_white():
    assert (pixels(prepare_image(ib.la_png(), AS_IS).data) == 255).all()
    p = pixels(prepare_image(ib.palette_transparent_png(), AS_IS).data)
    assert (p[:, :20] == ib.BLUE).all() and (p[:, 20:] == 255).all()


def test_16bit_png_scaled_not_clipped():
    gray = pixels(prepare_image(ib.png16_gray(value=32768), AS_IS).data)
    assert np.abs(gray - 128).max() <= 1  # clipping would give 255
    rgb = pixels(prepare_image(ib.png16_rgb(value=(65535, 32768, 0)), AS_IS).data)
    assert np.abs(rgb[0, 0] - (255, 128, 0)).max() <= 1


def test_exif_rotation_applied():
    out = prepare_image(ib.exif_rotated_jpeg((60, 30), orientation=6), AS_IS)
    assert (out.width, out.height) == (30, 60)
    assert (out.original_width, out.original_height) == (30, 60)
    p = pixels(out.data)
    assert p[5, 15, 0] > 200 and p[5, 15, 2] < 60  # top: red
    assert p[55, 15, 2] > 200 and p[55, 15, 0] < 60  # bottom: blue


@pytest.mark.parametrize("mode,size", [("center_crop", (32, 32)), ("keep_ratio", (64, 32)), ("none", (200, 100))])
def test_resize_modes(mode, size):
    out = prepare_image(ib.solid_jpeg((200, 100)), ImageOptions(resolution=32, resize=mode))
    assert (out.width, out.height) == size
    assert Image.open(io.BytesIO(out.data)).size == size


def test_center_crop_keeps_the_centre():
    image = Image.new("RGB", (300, 100), ib.RED)
    image.paste(Image.new("RGB", (100, 100), ib.BLUE), (100, 0))
    out = prepare_image(ib.encoded(image, "PNG"), ImageOptions(resolution=16, format="png"))
    # the resampling filter may read one source pixel past the crop box: look inside the edge
    assert np.abs(pixels(out.data)[:, 1:-1] - ib.BLUE).max() <= 2


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(fmt, pil):
    out = prepare_image(ib.solid_png(), ImageOptions(resolution=16, format=fmt, quality=80))
    assert Image.open(io.BytesIO(out.data)).format == pil
