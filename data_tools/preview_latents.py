"""``python -m data_tools.preview_latents LATENTS [--count 16] [--output PNG]``: look at latents.

Decodes the first ``--count`` samples of a latent folder (written by ``data_tools.encode``)
with the VAE its ``dataset.json`` records, undoing the recorded scale and shift exactly as
sampling does, and writes a contact sheet: ``original | decoded`` pairs when the image shards
the folder was encoded from are still there, the decoded images with their captions otherwise.
A wrong scaling factor, a different VAE or a corrupted shard shows at a glance.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

import torch

from pipeline.config import from_dict
from pipeline.data.buckets import fit_to_bucket
from pipeline.data.images import decode_image_sample
from pipeline.data.latents import decode_latent_sample, latent_meta, shard_list
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.figures.sheets import contact_sheet, pairs_sheet
from pipeline.data.images import tensor_to_images
from pipeline.data.remote import is_url, list_shards
from pipeline.data.shards import iter_samples

PROG = "data_tools.preview_latents"


def first_latents(folder: str | Path, count: int) -> list[dict]:
    decoded = (decode_latent_sample(raw) for raw in iter_samples(shard_list(folder)))
    return list(islice((s for s in decoded if s is not None), count))


def originals(meta: dict, keys: list[str], sizes: list[tuple[int, int]]) -> list[torch.Tensor] | None:
    """The source images of ``keys`` [(3, H, W)] from the folder's input shards, brought to their
    latents' ``sizes`` (width, height) as encode did; None if any is missing."""
    source = meta.get("input") or ""
    try:  # a local folder or a URL (pipeline.data.remote); gone or unreachable: no pairs
        shards = list_shards(source) if is_url(source) or Path(source).is_dir() else []
    except ValueError:
        return None
    wanted, found = dict(zip(keys, sizes)), {}
    for raw in iter_samples(shards):
        key = raw["__key__"]
        fit = (lambda image, size=wanted.get(key): (fit_to_bucket(image, size), size)) if meta.get("buckets") else None
        if key in wanted and (sample := decode_image_sample(raw, meta.get("resolution"), fit)) is not None:
            found[raw["__key__"]] = sample["image"]
            if len(found) == len(wanted):
                return [found[k] for k in keys]
    return None


@torch.no_grad()
def decode_first(folder: str | Path, count: int) -> tuple[dict, list[dict], list[torch.Tensor]]:
    """(dataset.json, the first ``count`` samples, their decoded pixels [(3, H, W)] in [-1, 1]; one
    VAE call per latent shape, as aspect-ratio buckets differ)."""
    meta = latent_meta(folder)
    samples = first_latents(folder, count)
    if not samples:
        raise ValueError(f"{folder} holds no latent samples")
    vae = FrozenVAE(from_dict(VAEConfig, meta["config"]["vae"]))
    pixels: list[torch.Tensor | None] = [None] * len(samples)
    for shape in dict.fromkeys(tuple(s["latent"].shape) for s in samples):
        rows = [i for i, s in enumerate(samples) if tuple(s["latent"].shape) == shape]
        decoded = vae.decode(torch.stack([samples[i]["latent"] for i in rows]))  # (B, C, h, w) -> (B, 3, H, W)
        for i, image in zip(rows, decoded):
            pixels[i] = image
    return meta, samples, pixels


def preview(folder: str | Path, output: Path, count: int = 16, columns: int = 4) -> dict:
    meta, samples, pixels = decode_first(folder, count)
    decoded = [tensor_to_images(p[None])[0] for p in pixels]
    source = originals(meta, [s["key"] for s in samples], [image.size for image in decoded])
    if source is None:
        contact_sheet(list(zip(decoded, [s["caption"] for s in samples])), output, columns)
    else:
        pairs_sheet([tensor_to_images(image[None])[0] for image in source], decoded, "original | decoded latent", output, columns)
    return {"samples": len(samples), "paired": source is not None, "output": str(output)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("latents", help="a latent folder written by data_tools.encode, its URL or a URL pattern")
    parser.add_argument("--count", type=int, default=16, help="samples to decode (default 16)")
    parser.add_argument("--columns", type=int, default=4, help="contact sheet columns (default 4)")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default LATENTS/preview.png; ./preview.png for a URL)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1 or args.columns < 1:
        parser.error("--count and --columns must be >= 1")
    output = args.output or (Path("preview.png") if is_url(args.latents) else Path(args.latents) / "preview.png")
    try:
        result = preview(args.latents, output, args.count, args.columns)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    kind = "original | decoded pairs" if result["paired"] else "decoded images (input shards not found)"
    print(f"{PROG}: {result['samples']} {kind} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
