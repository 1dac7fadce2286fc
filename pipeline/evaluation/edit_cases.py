"""Editing test cases drawn from the synthetic grammar, each with the image it should become.

Case ``k`` of a task depends only on (task, seed, k, resolution): a scene is rendered with
``pipeline.evaluation.synthetic`` and changed in a way the analyser can check from pixels.

- ``inpaint``: one object's box (plus ``MASK_MARGIN`` pixels) is masked and the prompt gives that
  object another colour and shape (same size and place); everything outside the mask must stay.
- ``inpaint_quarter`` / ``inpaint_half``: large masks — the central quarter of the image, or one
  half (the side drawn per case) — under the scene's own caption: the scene should come back, and
  the large new content should not recolour what is outside the mask (the VAE decoder mixes the
  whole latent; the small boxes of ``inpaint`` hardly show it).
- ``img2img``: the prompt names another background; the objects must stay as they are.
- ``flowedit``: the same change as ``img2img`` by FlowEdit, from the source caption to the target.
- ``outpaint``: a strip of a quarter of the side is cut off one edge (the side drawn per case)
  and grown back; the result should be the full render.
- ``superres``: the render box-downsampled by ``SR_SCALE`` is the input; the result should be
  the full-size render.

Inverse problems (``INVERSE_TASKS``, not in the default ``TASKS``): a known degradation
(``pipeline.data.degradations``, ``TASK_DEGRADATIONS``) of the render is the input, its own
caption the prompt, the render the target. ``measurement`` is ``y = A(render)`` (C, h, w) on the
8-bit grid (:func:`eight_bit`: what a user holds is an 8-bit image, so no method may read the truth
out of y's float digits: an exact deblurring would) and ``image`` is ``Degradation.source(render)``
(what a model gets: y shown as an image at full size).

- ``colourise``: ``grayscale`` (BT.601 luma);
- ``sr4``: ``down4`` (4× box average; the source is its bicubic upsampling);
- ``edges``: ``edges`` (Sobel magnitude; not linear: no projection);
- ``deblur``: ``blur`` (circular Gaussian, σ 1.5 px).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipeline.data.degradations import parse_degradation
from pipeline.data.images import image_to_tensor, tensor_to_images

from pipeline.evaluation.adherence import render_caption
from pipeline.evaluation.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    caption_for,
    render_sample,
)

TASKS = ("inpaint", "img2img", "flowedit", "outpaint", "superres", "inpaint_quarter", "inpaint_half")
TASK_DEGRADATIONS = {"colourise": "grayscale", "sr4": "down4", "edges": "edges", "deblur": "blur"}
INVERSE_TASKS = tuple(TASK_DEGRADATIONS)  # known degradations: source | each method | target
ALL_TASKS = TASKS + INVERSE_TASKS
MASKED = ("inpaint", "inpaint_quarter", "inpaint_half")  # the tasks that inpaint a mask
MASK_MARGIN = 2  # pixels around the object's box that the inpainting mask also covers
SR_SCALE = 2
OUTPAINT_FRACTION = 0.25  # of the side, cut off and grown back
SIDES = ("left", "top", "right", "bottom")


@dataclass
class EditCase:
    """One edit: the input (``image``, ``mask`` where the task has one), the ``prompt``, and what
    the result should be: ``truth`` (scene for the analyser) and ``reference`` (the full render)."""

    task: str
    index: int
    image: Image.Image
    prompt: str
    truth: dict
    reference: Image.Image
    mask: np.ndarray | None = None  # (H, W) float, 1 = redraw
    original: dict | None = None  # the scene before the edit (img2img, inpaint)
    new_object: dict | None = None  # inpaint: the object the prompt asks for
    padding: tuple[int, int, int, int] | None = None  # outpaint: (left, top, right, bottom)
    source_prompt: str | None = None  # flowedit: the caption of the input
    notes: dict = field(default_factory=dict)
    degradation: str | None = None  # inverse tasks: the spec of A (``TASK_DEGRADATIONS``)
    measurement: torch.Tensor | None = None  # inverse tasks: y = A(reference), (C, h, w)


def _scene(index: int, resolution: int, seed: int, second_object_prob: float) -> tuple[Image.Image, dict]:
    image, truth = render_sample(index, resolution, seed, second_object_prob)
    return image, {"background": truth["background"], "objects": truth["objects"]}


def _other(rng: random.Random, names, current: str) -> str:
    return rng.choice([name for name in names if name != current])


def _render(scene: dict, resolution: int) -> Image.Image:
    return render_caption(caption_for(scene["background"], scene["objects"]), resolution)


def inpaint_case(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
    image, scene = _scene(index, resolution, seed, second_object_prob)
    rng = random.Random(f"inpaint:{seed}:{index}")
    k = rng.randrange(len(scene["objects"]))
    old = scene["objects"][k]
    new = {**old, "colour": _other(rng, COLOURS, old["colour"]), "shape": _other(rng, SHAPES, old["shape"])}
    objects = [new if i == k else o for i, o in enumerate(scene["objects"])]
    target = {"background": scene["background"], "objects": objects}
    x0, y0, x1, y1 = old["bbox"]
    mask = np.zeros((resolution, resolution), dtype=np.float32)
    mask[max(0, y0 - MASK_MARGIN): y1 + MASK_MARGIN, max(0, x0 - MASK_MARGIN): x1 + MASK_MARGIN] = 1.0
    return EditCase("inpaint", index, image, caption_for(scene["background"], objects), target, _render(target, resolution),
                    mask=mask, original=scene, new_object=new)


def large_mask(resolution: int, task: str, side: str) -> np.ndarray:
    """(H, W) float, 1 = redraw: the central square of half the side (a quarter of the image) or
    the ``side`` half of the image."""
    mask = np.zeros((resolution, resolution), dtype=np.float32)
    half, quarter = resolution // 2, resolution // 4
    if task == "inpaint_quarter":
        mask[quarter:quarter + half, quarter:quarter + half] = 1.0
    else:
        rows, cols = {"left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
                      "top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None))}[side]
        mask[rows, cols] = 1.0
    return mask


def large_mask_case(task: str):
    """The builder of ``inpaint_quarter`` or ``inpaint_half`` cases: the render under a large mask,
    its own caption as the prompt, itself as the target."""

    def build(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
        image, scene = _scene(index, resolution, seed, second_object_prob)
        side = random.Random(f"{task}:{seed}:{index}").choice(SIDES)
        return EditCase(task, index, image, caption_for(scene["background"], scene["objects"]), scene, image,
                        mask=large_mask(resolution, task, side), original=scene,
                        notes={"side": side} if task == "inpaint_half" else {})

    return build


def img2img_case(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
    image, scene = _scene(index, resolution, seed, second_object_prob)
    rng = random.Random(f"img2img:{seed}:{index}")
    target = {**scene, "background": _other(rng, BACKGROUNDS, scene["background"])}
    return EditCase("img2img", index, image, caption_for(target["background"], target["objects"]), target,
                    _render(target, resolution), original=scene)


def flowedit_case(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
    case = img2img_case(index, resolution, seed, second_object_prob)
    source = caption_for(case.original["background"], case.original["objects"])
    return EditCase("flowedit", index, case.image, case.prompt, case.truth, case.reference, original=case.original,
                    source_prompt=source)


def outpaint_case(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
    full, scene = _scene(index, resolution, seed, second_object_prob)
    side = random.Random(f"outpaint:{seed}:{index}").choice(SIDES)
    cut = round(resolution * OUTPAINT_FRACTION)
    padding = tuple(cut if s == side else 0 for s in SIDES)
    left, top, right, bottom = padding
    image = full.crop((left, top, resolution - right, resolution - bottom))
    return EditCase("outpaint", index, image, caption_for(scene["background"], scene["objects"]), scene, full,
                    padding=padding, notes={"side": side})


def superres_case(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
    full, scene = _scene(index, resolution, seed, second_object_prob)
    small = full.resize((resolution // SR_SCALE,) * 2, Image.Resampling.BOX)
    return EditCase("superres", index, small, caption_for(scene["background"], scene["objects"]), scene, full)


def eight_bit(y: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] snapped to the 256 levels of an 8-bit image."""
    return ((y.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def inverse_case(task: str):
    """The builder of an inverse-problem case: the render, its degradation ``y`` and source image."""
    deg = parse_degradation(TASK_DEGRADATIONS[task])

    def build(index: int, resolution: int, seed: int, second_object_prob: float) -> EditCase:
        full, scene = _scene(index, resolution, seed, second_object_prob)
        x = image_to_tensor(full)[None]  # (1, 3, H, W)
        source = tensor_to_images(deg.source(x))[0]
        return EditCase(task, index, source, caption_for(scene["background"], scene["objects"]), scene, full,
                        degradation=deg.spec, measurement=eight_bit(deg.measure(x)[0]))

    return build


BUILDERS = {"inpaint": inpaint_case, "img2img": img2img_case, "flowedit": flowedit_case, "outpaint": outpaint_case,
            "superres": superres_case, "inpaint_quarter": large_mask_case("inpaint_quarter"),
            "inpaint_half": large_mask_case("inpaint_half"), **{task: inverse_case(task) for task in INVERSE_TASKS}}


def edit_cases(task: str, count: int, resolution: int, seed: int, second_object_prob: float = 0.25) -> list[EditCase]:
    """``count`` cases of ``task``; case k from (task, seed, k) alone."""
    if task not in BUILDERS:
        raise ValueError(f"unknown edit task '{task}' ({', '.join(ALL_TASKS)})")
    return [BUILDERS[task](k, resolution, seed, second_object_prob) for k in range(count)]
