"""``python -m data_tools.synth``: the embedded synthetic image-caption dataset.

Each image shows one or two flat-coloured shapes on a flat background, with a caption
that names every attribute, e.g. "a small red circle at the top left on a navy
background". The grammar (vocabulary, layout, drawing) is the library's
``pipeline.evaluation.synthetic``, so the evaluator reads generated images back with the very
code that drew the training set.

Output per sample ``i``: ``{i:06d}.png``, ``{i:06d}.txt`` (caption) and ``{i:06d}.json``
(ground truth), plus ``dataset.json`` for the folder. Sample ``i`` depends only on
(seed, i, resolution, second-object probability), never on ``--count``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.evaluation.synthetic import render_sample, vocabulary

PROG = "data_tools.synth"


def generate(output: Path, count: int, resolution: int, seed: int, second_object_prob: float = 0.25) -> None:
    """Write ``count`` samples and ``dataset.json`` into ``output`` (created if needed)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(count), desc=PROG, unit="img"):
        image, truth = render_sample(index, resolution, seed, second_object_prob)
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1 (got {args.count})")
    if args.resolution < 16:
        parser.error(f"--resolution must be >= 16 (got {args.resolution})")
    if not 0.0 <= args.second_object_prob <= 1.0:
        parser.error(f"--second-object-prob must be in [0, 1] (got {args.second_object_prob})")
    generate(args.output, args.count, args.resolution, args.seed, args.second_object_prob)
    print(f"wrote {args.count} samples to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
