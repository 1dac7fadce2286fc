"""Prompt adherence on the synthetic set: read the shapes back from pixels, compare with the caption.

No learned model: deterministic numpy over ``data_tools.synth``'s vocabulary (colours, shapes,
sizes, positions, backgrounds) and its own drawing code, so a score means the same everywhere.
Works at any square resolution (32 px is the demo's) and tolerates blur and noise, since
generated images are blurry, noisy versions of synth renders.

``analyse(image)`` decides, from pixels only:

1. **background** — the per-channel median of the one-pixel border, named by the nearest
   ``BACKGROUNDS`` colour;
2. **objects** — pixels farther than ``FOREGROUND_DISTANCE`` (RGB) from that background and at
   least half as far as the farthest pixel near them (a half-maximum outline: it drops the
   antialiased rim and parts objects that blur joined), in 4-connected components; a component
   ``ELONGATED`` times longer than wide is cut in two at its faintest line (synth boxes are
   square); components below ``SPECK_FRACTION`` of synth's smallest object are noise; the largest
   ``MAX_OBJECTS`` remain;
3. per object: **colour** — the palette colour whose segment background→colour passes closest
   to the median of the component's core pixels (so a blurred, background-mixed rim cannot turn
   red into pink); **shape and size** — soft coverage ``alpha = proj(pixel − bg, core − bg)`` in
   a window around the object is compared, by cosine similarity, with every (shape, size)
   template drawn by synth's ``draw_shape`` at the image's resolution, aligned on the object's
   centroid and blurred by each of ``TEMPLATE_BLURS``; the best template names both and gives
   the object's ``bbox``; **position** — the ``POSITIONS`` centre nearest to that box's centre.

``score(predicted, truth)`` pairs predicted with true objects by the assignment that agrees on
the most attributes (``pair_objects``); ``evaluate`` runs both over images and their captions.
An under-specified caption (synth's ``underspecify``: it leaves the colour, size, position or
background unnamed, e.g. "a small circle at the top left on a navy background") parses with
``"unnamed"`` set, and its unnamed attribute is scored neither right nor wrong (``None``);
``pipeline.evaluation.one_to_many`` reads that attribute instead, to measure diversity.
``adherence_table`` writes the accuracies as Markdown; ``render_caption`` draws a caption
exactly as synth would.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from pipeline.evaluation.synthetic import (
    BACKGROUNDS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    caption_for,
    draw_shape,
    object_box,
)

ATTRIBUTES = ("colour", "shape", "size", "position")  # per-object attributes, in caption order
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background above which a pixel is foreground
CORE_FRACTION = 0.75  # colour from pixels at least this fraction of the component's farthest distance
SPECK_FRACTION = 0.3  # components below this fraction of synth's smallest object area are noise
MAX_OBJECTS = 2  # synth draws one or two objects
TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian sigmas (pixels) the templates are also tried at
PEAK_RADIUS = 2  # half-maximum test against the farthest pixel within this many pixels
ELONGATED = 1.5  # a component this many times longer than wide is two joined objects
MARGIN = 3  # pixels around an object's box that its template comparison looks at

_PALETTE = np.array(list(PALETTE.values()), dtype=np.float64)  # (C, 3)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)  # (B, 3)


# ----------------------------------------------------------------------------- captions


@lru_cache(maxsize=1)
def _caption_pattern() -> tuple[re.Pattern, re.Pattern]:
    """(whole caption, one object) regexes built from synth's vocabulary (longest names first); the
    size, colour, position and background are optional, since a caption may leave one unnamed."""

    def alternatives(names) -> str:
        return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))

    obj = (
        f"a (?:(?P<size>{alternatives(SIZES)}) )?(?:(?P<colour>{alternatives(PALETTE)}) )?"
        f"(?P<shape>{alternatives(SHAPES)})(?: at the (?P<position>{alternatives(POSITIONS)}))?"
    )
    plain = re.sub(r"\(\?P<\w+>", "(?:", obj)
    whole = f"(?P<objects>{plain}(?: and {plain})*)(?: on an? (?P<background>{alternatives(BACKGROUNDS)}) background)?"
    return re.compile(whole), re.compile(obj)


def parse_caption(caption: str) -> dict:
    """Invert ``pipeline.evaluation.synthetic.caption_for``: ``{"background": name, "objects": [{size, colour, shape, position}]}``.

    A caption that leaves one of ``UNNAMEABLE`` out (``caption_for(..., unnamed=...)``) parses too:
    the result then has ``"unnamed": attribute`` and that attribute is ``None`` (in every object, or
    the background); a caption naming everything has no ``"unnamed"`` key. Raises ``ValueError`` for
    any caption that ``caption_for`` could not have written (e.g. one leaving out two attributes).
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    whole, obj = _caption_pattern()
    match = whole.fullmatch(caption)
    if match is None:
        raise ValueError(f"caption outside the synthetic grammar: {caption!r}")
    objects = [
        {key: obj.fullmatch(part).group(key) for key in ("size", "colour", "shape", "position")}
        for part in match.group("objects").split(" and ")  # no vocabulary word contains " and "
    ]
    missing = {key for o in objects for key, value in o.items() if value is None}
    missing |= {"background"} if match.group("background") is None else set()
    if len(missing) > 1:  # caption_for leaves out one attribute at most
        raise ValueError(f"caption outside the synthetic grammar: {caption!r}")
    unnamed = next(iter(missing), None)
    if caption_for(match.group("background"), objects, unnamed) != caption:  # e.g. "a orange", or one object's colour left out
        raise ValueError(f"caption outside the synthetic grammar: {caption!r}")
    parsed = {"background": match.group("background"), "objects": objects}
    return parsed if unnamed is None else {**parsed, "unnamed": unnamed}


def render_caption(caption: str, resolution: int = 32) -> Image.Image:
    """A clean render of a synth caption, pixel for pixel as ``data_tools.synth`` draws it; the
    caption must name every attribute (``ValueError`` otherwise)."""
    parsed = parse_caption(caption)
    if "unnamed" in parsed:
        raise ValueError(f"cannot render a caption that leaves the {parsed['unnamed']} unnamed: {caption!r}")
    side = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[parsed["background"]])
    draw = ImageDraw.Draw(canvas)
    for obj in parsed["objects"]:
        box = tuple(v * SUPERSAMPLE for v in object_box(obj, resolution))
        draw_shape(draw, obj["shape"], box, PALETTE[obj["colour"]])
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- pixels


def _pixels(image: Image.Image) -> np.ndarray:
    """``image`` as float RGB ``(H, W, 3)`` in 0..255; square images only (synth's layout is square)."""
    if image.width != image.height:
        raise ValueError(f"adherence expects square images, got {image.width}x{image.height}")
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _nearest(rgb: np.ndarray, table: np.ndarray) -> int:
    return int(np.argmin(np.linalg.norm(table - rgb, axis=1)))


def _background(pixels: np.ndarray) -> np.ndarray:
    """The measured background colour: per-channel median of the one-pixel border. ``(3,)``"""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (4R-4, 3)
    return np.median(border, axis=0)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: labels ``(H, W)`` (0 = off, 1..n) and n.

    Min-label propagation with numpy until stable, then labels renumbered in raster order.
    """
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        nbr = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        new = np.where(mask, nbr, big)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, inverse = np.unique(np.where(mask, labels, 0), return_inverse=True)
    out = inverse.reshape(h, w)
    if roots[0] != 0:  # no background pixel at all
        out = out + 1
    return out, int(len(roots) - (roots[0] == 0))


def _objects_mask(distance: np.ndarray) -> tuple[np.ndarray, int]:
    """Components of the foreground: pixels farther than ``FOREGROUND_DISTANCE`` from the background
    and at least half as far as the farthest pixel within ``PEAK_RADIUS`` — the half-maximum
    outline of each object, which trims the antialiased rim and separates blurred objects that touch."""
    r = PEAK_RADIUS
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(distance, r, mode="edge"), (2 * r + 1, 2 * r + 1))
    local_peak = windows.max(axis=(2, 3))  # (H, W)
    mask = (distance > FOREGROUND_DISTANCE) & (distance >= 0.5 * local_peak)
    labels, count = _label(mask)
    cut = False
    for label in range(1, count + 1):
        cut |= _cut_elongated(mask, distance, labels == label)
    return _label(mask) if cut else (labels, count)


def _cut_elongated(mask: np.ndarray, distance: np.ndarray, members: np.ndarray) -> bool:
    """Every synth object has a square box, so a component ``ELONGATED`` times longer than wide is
    two objects side by side that blur joined: clear (in ``mask``) the line across it, in the
    middle half of its long side, where it is faintest. Returns whether it cut."""
    ys, xs = np.nonzero(members)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if max(height, width) < ELONGATED * min(height, width):
        return False
    axis, start, length = (0, ys.min(), height) if height > width else (1, xs.min(), width)
    profile = np.where(members, distance, 0.0).sum(axis=1 - axis)  # (R,) along the long axis
    lo, hi = start + length // 4, start + length - length // 4
    line = lo + int(np.argmin(profile[lo:hi]))
    if axis == 0:
        mask[line, members[line]] = False
    else:
        mask[members[:, line], line] = False
    return True


def _object_colour(pixels: np.ndarray, background: np.ndarray, members: np.ndarray) -> tuple[str, np.ndarray]:
    """Palette name and measured core colour of one component (``members``: boolean ``(H, W)``)."""
    values = pixels[members]  # (N, 3)
    distance = np.linalg.norm(values - background, axis=1)
    core = np.median(values[distance >= CORE_FRACTION * distance.max()], axis=0)  # (3,)
    # distance from the core colour to each segment background -> palette colour
    direction = _PALETTE - background  # (C, 3)
    t = np.clip(((core - background) @ direction.T) / np.maximum((direction**2).sum(1), 1e-9), 0.0, 1.0)
    residual = np.linalg.norm(background + t[:, None] * direction - core, axis=1)
    return list(PALETTE)[int(np.argmin(residual))], core


@lru_cache(maxsize=256)
def _template_centroid(shape: str, side: int) -> tuple[float, float]:
    """Centroid (x, y) of a shape's coverage, relative to its box's top-left corner, in pixels."""
    alpha = _render(shape, side, (MARGIN * SUPERSAMPLE, MARGIN * SUPERSAMPLE), (side + 2 * MARGIN,) * 2)
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]] + 0.5
    total = alpha.sum()
    return float((alpha * xs).sum() / total - MARGIN), float((alpha * ys).sum() / total - MARGIN)


def _render(shape: str, side: int, origin: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Coverage ``(h, w)`` in [0, 1] of ``shape`` with box side ``side`` px, top-left ``origin`` in
    supersampled units, on an ``(h, w)`` pixel window — drawn exactly as synth draws it."""
    h, w = size
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    x0, y0 = origin
    s = side * SUPERSAMPLE
    draw_shape(ImageDraw.Draw(canvas), shape, (x0, y0, x0 + s, y0 + s), 255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix of a 1-D Gaussian blur with zero padding: ``M @ x`` blurs ``x``."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / np.exp(-0.5 * (np.arange(-n + 1, n) / sigma) ** 2).sum()


def _blur(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (standard deviation ``sigma`` pixels, zero padding), same shape."""
    if sigma <= 0:
        return alpha
    h, w = alpha.shape
    return _blur_matrix(h, sigma) @ alpha @ _blur_matrix(w, sigma).T


def _shape_and_size(alpha: np.ndarray, resolution: int) -> tuple[str, str, tuple[float, float, int]]:
    """The (shape, size) whose template, aligned on ``alpha``'s centroid and blurred by one of
    ``TEMPLATE_BLURS``, has the highest cosine similarity to ``alpha``; and that template's box
    ``(x0, y0, side)`` in ``alpha``'s pixel coordinates."""
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]] + 0.5
    total = max(alpha.sum(), 1e-9)
    cx, cy = (alpha * xs).sum() / total, (alpha * ys).sum() / total
    best, best_cost = ("square", "small", (0.0, 0.0, 1)), np.inf
    pad = int(np.ceil(3 * max(TEMPLATE_BLURS)))
    h, w = alpha.shape
    for size, fraction in SIZES.items():
        side = max(1, round(fraction * resolution))
        for shape in SHAPES:
            tx, ty = _template_centroid(shape, side)
            origin = (round((cx + pad - tx) * SUPERSAMPLE), round((cy + pad - ty) * SUPERSAMPLE))
            sharp = _render(shape, side, origin, (h + 2 * pad, w + 2 * pad))
            for sigma in TEMPLATE_BLURS:
                template = _blur(sharp, sigma)[pad : pad + h, pad : pad + w]
                cost = 1 - (template * alpha).sum() / max(np.linalg.norm(template) * np.linalg.norm(alpha), 1e-9)
                if cost < best_cost:
                    box = (origin[0] / SUPERSAMPLE - pad, origin[1] / SUPERSAMPLE - pad, side)
                    best, best_cost = (shape, size, box), cost
    return best


def _describe(pixels: np.ndarray, background: np.ndarray, labels: np.ndarray, label: int) -> dict:
    """Colour, shape, size, position, box (the matched template's) and pixel count of component ``label``."""
    resolution = pixels.shape[0]
    members = labels == label
    ys, xs = np.nonzero(members)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1  # half-open
    colour, core = _object_colour(pixels, background, members)
    # soft coverage in a window around the box; other components' pixels count as background
    wx0, wy0 = max(0, x0 - MARGIN), max(0, y0 - MARGIN)
    wx1, wy1 = min(resolution, x1 + MARGIN), min(resolution, y1 + MARGIN)
    window = pixels[wy0:wy1, wx0:wx1] - background  # (h, w, 3)
    direction = core - background
    alpha = np.clip(window @ direction / max(direction @ direction, 1e-9), 0.0, 1.0)
    others = labels[wy0:wy1, wx0:wx1]
    alpha[(others != 0) & (others != label)] = 0.0
    # the window may be clipped by the image edge: pad so the template has room
    pad = ((wy0 - (y0 - MARGIN), (y1 + MARGIN) - wy1), (wx0 - (x0 - MARGIN), (x1 + MARGIN) - wx1))
    shape, size, (bx, by, side) = _shape_and_size(np.pad(alpha, pad), resolution)
    bx, by = round(x0 - MARGIN + bx), round(y0 - MARGIN + by)  # the matched template's box
    centre = np.array([bx + side / 2, by + side / 2]) / resolution
    position = min(POSITIONS, key=lambda name: float(np.linalg.norm(centre - np.array(POSITIONS[name]))))
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "position": position,
        "bbox": [bx, by, bx + side, by + side],
        "pixels": int(members.sum()),
    }


def analyse(image: Image.Image, expected_objects: int | None = None) -> dict:
    """Attributes of ``image`` decided from its pixels: ``{"background", "objects": [...]}``.

    Each object: ``colour``, ``shape``, ``size``, ``position`` (synth names), ``bbox``
    (``[x0, y0, x1, y1)`` in pixels) and ``pixels`` (foreground pixel count); largest first.
    At most ``expected_objects`` objects are kept when given, else at most ``MAX_OBJECTS``.
    """
    if expected_objects is not None and expected_objects < 0:
        raise ValueError(f"expected_objects must be >= 0, got {expected_objects}")
    pixels = _pixels(image)  # (R, R, 3)
    resolution = pixels.shape[0]
    background = _background(pixels)
    result = {"background": list(BACKGROUNDS)[_nearest(background, _BACKGROUND_RGB)], "objects": []}
    labels, count = _objects_mask(np.linalg.norm(pixels - background, axis=2))
    if count == 0:
        return result
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # (count,)
    smallest_object = 0.5 * (min(SIZES.values()) * resolution) ** 2  # a small triangle
    keep = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= SPECK_FRACTION * smallest_object]
    limit = MAX_OBJECTS if expected_objects is None else expected_objects
    result["objects"] = [_describe(pixels, background, labels, label) for label in keep[:limit]]
    return result


# ----------------------------------------------------------------------------- scoring


def pair_objects(predicted: list[dict], true: list[dict], attributes: tuple[str, ...] = ATTRIBUTES) -> tuple[int | None, ...]:
    """For each true object, the index of its predicted object (``None`` when there are too few):
    the assignment with the most agreeing ``attributes`` (ties: the first in ``itertools.permutations`` order)."""
    slots = list(range(len(predicted))) + [None] * max(0, len(true) - len(predicted))
    best, best_total = (), -1
    for assignment in itertools.permutations(slots, len(true)):
        total = sum(
            sum(predicted[j][a] == t[a] for a in attributes) for j, t in zip(assignment, true) if j is not None
        )
        if total > best_total:
            best, best_total = assignment, total
    return best


def score(predicted: dict, truth: dict) -> dict:
    """Per-attribute correctness of ``predicted`` (``analyse``) against ``truth`` (``parse_caption``
    or synth's JSON): ``{"background", "colour", "shape", "size", "position", "count", "all"}``.

    An object attribute is correct when every true object is matched to a predicted one with the
    same value. Objects are paired by the assignment with the most agreeing attributes (ties: the
    first in ``itertools.permutations`` order). A missing object makes all its attributes wrong;
    a missing or extra object makes ``count`` and ``all`` False. The attribute the caption leaves
    unnamed (``truth["unnamed"]``) is neither right nor wrong: it is ``None``, the pairing ignores
    it and ``all`` covers the named ones.
    """
    pred_objects, true_objects = predicted["objects"], truth["objects"]
    unnamed = truth.get("unnamed")
    best = pair_objects(pred_objects, true_objects, tuple(a for a in ATTRIBUTES if a != unnamed))
    result = {"background": None if unnamed == "background" else predicted["background"] == truth["background"]}
    for attribute in ATTRIBUTES:
        result[attribute] = None if attribute == unnamed else all(
            j is not None and pred_objects[j][attribute] == t[attribute] for j, t in zip(best, true_objects)
        )
    result["count"] = len(pred_objects) == len(true_objects)
    result["all"] = all(value for value in result.values() if value is not None)
    return result


SCORED = ("background", "colour", "shape", "size", "position", "count")


def evaluate(images: list[Image.Image], captions: list[str]) -> dict:
    """Score each image against its synth-grammar caption.

    Returns ``{"per_sample": [{"caption", "predicted", "correct"}], "accuracy": {attribute: rate},
    "named": {attribute: n}, "all_correct": rate, "count": n}``; ``accuracy`` covers ``SCORED``
    (``count``: the number of objects was right), each over the ``named[attribute]`` captions that
    name it (``None`` when none does). Raises ``ValueError`` for a caption outside the grammar.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("nothing to evaluate: no images")
    truths = [parse_caption(caption) for caption in captions]  # fail on a bad caption before any work
    per_sample = []
    for image, caption, truth in zip(images, captions, truths):
        predicted = analyse(image)
        per_sample.append({"caption": caption, "predicted": predicted, "correct": score(predicted, truth)})
    n = len(per_sample)
    accuracy, named = {}, {}
    for key in SCORED:
        flags = [s["correct"][key] for s in per_sample if s["correct"][key] is not None]
        accuracy[key], named[key] = (sum(flags) / len(flags) if flags else None), len(flags)
    all_correct = sum(s["correct"]["all"] for s in per_sample) / n
    return {"per_sample": per_sample, "accuracy": accuracy, "named": named, "all_correct": all_correct, "count": n}


def by_object_count(result: dict, captions: list[str]) -> dict[str, float]:
    """The all-correct rate of an ``evaluate`` result per number of objects its caption names
    (``{"1": rate, "2": rate}``): two-object prompts test binding, which one-object prompts do not."""
    groups: dict[str, list[bool]] = {}
    for sample, caption in zip(result["per_sample"], captions, strict=True):
        groups.setdefault(str(len(parse_caption(caption)["objects"])), []).append(bool(sample["correct"]["all"]))
    return {count: sum(flags) / len(flags) for count, flags in sorted(groups.items())}


def adherence_table(result: dict) -> str:
    """The accuracies of an ``evaluate`` result as a Markdown table (an attribute some captions
    leave unnamed shows how many name it)."""
    lines = [f"| attribute | accuracy (n = {result['count']}) |", "|---|---:|"]
    for key, value in result["accuracy"].items():
        named = result.get("named", {}).get(key, result["count"])
        shown = "unnamed in every caption" if value is None else f"{value:.3f}"
        note = "" if named == result["count"] else f" (n = {named})"
        lines.append(f"| {key} | {shown}{note} |")
    lines.append(f"| **all correct** | **{result['all_correct']:.3f}** |")
    return "\n".join(lines) + "\n"
