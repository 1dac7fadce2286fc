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
# Colours the renderer draws and the analyser reads but default scenes never use: held out of the
# teacher's data, they are concepts to teach later (the demo's LoRA stage teaches "mint"). Each is
# >= 129 RGB units from every colour and background above, with channels at 0, 128 or 255 as most
# of the palette's: the demo autoencoder brought a "lime" at (120, 255, 60) back 44 units off on
# average, against 8-22 for the palette's colours, which capped what any model could draw of it.
NOVEL_COLOURS: dict[str, tuple[int, int, int]] = {"mint": (0, 255, 128)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **NOVEL_COLOURS}  # every drawable object colour
# Attributes a caption may leave unnamed (``underspecify``): the one-to-many evaluation reads them back.
UNNAMEABLE: tuple[str, ...] = ("colour", "position", "size", "background")
CROSS_THICKNESS = 0.4  # arm width of the cross, as a fraction of its side
SUPERSAMPLE = 4  # shapes are drawn at this multiple of the output size, then box-filtered
Box = tuple[int, int, int, int]  # [x0, y0, x1, y1): half-open pixel box


def vocabulary() -> dict:
    """The vocabulary as JSON-ready data (recorded in ``dataset.json``)."""
    return {
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "novel_colours": {name: list(rgb) for name, rgb in NOVEL_COLOURS.items()},
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


def caption_for(background: str, objects: list[dict], unnamed: str | None = None) -> str:
    """The caption, e.g. 'a large green square at the top right and a small ... on a white background'.

    ``unnamed`` (one of ``UNNAMEABLE``) leaves that attribute out for every object, e.g. no size:
    'a green square at the top right on a white background'; no background: '... at the top right'."""
    if unnamed is not None and unnamed not in UNNAMEABLE:
        raise ValueError(f"unnamed must be one of {UNNAMEABLE} (got {unnamed!r})")

    def phrase(o: dict) -> str:
        words = [o["size"] if unnamed != "size" else "", o["colour"] if unnamed != "colour" else "", o["shape"]]
        text = " ".join(["a", *filter(None, words)])
        return text if unnamed == "position" else f"{text} at the {o['position']}"

    text = " and ".join(phrase(o) for o in objects)
    if unnamed == "background":
        return text
    article = "an" if background[0] in "aeiou" else "a"
    return f"{text} on {article} {background} background"


def paint_concept(objects: list[dict], concept: str | None, prob: float, rng: random.Random) -> None:
    """Recolour each object with ``concept`` (a ``NOVEL_COLOURS`` name) with probability ``prob``."""
    if concept is None:
        return
    if concept not in NOVEL_COLOURS:
        raise ValueError(f"concept must be one of {sorted(NOVEL_COLOURS)} (got {concept!r})")
    for obj in objects:
        if rng.random() < prob:
            obj["colour"] = concept


def parse_attributes(text: str) -> tuple[str, ...]:
    """``"colour,size"`` -> ("colour", "size"); ValueError unless each is one of ``UNNAMEABLE``."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names or any(n not in UNNAMEABLE for n in names):
        raise ValueError(f"attributes must be among {','.join(UNNAMEABLE)} (got {text!r})")
    return names


def unnamed_attribute(seed: int, index: int, fraction: float, attributes: tuple[str, ...] = UNNAMEABLE) -> str | None:
    """The attribute sample ``index``'s caption leaves out (None: it names all), drawn from its own
    stream so the image does not change: with probability ``fraction``, one of ``attributes``."""
    if fraction <= 0.0:
        return None
    rng = random.Random(f"{seed}:{index}:unnamed")
    return rng.choice(attributes) if rng.random() < fraction else None


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
    index: int, resolution: int, seed: int, second_object_prob: float = 0.25, aspects: tuple[float, ...] = (1.0,),
    *, concept: str | None = None, concept_prob: float = 0.0, underspecify: float = 0.0,
    unnameable: tuple[str, ...] = UNNAMEABLE,
) -> tuple[Image.Image, dict]:
    """Sample ``index`` of the dataset with ``seed``: the RGB image and its ground truth.

    With several ``aspects`` (width/height), the sample draws one from its own stream (the scene
    does not change) and is ``aspect_size(resolution, aspect)`` pixels. ``concept`` /
    ``concept_prob``: the same scene with each object recoloured in the concept with that probability
    (``paint_concept``). ``underspecify``: the fraction of captions that leave one of ``unnameable``
    out (``truth["unnamed"]``; the image does not change). Each option draws from its own stream."""
    background, objects = sample_scene(random.Random(f"{seed}:{index}"), second_object_prob)
    paint_concept(objects, concept, concept_prob, random.Random(f"{seed}:{index}:concept"))
    unnamed = unnamed_attribute(seed, index, underspecify, unnameable)
    aspect = aspects[0] if len(aspects) == 1 else random.Random(f"{seed}:{index}:aspect").choice(aspects)
    width, height = aspect_size(resolution, aspect)
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        box = object_box(obj, width, height)
        draw_shape(draw, obj["shape"], tuple(v * SUPERSAMPLE for v in box), PALETTE[obj["colour"]])
        obj["rgb"] = list(PALETTE[obj["colour"]])
        obj["bbox"] = list(box)
    image = canvas.resize((width, height), Image.Resampling.BOX)
    truth = {
        "caption": caption_for(background, objects, unnamed),
        "unnamed": unnamed,
        "background": background,
        "background_rgb": list(BACKGROUNDS[background]),
        "objects": objects,
        "resolution": resolution,
        "size": [width, height],
        "seed": seed,
        "index": index,
    }
    return image, truth
