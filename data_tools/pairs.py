"""``python -m data_tools.pairs``: paired image shards ``{source, target, caption}`` for
image-conditioned models (InstructPix2Pix-style concat, pix2pix, data-consistent solvers).

Three inputs, one of:

- ``--input SHARDS --degradation SPEC[,SPEC...]``: an image-shard folder (``data_tools.shard``'s
  or img2dataset's); each image is the target and its source is made by a named degradation
  (``pipeline.data.degradations``: grayscale, edges, canny, down2, down4, blur[:SIGMA],
  mask[:FRACTION], outpaint[:SIDE]) or ``objects``: a flat label map of the scene drawn from the
  synthetic renderer's metadata (``KEY.json`` "meta", ``data_tools.synth``; black background,
  each object's shape filled with its shape class's colour: :data:`SHAPE_COLOURS`). With several
  specs each sample gets one, drawn from its key and ``--seed``, so one model can learn several
  tasks. The input order is kept (image shards are shuffled already).
- ``--folder DIR``: real pairs laid out as ``DIR/source/NAME.ext`` and ``DIR/target/NAME.ext``
  (same NAME, any image extension), captions in ``DIR/target/NAME.txt`` (optional: none is an
  empty caption).
- ``--table FILE.(csv|tsv|jsonl|parquet)``: one pair per row, ``--source-column``,
  ``--target-column``, ``--caption-column`` (default source, target, caption; the caption column
  may be absent); paths relative to the table's folder.

For real pairs ``--degradation`` only labels them (e.g. ``grayscale`` for real colourisation
pairs; default ``real``). Folder and table pairs are shuffled with ``--seed`` as ``data_tools.shard``
does. ``--resolution S`` centre-crops target and source alike to S×S (default: kept as they are).

Output: image shards as ``data_tools.shard`` writes them (DESIGN.md §4: ``KEY.png`` the TARGET,
``KEY.txt``, ``KEY.json``, ``{name}-NNNNNN_stats.json``, ``dataset.json``) plus ``KEY.src.png``,
the SOURCE at the target's size (``Degradation.source``), and ``KEY.mask.png`` (L, 255 = kept)
for mask/outpaint. ``KEY.json`` gains ``"pair": {"degradation": SPEC, ...}``, ``dataset.json``
``"pairs": {"degradations": [SPEC, ...], "input": KIND}``. Bad pairs are skipped and counted by
reason in the stats (missing_source, missing_target, unreadable_source, unreadable_target,
size_mismatch, size_not_divisible, no_meta for ``objects``); every valid pair is written. A shard is
committed atomically and a rerun with the same command skips the complete ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_tools.images import ImageOptions, Skipped, decode, encode, open_checked
from data_tools.shard import ShardWriter, SampleResult, check_plan, order_candidates, summarize, worker_map
from data_tools.sources import IMAGE_EXTENSIONS, Discovery, SourceError, _manifest_rows
from pipeline.config import ConfigError, exit_on_config_error, from_dict
from pipeline.data.degradations import DEGRADATIONS, parse_degradation
from pipeline.data.images import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS, image_to_tensor, resize, tensor_to_images, to_rgb
from pipeline.data.remote import SourceNotFound, dataset_meta
from pipeline.data.shards import complete_shards, iter_samples, remove_partials, shard_name, write_json_atomic
from pipeline.evaluation.synthetic import SHAPES, draw_shape, object_box

PROG = "data_tools.pairs"
OBJECTS = "objects"
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
                                                  "cross": (255, 255, 0)}
assert set(SHAPE_COLOURS) == set(SHAPES)


@dataclass(kw_only=True)
class PairsConfig:
    """Options of ``data_tools.pairs`` (the command-line flags, same names)."""

    input: Path | None = None  # image-shard folder: sources made by --degradation
    folder: Path | None = None  # DIR/source/NAME.ext + DIR/target/NAME.ext (+ DIR/target/NAME.txt)
    table: Path | None = None  # csv/tsv/jsonl/parquet with source/target/caption columns
    output: Path
    degradation: str | None = None  # SPEC[,SPEC...]; for real pairs a label (default "real")
    name: str = "pairs"
    resolution: int | None = None  # centre-crop both images to this; None keeps their size
    samples_per_shard: int = 1000
    workers: int = 1
    seed: int = 0
    source_column: str = "source"
    target_column: str = "target"
    caption_column: str = "caption"
    resize: Literal["center_crop"] = "center_crop"  # what data_tools.shard's summary reads
    format: Literal["png"] = "png"
    dedup: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("input", "folder", "table") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --input, --folder, --table (got {', '.join(given) or 'none'})")
        for key in ("samples_per_shard", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 (got {self.resolution})")
        if not self.name or "." in self.name or "/" in self.name:
            raise ValueError(f"name must be non-empty without '.' or '/' (got {self.name!r})")
        if self.input is not None:
            if not self.degradation:
                raise ValueError(f"degradation: --input needs --degradation SPEC[,SPEC...] ({', '.join((*DEGRADATIONS, OBJECTS))})")
            for spec in self.specs:
                if spec != OBJECTS:
                    try:
                        parse_degradation(spec)
                    except ValueError as err:
                        raise ValueError(f"degradation: {err}; or {OBJECTS} (synthetic scenes' label maps)") from None
        elif self.degradation and "," in self.degradation:
            raise ValueError(f"degradation: real pairs take one label (got {self.degradation!r})")

    @property
    def specs(self) -> tuple[str, ...]:
        text = self.degradation or "real"
        return tuple(s.strip() for s in text.split(",") if s.strip())

    @property
    def kind(self) -> str:
        return "shards" if self.input is not None else "folder" if self.folder is not None else "table"


@dataclass(frozen=True)
class PairOptions:
    """What a worker needs besides the task (picklable)."""

    specs: tuple[str, ...]
    seed: int
    resolution: int | None
    degrade: bool  # True: make the source from the target; False: real pairs


@dataclass(frozen=True)
class PairTask:
    """One pair to make: the target's bytes (from a shard) or path, a real source's path, or none."""

    key: str  # the input's key or name: draws the spec and the mask
    origin: str  # what KEY.json's "source" records
    target: bytes | str
    source: str | None = None
    caption: str = ""
    meta: bytes | None = None  # the input shard's KEY.json


# ---------------------------------------------------------------------------- per pair (workers)


def make_pair(task: PairTask, opts: PairOptions) -> SampleResult:
    """Read, check and build one pair; never raises for bad input (a named skip instead)."""
    try:
        target = read_image(task.target, "target")
        if opts.degrade:
            spec = spec_for(task.key, opts.specs, opts.seed)
            meta = _json(task.meta)
            target = fit(target, opts.resolution)
            source, mask = degrade(target, spec, meta, _mask_seed(task.key, opts.seed))
        else:
            spec, meta, mask = opts.specs[0], {}, None
            source = read_image(task.source, "source")
            if source.size != target.size:
                raise Skipped("size_mismatch", f"{source.size} vs {target.size}")
            target, source = fit(target, opts.resolution), fit(source, opts.resolution)
    except Skipped as e:
        return SampleResult(reason=e.reason)
    members = {"png": encode(target, "png", 95), "src.png": encode(source, "png", 95), "txt": task.caption.encode("utf-8")}
    if mask is not None:
        members["mask.png"] = encode(mask, "png", 95)
    pair = {"degradation": spec, "input_key": task.key}
    if not opts.degrade:
        pair["source_path"] = Path(task.source).name
    info = {k: v for k, v in meta.items() if k != "key"}
    info.update(source=info.get("source", task.origin), caption=task.caption, width=target.width, height=target.height,
                status="success", pair=pair)
    return SampleResult(members=members, meta=info, sha256=hashlib.sha256(members["png"]).hexdigest())


def read_image(data: bytes | str, side: str) -> Image.Image:
    """Bytes or a path -> RGB image; ``Skipped("missing_SIDE" | "unreadable_SIDE")``."""
    if isinstance(data, str):
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise Skipped(f"missing_{side}") from None
        except OSError:
            raise Skipped(f"unreadable_{side}") from None
    try:
        image, _ = open_checked(data, ImageOptions())
        return to_rgb(decode(image, None))
    except Skipped as e:
        raise Skipped(f"unreadable_{side}", str(e)) from None


def fit(image: Image.Image, resolution: int | None) -> Image.Image:
    return image if resolution is None or image.size == (resolution, resolution) else resize(image, resolution, "center_crop")


def spec_for(key: str, specs: tuple[str, ...], seed: int) -> str:
    """The spec sample ``key`` gets: drawn from its key and the seed (any worker, any order)."""
    return specs[0] if len(specs) == 1 else random.Random(f"{seed}:{key}:spec").choice(specs)


def _mask_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:mask".encode()).digest()[:8], "little") & (2**63 - 1)


def _json(raw: bytes | None) -> dict:
    try:
        loaded = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def degrade(target: Image.Image, spec: str, meta: dict, mask_seed: int) -> tuple[Image.Image, Image.Image | None]:
    """The source image (at the target's size) and the kept-pixel mask (mask/outpaint only)."""
    if spec == OBJECTS:
        return object_map(meta, target.width, target.height), None
    deg = parse_degradation(spec)
    x = image_to_tensor(target)[None]  # (1, 3, H, W)
    factor = int(deg.name[-1]) if deg.name.startswith("down") else 1
    if target.width % factor or target.height % factor:
        raise Skipped("size_not_divisible", f"{target.size} by {factor}")
    mask = deg.masks(1, target.height, target.width, torch.Generator().manual_seed(mask_seed))  # (1, 1, H, W) or None
    source = tensor_to_images(deg.source(x, mask))[0]
    keep = None if mask is None else Image.fromarray((mask[0, 0] * 255).byte().numpy(), mode="L")
    return source, keep


def object_map(meta: dict, width: int, height: int) -> Image.Image:
    """The scene's per-shape-class label map: black, each object's shape in ``SHAPE_COLOURS``;
    ``Skipped("no_meta")`` for a sample without the synthetic renderer's metadata."""
    objects = (meta.get("meta") or {}).get("objects") if isinstance(meta.get("meta"), dict) else None
    if not objects or any(o.get("shape") not in SHAPE_COLOURS or "position" not in o or "size" not in o for o in objects):
        raise Skipped("no_meta")
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        draw_shape(draw, obj["shape"], object_box(obj, width, height), SHAPE_COLOURS[obj["shape"]])
    return canvas


# ---------------------------------------------------------------------------- inputs


def shard_tasks(folder: Path, skipped: Counter) -> Iterator[PairTask]:
    """One task per sample of an image-shard folder, streamed in order."""
    for raw in iter_samples(complete_shards(folder), skipped):
        ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            skipped["missing_target"] += 1
            continue
        caption = raw.get("txt", b"").decode("utf-8", "replace").strip()
        yield PairTask(key=raw["__key__"], origin=f"{Path(raw['__url__']).name}:{raw['__key__']}", target=raw[ext],
                       caption=caption, meta=raw.get("json"))


def folder_tasks(root: Path, skipped: Counter) -> list[PairTask]:
    """``root/source/NAME.ext`` with ``root/target/NAME.ext`` (+ ``root/target/NAME.txt``), by NAME."""
    if not (root / "source").is_dir() or not (root / "target").is_dir():
        raise SourceError(f"folder {root} needs source/ and target/ subfolders (source/NAME.png, target/NAME.png)")
    images = lambda sub: {p.stem: p for p in sorted((root / sub).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}  # noqa: E731
    sources, targets = images("source"), images("target")
    orphans = len(set(sources) - set(targets))  # a source without its target
    if orphans:
        skipped["missing_target"] += orphans
    tasks = []
    for name, target in sorted(targets.items()):
        if name not in sources:
            skipped["missing_source"] += 1
            continue
        caption_file = target.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else ""
        tasks.append(PairTask(key=name, origin=f"target/{target.name}", target=str(target), source=str(sources[name]), caption=caption))
    return tasks


def table_tasks(path: Path, cfg: PairsConfig, skipped: Counter) -> list[PairTask]:
    """One task per row of a CSV/TSV/JSONL/Parquet table; paths relative to its folder."""
    if not path.is_file():
        raise SourceError(f"table {path} does not exist")
    tasks = []
    for index, row in enumerate(_manifest_rows(path)):
        if row is None:
            skipped["bad_table_row"] += 1
            continue
        for column in (cfg.source_column, cfg.target_column):
            if column not in row:
                raise SourceError(f"table {path} has no column '{column}' (columns: {', '.join(map(str, row))}); "
                                  "name it with --source-column / --target-column")
        source, target = row[cfg.source_column], row[cfg.target_column]
        if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
            skipped["bad_table_row"] += 1
            continue
        caption = row.get(cfg.caption_column)
        tasks.append(PairTask(key=f"row{index:09d}", origin=f"{path.name}:{index}:{target}", target=str(path.parent / target),
                              source=str(path.parent / source), caption=str(caption).strip() if caption is not None else ""))
    return tasks


def tasks_of(cfg: PairsConfig, skipped: Counter) -> tuple[Iterable[PairTask], int | None, str]:
    """The tasks in shard order, their number when known, and a fingerprint of the input."""
    if cfg.input is not None:
        shards = complete_shards(cfg.input)
        if not shards:
            raise SourceError(f"no image shards in {cfg.input}")
        listing = [(s.name, s.stat().st_size) for s in shards]
        return shard_tasks(cfg.input, skipped), None, json.dumps(listing)
    found = folder_tasks(cfg.folder, skipped) if cfg.folder is not None else table_tasks(cfg.table, cfg, skipped)
    ordered = order_candidates(found, cfg.seed)
    return ordered, len(ordered), json.dumps([(t.origin, t.source) for t in ordered])


# ---------------------------------------------------------------------------- writing


def chunks(tasks: Iterable[PairTask], size: int) -> Iterator[list[PairTask]]:
    iterator = iter(tasks)
    while chunk := list(islice(iterator, size)):
        yield chunk


def write_pairs(cfg: PairsConfig, tasks: Iterable[PairTask], total: int | None) -> tuple[int, int]:
    """Make and write the shards (complete ones kept); returns (shards, pairs handled)."""
    opts = PairOptions(specs=cfg.specs, seed=cfg.seed, resolution=cfg.resolution, degrade=cfg.input is not None)
    writer, work, shards, handled = ShardWriter(cfg), partial(make_pair, opts=opts), 0, 0
    with worker_map(cfg.workers) as map_, tqdm(total=total, unit="pair", desc=PROG, mininterval=0.5) as bar:
        for index, chunk in enumerate(chunks(tasks, cfg.samples_per_shard)):
            if not (cfg.output / shard_name(cfg.name, index)).exists():
                started = time.time()
                writer.write(index, map_(work, chunk), started)
                handled += len(chunk)
            shards += 1
            bar.update(len(chunk))
    return shards, handled


def run(cfg: PairsConfig) -> dict:
    """Write the paired shards and dataset.json; returns dataset.json's content."""
    start, skipped = time.time(), Counter()
    tasks, total, listing = tasks_of(cfg, skipped)
    cfg.output.mkdir(parents=True, exist_ok=True)
    options = {k: str(v) for k, v in asdict(cfg).items() if k != "workers"}
    check_plan(cfg, hashlib.sha256((json.dumps(options, sort_keys=True) + listing).encode()).hexdigest(), total or 0)
    remove_partials(cfg.output)
    shards, handled = write_pairs(cfg, tasks, total)
    duration = time.time() - start
    summary = summarize(cfg, Discovery(skipped=skipped), shards, duration)
    summary.update(created_by=PROG, resolution=cfg.resolution or _input_resolution(cfg),
                   pairs={"degradations": list(cfg.specs), "input": cfg.kind})
    write_json_atomic(cfg.output / "dataset.json", summary)
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{PROG}: wrote {summary['samples']} pairs ({', '.join(cfg.specs)}) in {shards} shard(s) to {cfg.output} | "
          f"skipped {sum(summary['skipped'].values())} ({reasons}) | {duration:.1f} s, {handled / max(duration, 1e-9):.1f} pairs/s")
    return summary


def _input_resolution(cfg: PairsConfig) -> int | None:
    """An image-shard input's recorded resolution (the targets keep it); None otherwise."""
    if cfg.input is None:
        return None
    try:
        return dataset_meta(cfg.input).get("resolution")
    except SourceNotFound:  # img2dataset's folders have no dataset.json
        return None


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help="image-shard folder (ours or img2dataset's): sources made by --degradation")
    what.add_argument("--folder", type=Path, help="real pairs: DIR/source/NAME.ext, DIR/target/NAME.ext, DIR/target/NAME.txt")
    what.add_argument("--table", type=Path, help="real pairs: a .csv/.tsv/.jsonl/.parquet with source, target, caption columns")
    p.add_argument("--output", required=True, type=Path, help="folder for the paired shards (a rerun resumes)")
    p.add_argument("--degradation", default=None, metavar="SPEC[,SPEC...]",
                   help=f"{', '.join((*DEGRADATIONS, OBJECTS))} (blur:SIGMA, mask:FRACTION, outpaint:SIDE); "
                        "several: one drawn per sample; for real pairs a label (default real)")
    p.add_argument("--name", default="pairs", help="shard file prefix: NAME-000000.tar")
    p.add_argument("--resolution", type=int, default=None, help="centre-crop target and source to this side (default: as they are)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="draws each sample's spec and mask; shuffles folder/table pairs")
    p.add_argument("--source-column", default="source", help="table column of source image paths")
    p.add_argument("--target-column", default="target", help="table column of target image paths")
    p.add_argument("--caption-column", default="caption", help="table column of captions (may be absent: empty captions)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    with exit_on_config_error(PROG):
        cfg = from_dict(PairsConfig, {k: v for k, v in args.items() if v is not None})
        try:
            summary = run(cfg)
        except SourceError as e:
            raise ConfigError(str(e)) from None
    if summary["samples"] == 0:
        print(f"{PROG}: no valid pair found in {cfg.input or cfg.folder or cfg.table}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
