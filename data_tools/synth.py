"""``python -m data_tools.synth``: the embedded synthetic image-caption dataset.

Each image shows one or two flat-coloured shapes on a flat background, with a caption
that names every attribute, e.g. "a small red circle at the top left on a navy
background". The grammar (vocabulary, layout, drawing) is the library's
``pipeline.evaluation.synthetic``, so the evaluator reads generated images back with the very
code that drew the training set.

Output per sample ``i``: ``{i:06d}.png``, ``{i:06d}.txt`` (caption) and ``{i:06d}.json``
(ground truth), plus ``dataset.json`` for the folder. Sample ``i`` depends only on
(seed, i, resolution, second-object probability, aspects), never on ``--count``.
``--aspect 0.5,1,2`` draws non-square scenes (aspect-ratio buckets: ``data_tools.encode --buckets``).
``--concept mint --concept-prob P`` paints each object in a colour that default scenes never use
(a concept to teach a trained model, e.g. with LoRA). ``--underspecify F`` leaves one attribute
(``--unnamed``, default colour, position, size, background) out of a fraction F of the captions,
for the one-to-many evaluation; the images do not change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.evaluation.synthetic import NOVEL_COLOURS, UNNAMEABLE, parse_attributes, render_sample, vocabulary

PROG = "data_tools.synth"


def generate(
    output: Path, count: int, resolution: int, seed: int, second_object_prob: float = 0.25,
    aspects: tuple[float, ...] = (1.0,), **captions,
) -> None:
    """Write ``count`` samples and ``dataset.json`` into ``output`` (created if needed).
    ``captions``: ``render_sample``'s keywords (concept, concept_prob, underspecify, unnameable)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(count), desc=PROG, unit="img"):
        image, truth = render_sample(index, resolution, seed, second_object_prob, aspects, **captions)
        stem = output / f"{index:06d}"
        image.save(stem.with_suffix(".png"), format="PNG")
        stem.with_suffix(".txt").write_text(truth["caption"], encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    dataset = {
        "kind": "synthetic_images",
        "created_by": PROG,
        "count": count,
        "resolution": resolution,
        "seed": seed,
        "second_object_prob": second_object_prob,
        "aspects": list(aspects),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in captions.items()},
        "vocabulary": vocabulary(),
    }
    (output / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="folder for the PNG/TXT/JSON files")
    p.add_argument("--count", required=True, type=int, help="number of samples (>= 1)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (>= 16)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; sample i depends only on (seed, i)")
    p.add_argument("--second-object-prob", type=float, default=0.25, help="probability of a second object (0-1)")
    p.add_argument("--aspect", type=aspect_list, default=(1.0,), metavar="A,B,...",
                   help="width/height ratios to draw from, e.g. 0.5,1,2 (images of about resolution² pixels, sides multiples of 8)")
    p.add_argument("--concept", choices=sorted(NOVEL_COLOURS),
                   help="a colour default scenes never use; each object takes it with --concept-prob")
    p.add_argument("--concept-prob", type=float, default=1.0, help="probability an object has the --concept colour (0-1)")
    p.add_argument("--underspecify", type=float, default=0.0, metavar="F",
                   help="fraction of captions that leave one --unnamed attribute out (0-1; the images do not change)")
    p.add_argument("--unnamed", type=attribute_list, default=UNNAMEABLE, metavar="A,B,...",
                   help=f"attributes an under-specified caption may leave out (default {','.join(UNNAMEABLE)})")
    return p


def attribute_list(text: str) -> tuple[str, ...]:
    """``"colour,size"`` -> ("colour", "size"); each one of ``UNNAMEABLE``."""
    try:
        return parse_attributes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def aspect_list(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` -> (0.5, 1.0, 2.0); each in [1/4, 4]."""
    try:
        aspects = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not all(0.25 <= a <= 4 for a in aspects):
        raise argparse.ArgumentTypeError(f"aspect ratios must be in [0.25, 4] (got {text})")
    return aspects


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1 (got {args.count})")
    if args.resolution < 16:
        parser.error(f"--resolution must be >= 16 (got {args.resolution})")
    for flag in ("second_object_prob", "concept_prob", "underspecify"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1] (got {getattr(args, flag)})")
    captions = {}
    if args.concept:
        captions.update(concept=args.concept, concept_prob=args.concept_prob)
    if args.underspecify:
        captions.update(underspecify=args.underspecify, unnameable=args.unnamed)
    generate(args.output, args.count, args.resolution, args.seed, args.second_object_prob, args.aspect, **captions)
    print(f"wrote {args.count} samples to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
