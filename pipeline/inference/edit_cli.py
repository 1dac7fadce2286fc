"""``python -m pipeline.edit --model DIR --image IN.png [--mask M.png] [--strength S]
[--prompt … | --source-prompt … --target-prompt …] [--outpaint L,T,R,B] [--scale 2] --output OUT.png``

Edits images with an exported teacher or student (``pipeline.inference.editing``). The mode
follows from the arguments: ``--source-prompt/--target-prompt`` FlowEdit; ``--outpaint`` grows
the canvas; ``--scale`` super-resolves; ``--mask`` inpaints its white part; otherwise
image-to-image. ``--image`` is a file, a folder of images (``--mask`` then a folder of masks
with the same names; ``--output`` a folder) or a ``.jsonl`` manifest whose rows give ``image``
and any of ``mask``, ``prompt``, ``source_prompt``, ``target_prompt``, ``strength``,
``outpaint``, ``scale`` (relative paths from the manifest's folder; the command line gives the
rest). Image k draws all its noise from seed + k; edits of one mode, size and settings run in
batches of ``--batch-size``, which does not change the results. Masked edits (``--mask``,
``--outpaint``) put the input's pixels back outside the feathered mask after decoding unless
``--no-paste-back``. A sheet of input | mask | output is written beside the results.

An image-conditioned model (trained on pairs with ``model.image_condition``: InstructPix2Pix,
Brooks et al. 2023; FLUX.1 Kontext) has one mode: ``--image`` is its source, ``--prompt`` what the
result shows, and it samples from noise at the image's size with dual guidance ``--guidance`` (text)
and ``--image-guidance`` (the source; default the model's, else 1.5); the other modes' flags
(``--mask``, ``--strength``, ``--outpaint``, ``--scale``, FlowEdit's prompts) are refused.

``--sampler NAME`` (and its knobs, as in ``pipeline.sample``) edits with another sampler that fits
the model: a teacher's Heun, SDE, ancestral or predictor–corrector for image-to-image, inpainting,
outpainting and super-resolution (FlowEdit integrates its own Euler steps).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.images import IMAGE_EXTENSIONS, to_rgb
from pipeline.data.jsonl import read_jsonl
from pipeline.data.model_folder import read_model_info
from pipeline.encoders.common import EncoderLoadError
from pipeline.encoders.locations import add_encoder_args, encoder_paths
from pipeline.figures.sheets import strips_sheet
from pipeline.inference.editing import (
    EditInputError,
    ImageEditor,
    Sampling,
    check_strength,
    mask_tensor,
    outpaint_canvas,
    upscale,
)
from pipeline.inference.pipeline import TextToImage, add_sampler_args, sampler_from_args

PROG = "pipeline.edit"
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "outpaint": 1.0, "superres": 0.4, "flowedit": 0.7, "conditioned": 1.0}
DEFAULT_IMAGE_GUIDANCE = 1.5  # InstructPix2Pix's s_I, when the model folder records none


@dataclass
class Item:
    """One edit: its input, mode, prompts, strength and where its result goes."""

    image: Path
    output: Path
    prompt: str = ""
    mask: Path | None = None
    source_prompt: str | None = None
    target_prompt: str | None = None
    strength: float | None = None
    outpaint: tuple[int, int, int, int] | None = None
    scale: float | None = None
    seed: int = 0
    conditioned: bool = False  # the model is image-conditioned: the image is its source

    @property
    def mode(self) -> str:
        if self.conditioned:
            return "conditioned"
        if self.source_prompt is not None or self.target_prompt is not None:
            return "flowedit"
        if self.outpaint is not None:
            return "outpaint"
        if self.scale is not None:
            return "superres"
        return "inpaint" if self.mask is not None else "img2img"

    def check(self) -> Item:
        if self.conditioned:
            given = [flag for flag, value in (("--mask", self.mask), ("--strength", self.strength), ("--outpaint", self.outpaint),
                                              ("--scale", self.scale), ("--source-prompt", self.source_prompt),
                                              ("--target-prompt", self.target_prompt)) if value is not None]
            if given:
                raise EditInputError(f"{self.image}: the model is image-conditioned (the image is its source, sampled from noise); "
                                     f"{', '.join(given)} belong to a text-to-image model's edits")
        if self.mode == "flowedit" and (self.source_prompt is None or self.target_prompt is None):
            raise EditInputError(f"{self.image}: --source-prompt and --target-prompt go together")
        if self.mode == "outpaint" and self.mask is not None:
            raise EditInputError(f"{self.image}: --outpaint makes its own mask; do not give --mask")
        strength = DEFAULT_STRENGTH[self.mode] if self.strength is None else self.strength
        return replace(self, strength=check_strength(strength))


def read_image(path: Path, what: str = "image") -> Image.Image:
    """An image file, fully decoded; one clear error if it cannot be."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise EditInputError(f"{what} not found: '{path}'") from None
    except (UnidentifiedImageError, OSError) as err:
        raise EditInputError(f"{what} '{path}' cannot be read: {err}") from None


def parse_padding(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise EditInputError(f"--outpaint takes L,T,R,B pixels (got '{text}')")
    return values  # type: ignore[return-value]


def items_from(args: argparse.Namespace, conditioned: bool = False) -> list[Item]:
    """The edits the arguments describe, in order, image k with seed + k (``conditioned``: the
    model is image-conditioned)."""
    base = {"prompt": args.prompt or "", "source_prompt": args.source_prompt, "target_prompt": args.target_prompt,
            "strength": args.strength, "outpaint": parse_padding(args.outpaint) if args.outpaint else None,
            "scale": args.scale, "conditioned": conditioned}
    source = args.image
    if source.suffix == ".jsonl":
        items = _manifest(source, args.output, base)
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not files:
            raise EditInputError(f"no images in '{source}'")
        masks = args.mask
        items = [Item(f, args.output / f"{f.stem}.png", mask=(masks / f.name if masks else None), **base) for f in files]
    else:
        items = [Item(source, args.output, mask=args.mask, **base)]
    return [replace(item, seed=args.seed + k).check() for k, item in enumerate(items)]


def _manifest(path: Path, output: Path, base: dict) -> list[Item]:
    if not path.is_file():
        raise EditInputError(f"manifest not found: '{path}'")
    try:
        rows = read_jsonl(path)
    except ValueError as err:
        raise EditInputError(str(err)) from None
    items = []
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise EditInputError(f"{path}:{n}: a row needs an 'image' path")
        unknown = set(row) - {"image", "mask", "prompt", "source_prompt", "target_prompt", "strength", "outpaint", "scale"}
        if unknown:
            raise EditInputError(f"{path}:{n}: unknown field(s) {', '.join(sorted(unknown))}")
        fields = {**base, **{k: v for k, v in row.items() if k not in ("image", "mask")}}
        if isinstance(fields.get("outpaint"), str):
            fields["outpaint"] = parse_padding(fields["outpaint"])
        elif fields.get("outpaint") is not None:
            fields["outpaint"] = parse_padding(",".join(map(str, fields["outpaint"])))
        image = path.parent / row["image"]
        mask = path.parent / row["mask"] if row.get("mask") else None
        items.append(Item(image, output / f"{n:05d}_{image.stem}.png", mask=mask, **fields))
    if not items:
        raise EditInputError(f"no rows in '{path}'")
    return items


def load_inputs(item: Item) -> tuple[Image.Image, Image.Image | None]:
    """The item's image and mask, read and checked (before any model is loaded)."""
    image = to_rgb(read_image(item.image))
    mask = to_rgb(read_image(item.mask, "mask")).convert("L") if item.mask else None
    if mask is not None:
        mask_tensor(mask, image.size)  # the sizes agree
    return image, mask


def run_batch(editor: ImageEditor, items: list[Item], images: list[Image.Image], masks: list, sampling: Sampling,
              source_guidance: float, image_guidance: float | None = None) -> tuple[list[Image.Image], list, list[Image.Image]]:
    """(inputs as the model gets them, masks or None, results) for edits that share a mode, an
    input size and their settings (``batch_key``); item k keeps its own seed."""
    first, seeds = items[0], [item.seed for item in items]
    prompts = [item.prompt for item in items]
    if first.mode == "conditioned":
        out = editor.conditioned(images, prompts, sampling, seeds, image_guidance)
    elif first.mode == "flowedit":
        out = editor.text_edit(images, [i.source_prompt for i in items], [i.target_prompt for i in items], first.strength,
                               sampling, seeds, source_guidance)
    elif first.mode == "outpaint":
        canvases, borders = zip(*(outpaint_canvas(image, first.outpaint) for image in images))
        out = editor.edit(list(canvases), prompts, first.strength, list(borders), sampling, seeds)
        images, masks = list(canvases), [Image.fromarray((b * 255).astype("uint8")) for b in borders]
    elif first.mode == "superres":
        images = [upscale(image, first.scale) for image in images]
        out = editor.edit(images, prompts, first.strength, None, sampling, seeds)
    else:
        out = editor.edit(images, prompts, first.strength, masks if first.mode == "inpaint" else None, sampling, seeds)
    return images, masks, out


def batch_key(item: Item, image: Image.Image) -> tuple:
    """Edits with equal keys run in one batch."""
    return item.mode, image.size, item.strength, item.outpaint, item.scale


def batches(items: list[Item], inputs: list[tuple], size: int) -> list[list[int]]:
    """Indices of ``items`` grouped by ``batch_key`` (first appearance first), at most ``size`` each."""
    groups: dict[tuple, list[int]] = {}
    for k, (item, (image, _)) in enumerate(zip(items, inputs)):
        groups.setdefault(batch_key(item, image), []).append(k)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", type=Path, required=True, help="exported teacher or student folder")
    p.add_argument("--image", type=Path, required=True, help="an image, a folder of images or a .jsonl manifest")
    p.add_argument("--mask", type=Path, help="white = redraw (a file, or a folder beside a folder of images)")
    p.add_argument("--prompt", help="what the result should show")
    p.add_argument("--source-prompt", help="FlowEdit: what the image shows")
    p.add_argument("--target-prompt", help="FlowEdit: what it should show")
    p.add_argument("--strength", type=float, help="share of the steps to run, in (0, 1]: the start is the shifted "
                   "grid's time shift_time(strength), as diffusers' SD3 img2img; default per mode: "
                   + ", ".join(f"{m} {s}" for m, s in DEFAULT_STRENGTH.items()))
    p.add_argument("--outpaint", help="grow the canvas by L,T,R,B pixels")
    p.add_argument("--scale", type=float, help="super-resolution factor (e.g. 2)")
    p.add_argument("--steps", type=int, default=50, help="steps of the full grid (only those below the strength run)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--source-guidance", type=float, default=1.5, help="FlowEdit: guidance of the source prompt")
    p.add_argument("--image-guidance", type=float, help="an image-conditioned model: guidance of the source image "
                   f"(InstructPix2Pix's s_I; default the model's, else {DEFAULT_IMAGE_GUIDANCE}; 1: text guidance only)")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--resample", type=int, default=0, help="RePaint jumps per step (teacher)")
    p.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=True,
                   help="masked edits: put the input's pixels back outside the feathered mask after decoding "
                        "(default; --no-paste-back keeps the decoder's pixels, which it recolours)")
    p.add_argument("--feather", type=int, help="paste-back feather in pixels (default: 1/32 of the shorter side, "
                   "at least 2; 0: a hard edge)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--batch-size", type=int, default=8, help="edits of one mode, size and settings run together")
    p.add_argument("--output", type=Path, required=True, help="OUT.png, or a folder for a folder/manifest")
    p.add_argument("--sheet", type=Path, help="input | mask | output sheet (default: beside the output)")
    add_sampler_args(p)
    add_encoder_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    try:
        info = read_model_info(args.model)  # what the model is, before any weights are loaded
        sampler, options = sampler_from_args(p, args, info.get("sampler", "euler"))
        if args.resample and sampler != "euler":
            p.error(f"--resample (RePaint jumps) is euler's; sampler '{sampler}' takes none")
        conditioned = info.get("image_condition") is not None
        if args.image_guidance is not None and not conditioned:
            raise EditInputError(f"--image-guidance: {args.model} is a text-to-image model (no image_condition)")
        image_guidance = args.image_guidance
        if image_guidance is None:
            image_guidance = info.get("sampling", {}).get("image_guidance", DEFAULT_IMAGE_GUIDANCE)
        items = items_from(args, conditioned)
        if sampler not in ("euler", "consistency") and any(item.mode == "flowedit" for item in items):
            p.error(f"FlowEdit integrates its own Euler steps: --sampler {sampler} is for the other edits")
        steps = args.steps if options.times is None else len(options.times) + 1  # re-noise times fix the steps
        sampling = Sampling(steps=steps, guidance=args.guidance, shift=args.shift, resample=args.resample,
                            paste_back=args.paste_back, feather=args.feather, sampler=sampler, options=options)
        inputs = [load_inputs(item) for item in items]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        editor = ImageEditor(TextToImage.from_folder(args.model, device, encoder_paths(args)))
        rows: list = [None] * len(items)
        for batch in batches(items, inputs, args.batch_size):
            shown, masks, outs = run_batch(editor, [items[k] for k in batch], [inputs[k][0] for k in batch],
                                           [inputs[k][1] for k in batch], sampling, args.source_guidance, image_guidance)
            for k, image, mask, out in zip(batch, shown, masks, outs):
                items[k].output.parent.mkdir(parents=True, exist_ok=True)
                out.save(items[k].output)
                rows[k] = [image, mask if mask is not None else Image.new("L", image.size, 0), out]
        captions = [f"{item.mode} {item.strength}: {item.target_prompt or item.prompt}" for item in items]
    except (EditInputError, EncoderLoadError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    single = len(items) == 1 and args.image.suffix != ".jsonl" and not args.image.is_dir()
    sheet = args.sheet or (args.output.with_name(args.output.stem + "_sheet.png") if single else args.output / "sheet.png")
    strips_sheet(rows, captions, sheet, columns=4, gap=4)
    print(f"{PROG}: {len(items)} edit(s) -> {args.output}; sheet {sheet}")
    return 0
