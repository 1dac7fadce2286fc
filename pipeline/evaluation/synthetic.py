"""The synthetic image-caption grammar: its vocabulary, scenes, captions and drawing code.

One or two flat-coloured shapes on a flat background, with a caption that names every
attribute, e.g. "a small red circle at the top left on a navy background". Colours are
saturated and far apart in RGB (and far from every background), fills are solid, and the layout
keeps objects apart, so the adherence analyser (``pipeline.evaluation.adherence``) can read
generated images back deterministically. ``data_tools.synth`` writes the dataset from here.

Layout: an object's bounding box is a square of side ``SIZES[size]`` (fraction of the image
side) centred on ``POSITIONS[position]`` (fraction of width, height), snapped to whole output
pixels; every shape touches all four sides of its box and covers its centre, and a square fills
it exactly. Corner centres sit at the quadrant centres, so a "large" corner object stays inside
its quadrant; when one of two objects is at the "center", both are "small", which keeps every
pair of bounding boxes disjoint. Sample ``i`` depends only on (seed, i, resolution,
second-object probability).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (150, 0, 255),
    "orange": (255, 128, 0),
    "cyan": (0, 230, 255),
    "pink": (255, 105, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.2, "large": 0.44}
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (235, 220, 180),
    "navy": (20, 25, 80),
    "dark green": (20, 70, 35),
    "light blue": (180, 210, 240),
}
CROSS_THICKNESS = 0.4  # arm width of the cross, as a fraction of its side
SUPERSAMPLE = 4  # shapes are drawn at this multiple of the output size, then box-filtered
Box = tuple[int, int, int, int]  # [x0, y0, x1, y1): half-open pixel box


def vocabulary() -> dict:
    """The vocabulary as JSON-ready data (recorded in ``dataset.json``)."""
    return {
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": dict(SIZES),
        "positions": {name: list(xy) for name, xy in POSITIONS.items()},
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "cross_thickness": CROSS_THICKNESS,
    }


def sample_scene(rng: random.Random, second_object_prob: float) -> tuple[str, list[dict]]:
    """Draw a background name and one or two objects (colour, shape, size, position)."""
    count = 2 if rng.random() < second_object_prob else 1
    positions = rng.sample(list(POSITIONS), count)
    all_small = count == 2 and "center" in positions
    objects = []
    for position in positions:
        objects.append(
            {
                "colour": rng.choice(list(COLOURS)),
                "shape": rng.choice(SHAPES),
                "size": "small" if all_small else rng.choice(list(SIZES)),
                "position": position,
            }
        )
    return rng.choice(list(BACKGROUNDS)), objects


def caption_for(background: str, objects: list[dict]) -> str:
    """The caption, e.g. 'a large green square at the top right and a small ... on a white background'."""
    parts = [f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" for o in objects]
    article = "an" if background[0] in "aeiou" else "a"
    return f"{' and '.join(parts)} on {article} {background} background"


def object_box(obj: dict, width: int, height: int | None = None) -> Box:
    """The object's square ``[x0, y0, x1, y1)`` in output pixels, snapped to whole pixels: its side
    a fraction of the short side, its centre a fraction of the width and height."""
    height = width if height is None else height
    fx, fy = POSITIONS[obj["position"]]
    side = max(1, round(SIZES[obj["size"]] * min(width, height)))
    x0, y0 = round(fx * width - side / 2), round(fy * height - side / 2)
    return x0, y0, x0 + side, y0 + side


def aspect_size(resolution: int, aspect: float, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of about ``resolution²`` pixels with width/height ≈ ``aspect``, sides
    multiples of ``multiple`` (so a bucket table with that step holds it exactly)."""
    if aspect == 1.0:
        return resolution, resolution
    snap = lambda v: max(multiple, multiple * round(v / multiple))  # noqa: E731
    return snap(resolution * aspect**0.5), snap(resolution / aspect**0.5)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    """Fill ``shape`` in the half-open canvas box ``[x0, y0, x1, y1)``; PIL's boxes include their last pixel."""
    x0, y0, x1, y1 = box
    last_x, last_y = x1 - 1, y1 - 1
    if shape == "square":
        draw.rectangle((x0, y0, last_x, last_y), fill=rgb)
    elif shape == "circle":
        draw.ellipse((x0, y0, last_x, last_y), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + last_x) / 2, y0), (last_x, last_y), (x0, last_y)], fill=rgb)
    elif shape == "cross":
        arm = round((x1 - x0) * CROSS_THICKNESS)
        ax, ay = (x0 + x1 - arm) // 2, (y0 + y1 - arm) // 2
        draw.rectangle((x0, ay, last_x, ay + arm - 1), fill=rgb)
        draw.rectangle((ax, y0, ax + arm - 1, last_y), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_sample(
    index: int, resolution: int, seed: int, second_object_prob: float = 0.25, aspects: tuple[float, ...] = (1.0,)
) -> tuple[Image.Image, dict]:
    """Sample ``index`` of the dataset with ``seed``: the RGB image and its ground truth.

    With several ``aspects`` (width/height), the sample draws one from its own stream (the scene
    does not change) and is ``aspect_size(resolution, aspect)`` pixels."""
    rng = random.Random(f"{seed}:{index}")
    background, objects = sample_scene(rng, second_object_prob)
    aspect = aspects[0] if len(aspects) == 1 else random.Random(f"{seed}:{index}:aspect").choice(aspects)
    width, height = aspect_size(resolution, aspect)
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        box = object_box(obj, width, height)
        draw_shape(draw, obj["shape"], tuple(v * SUPERSAMPLE for v in box), COLOURS[obj["colour"]])
        obj["rgb"] = list(COLOURS[obj["colour"]])
        obj["bbox"] = list(box)
    image = canvas.resize((width, height), Image.Resampling.BOX)
    truth = {
        "caption": caption_for(background, objects),
        "background": background,
        "background_rgb": list(BACKGROUNDS[background]),
        "objects": objects,
        "resolution": resolution,
        "size": [width, height],
        "seed": seed,
        "index": index,
    }
    return image, truth
