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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.evaluation.synthetic import render_sample, vocabulary

PROG = "data_tools.synth"


def generate(
    output: Path, count: int, resolution: int, seed: int, second_object_prob: float = 0.25, aspects: tuple[float, ...] = (1.0,)
) -> None:
    """Write ``count`` samples and ``dataset.json`` into ``output`` (created if needed)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(count), desc=PROG, unit="img"):
        image, truth = render_sample(index, resolution, seed, second_object_prob, aspects)
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
    return p


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
    if not 0.0 <= args.second_object_prob <= 1.0:
        parser.error(f"--second-object-prob must be in [0, 1] (got {args.second_object_prob})")
    generate(args.output, args.count, args.resolution, args.seed, args.second_object_prob, args.aspect)
    print(f"wrote {args.count} samples to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
