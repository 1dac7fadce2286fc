"""``python -m data_tools.shard``: image–caption pairs -> WebDataset image shards.

Input: a folder tree (images with same-stem ``.txt`` captions, or a caption field in a
same-stem ``.json``) or a CSV/TSV/JSONL/Parquet manifest. Output (DESIGN.md §4, laid out like
img2dataset's): ``{name}-NNNNNN.tar`` with ``KEY.{jpg|png|webp}``, ``KEY.txt``, ``KEY.json``;
``{name}-NNNNNN_stats.json`` beside each tar; ``dataset.json`` for the folder.

Shards are cut from the *input* order (shard i holds candidates i·N … i·N+N−1, minus the
skipped ones), so each shard depends only on its own slice: a rerun after an interruption
redoes exactly the missing shards and ends with the same files and counts as a clean run.

The same cut splits the work across machines (``--rank R --world-size N``, or a SLURM job array,
``launch/preprocess.sbatch``): worker R writes shards ``i % N == R`` into the one output folder,
every worker computes the same plan, and the worker that finds every shard complete when it is
done writes ``dataset.json`` (``--merge`` does that step alone; ``data_tools/split.py``).

``--dedup`` keeps the first copy of each image (by the sha256 of its bytes, recorded in ``KEY.json``;
without ``--dedup`` nothing is hashed) in input order, in two
steps so that no worker needs another's shards: while writing, a repeat within the same shard is
skipped; once every shard is complete, the step that writes ``dataset.json`` removes from each
shard the samples whose bytes an earlier shard holds (rewriting those tars, counting them as
``duplicate`` in their stats). The result depends only on the plan: one process, N workers and an
interrupted-then-resumed run give byte-identical tars.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import random
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from data_tools.images import ImageOptions, Skipped, prepare_image
from data_tools.sources import CAPTION_KEYS, Candidate, Discovery, SourceError, discover
from data_tools.split import claim, missing, progress_line, record_split, require_complete, worker_split
from pipeline.config import ConfigError, exit_on_config_error, from_dict
from pipeline.data.shards import complete_shards, shard_name, stats_path, write_json_atomic, write_tar_atomic

PROG = "data_tools.shard"
PLAN_FILE = "shard_plan.json"


@dataclass(kw_only=True)
class ShardConfig:
    """Options of ``data_tools.shard`` (the command-line flags, same names)."""

    input: Path
    output: Path
    name: str = "images"
    resolution: int = 256
    resize: Literal["center_crop", "keep_ratio", "none"] = "center_crop"
    min_size: int = 0
    max_aspect: float | None = None
    max_pixels: int = 89_478_485  # Pillow's own warning threshold
    format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 95
    samples_per_shard: int = 1000
    workers: int = 1
    seed: int | None = 0  # None keeps the input order
    dedup: bool = False
    image_column: str | None = None
    caption_column: str | None = None
    max_shards: int | None = None  # write at most this many shards in this invocation

    def __post_init__(self) -> None:
        positive = {"resolution": self.resolution, "samples_per_shard": self.samples_per_shard, "workers": self.workers}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1 (got {value})")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100 (got {self.quality})")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1 (got {self.max_aspect})")
        if self.min_size < 0 or self.max_pixels < 1:
            raise ValueError("min_size must be >= 0 and max_pixels >= 1")
        if not self.name or "." in self.name or "/" in self.name:
            raise ValueError(f"name must be non-empty without '.' or '/' (got {self.name!r})")

    def image_options(self) -> ImageOptions:
        keys = {f.name for f in fields(ImageOptions)}
        return ImageOptions(**{k: v for k, v in asdict(self).items() if k in keys})


@dataclass(frozen=True)
class SampleResult:
    """What a worker returns for one candidate: members to write, or the reason it was skipped."""

    reason: str | None = None
    members: dict[str, bytes] | None = None  # {"jpg": ..., "txt": ...}; "json" is added by the writer
    meta: dict | None = None
    sha256: str | None = None


# ---------------------------------------------------------------------------- per sample (workers)


def _printable(text: str) -> str:
    """A path or caption with undecodable bytes made JSON-safe (U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_caption(raw: object) -> str:
    if raw is None:
        raise Skipped("missing_caption")
    try:
        if isinstance(raw, bytes):
            text = raw.decode("utf-8")
        else:
            text = str(raw)
            text.encode("utf-8")  # lone surrogates = bytes that were not UTF-8
    except UnicodeError:
        raise Skipped("caption_not_utf8") from None
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise Skipped("empty_caption")
    return text


def read_caption(c: Candidate) -> tuple[str, dict | None]:
    """The candidate's caption (validated) and its sidecar JSON metadata, if any."""
    sidecar = None
    if c.json_file:
        try:
            loaded = json.loads(Path(c.json_file).read_bytes())
            sidecar = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            sidecar = None
    if c.from_manifest:
        raw = c.caption
    elif c.caption_file:
        raw = Path(c.caption_file).read_bytes()
    else:
        raw = next((sidecar[k] for k in CAPTION_KEYS if sidecar and k in sidecar), None)
    return _decode_caption(raw), sidecar


def process_candidate(candidate: Candidate, opts: ImageOptions, dedup: bool = False) -> SampleResult:
    """Read, validate and convert one pair; never raises for bad input. The image bytes are hashed
    (``sha256``, also in ``KEY.json``) only for ``dedup``, the one step that needs it."""
    try:
        caption, sidecar = read_caption(candidate)
        try:
            data = Path(candidate.image).read_bytes()
        except FileNotFoundError:
            raise Skipped("missing_file") from None
        except OSError:
            raise Skipped("unreadable_file") from None
        image = prepare_image(data, opts)
    except Skipped as e:
        return SampleResult(reason=e.reason)
    sha = hashlib.sha256(data).hexdigest() if dedup else None
    meta = {
        "source": _printable(candidate.source),
        "caption": caption,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        **({"sha256": sha} if dedup else {}),
        "status": "success",
    }
    if sidecar is not None:
        meta["meta"] = sidecar
    members = {opts.format: image.data, "txt": caption.encode("utf-8")}
    return SampleResult(members=members, meta=meta, sha256=sha)


# ---------------------------------------------------------------------------- plan and resume


def plan_fingerprint(cfg: ShardConfig, candidates: list[Candidate]) -> str:
    """Hash of everything that decides the shards' content; a resume must match it."""
    digest = hashlib.sha256()
    options = {k: v for k, v in asdict(cfg).items() if k not in ("input", "output", "workers", "max_shards")}
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for c in candidates:
        digest.update(repr(c).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_plan(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def check_plan(cfg: ShardConfig, fingerprint: str, total: int, record: bool = True) -> None:
    """Record the plan in a fresh output folder (``record``), or refuse to mix with a different one.

    Workers starting together each write the same plan, whole; each writes it before its first
    shard, so shards found without a plan were made by something else (look again first: another
    worker may have recorded the plan and written a shard since this one's first look).
    """
    path = cfg.output / PLAN_FILE
    old = _read_plan(path)
    if old is None and complete_shards(cfg.output):
        old = _read_plan(path)
        if old is None:
            raise ConfigError(f"{cfg.output} already holds shards not made by this command; choose an empty --output")
    if old is None and not record:
        raise ConfigError(f"{cfg.output} holds no shards of this command (no {PLAN_FILE}): run the workers first")
    if old is None:
        write_json_atomic(path, {"fingerprint": fingerprint, "candidates": total, "created_by": PROG})
    elif old.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{cfg.output} holds shards made from other input or options; "
            "rerun with the same command to resume, or choose an empty --output"
        )


def order_candidates(candidates: list[Candidate], seed: int | None) -> list[Candidate]:
    ordered = list(candidates)
    if seed is not None:
        random.Random(seed).shuffle(ordered)
    return ordered


def planned(cfg: ShardConfig) -> tuple[Discovery, list[Candidate], list[Path]]:
    """What discovery found, the candidates in shard order, and the tar of every planned shard;
    the same on every worker."""
    found = discover(cfg.input, cfg.image_column, cfg.caption_column)
    plan = order_candidates(found.candidates, cfg.seed)
    n_shards = math.ceil(len(plan) / cfg.samples_per_shard)
    return found, plan, [cfg.output / shard_name(cfg.name, i) for i in range(n_shards)]


# ---------------------------------------------------------------------------- writing


class ShardWriter:
    """Collects ordered results into shards: dedup within the shard, KEY.json, stats, atomic tar."""

    def __init__(self, cfg: ShardConfig) -> None:
        self.cfg = cfg

    def write(self, index: int, results: list[SampleResult], started: float) -> Counter:
        samples, failures, seen = [], Counter(), set()
        for position, result in enumerate(results):
            if result.reason is None and self.cfg.dedup and result.sha256 in seen:
                result = SampleResult(reason="duplicate")
            if result.reason is not None:
                failures[result.reason] += 1
                continue
            seen.add(result.sha256)
            key = f"{index:06d}{position:06d}"
            meta = {"key": key, **result.meta}
            samples.append((key, {**result.members, "json": json.dumps(meta, ensure_ascii=False).encode()}))
        tar_path = self.cfg.output / shard_name(self.cfg.name, index)
        stats = {
            "shard": tar_path.name,
            "count": len(results),
            "successes": len(samples),
            "failed": sum(failures.values()),
            "failures": dict(sorted(failures.items())),
            **img2dataset_counts(len(samples), failures),
            "start_time": started,
            "end_time": time.time(),
            "duration": time.time() - started,
        }
        write_json_atomic(stats_path(tar_path), stats)  # stats first: the tar is the commit mark
        write_tar_atomic(tar_path, samples)
        return failures


FETCH_FAILURES = ("missing_file", "unreadable_file", "empty_file")  # img2dataset's "failed_to_download"


def img2dataset_counts(successes: int, failures: Counter) -> dict:
    """The fields img2dataset's ``_stats.json`` readers need: ``failed_to_download`` (the source
    could not be read), ``failed_to_resize`` (every other skip: decoding, size, caption,
    duplicate) and ``status_dict``."""
    download = sum(failures[r] for r in FETCH_FAILURES)
    return {"failed_to_download": download, "failed_to_resize": sum(failures.values()) - download,
            "status_dict": {"success": successes, **dict(sorted(failures.items()))}}


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` starts workers fastest and is safe while this process runs one thread; else ``spawn``."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextmanager
def processed(tasks: list[Candidate], opts: ImageOptions, workers: int, dedup: bool = False) -> Iterator[Iterator[SampleResult]]:
    """Results of ``tasks`` in order, from ``workers`` processes (this one when workers == 1)."""
    work = partial(process_candidate, opts=opts, dedup=dedup)
    if workers == 1:
        yield map(work, tasks)
        return
    with _pool_context().Pool(workers) as pool:
        yield pool.imap(work, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


@contextmanager
def worker_map(workers: int) -> Iterator[Callable[[Callable, list], list]]:
    """``map(function, tasks) -> results`` in order, on ``workers`` processes (this one when 1); the
    pool lives as long as the context, for other per-sample tools (``data_tools.pairs``). Enter it
    before starting a progress bar (see :func:`_pool_context`)."""
    if workers == 1:
        yield lambda function, tasks: list(map(function, tasks))
        return
    with _pool_context().Pool(workers) as pool:
        yield lambda function, tasks: pool.map(function, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


def write_shard(task: tuple[int, list[Candidate]], cfg: ShardConfig) -> int:
    """One whole shard in this process, read to written (a pool worker's task); returns its inputs."""
    index, part = task
    started, opts = time.time(), cfg.image_options()
    ShardWriter(cfg).write(index, [process_candidate(c, opts, cfg.dedup) for c in part], started)
    return len(part)


def write_shards(cfg: ShardConfig, plan: list[Candidate], todo: list[int]) -> int:
    """Process the candidates of shards ``todo`` and write those shards; returns images handled.
    With at least two shards a worker, each worker writes whole shards (as img2dataset does: the
    results never cross a pipe and this process only waits); with fewer, workers share images."""
    sps = cfg.samples_per_shard
    slices = [(i, plan[i * sps : (i + 1) * sps]) for i in todo]
    tasks = [c for _, part in slices for c in part]
    if cfg.workers > 1 and len(slices) >= 2 * cfg.workers:
        with _pool_context().Pool(cfg.workers) as pool, tqdm(total=len(tasks), unit="img", desc=PROG, mininterval=0.5) as bar:
            for count in pool.imap_unordered(partial(write_shard, cfg=cfg), slices):
                bar.update(count)
        return len(tasks)
    writer = ShardWriter(cfg)
    # the pool starts before the progress bar, whose monitor thread would rule out fork
    with processed(tasks, cfg.image_options(), cfg.workers, cfg.dedup) as results, tqdm(
        total=len(tasks), unit="img", desc=PROG, mininterval=0.5
    ) as bar:
        for index, part in slices:
            started, done = time.time(), []
            for result in results:
                done.append(result)
                bar.update()
                if len(done) == len(part):
                    break
            writer.write(index, done, started)
    return len(tasks)


# ---------------------------------------------------------------------------- dedup across shards


def keyed_hashes(tar_path: Path) -> list[tuple[str, str]]:
    """``(key, sha256)`` of each sample of a finished shard, from its ``KEY.json`` members."""
    pairs = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                meta = json.load(tar.extractfile(member))
                pairs.append((meta["key"], meta["sha256"]))
    return pairs


def read_samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples ``(key, {ext: bytes})`` in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def drop_samples(tar_path: Path, keys: set[str]) -> None:
    """Rewrite a finished shard without ``keys``, counted as ``duplicate`` in its stats. The stats
    record the keys first, so a rerun after a crash between the two writes counts them once."""
    stats = json.loads(stats_path(tar_path).read_text())
    recorded = set(stats.get("duplicates_removed", []))
    new = len(keys - recorded)
    if new:
        failures = Counter(stats["failures"]) + Counter(duplicate=new)
        stats.update(successes=stats["successes"] - new, failed=stats["failed"] + new, failures=dict(sorted(failures.items())),
                     duplicates_removed=sorted(recorded | keys))
        stats.update(img2dataset_counts(stats["successes"], failures))
        write_json_atomic(stats_path(tar_path), stats)
    write_tar_atomic(tar_path, [(key, members) for key, members in read_samples(tar_path) if key not in keys])


def drop_repeats(tars: list[Path]) -> int:
    """``--dedup`` across shards, once every shard is complete: remove each sample whose image
    bytes an earlier shard holds (only tars with such samples are rewritten); returns how many.
    Idempotent, and the same whichever worker (or ``--merge``) runs it."""
    seen: set[str] = set()
    dropped = 0
    for tar_path in tars:
        pairs = keyed_hashes(tar_path)
        repeats = {key for key, sha in pairs if sha in seen}
        seen.update(sha for _, sha in pairs)
        if repeats:
            drop_samples(tar_path, repeats)
            dropped += len(repeats)
    return dropped


# ---------------------------------------------------------------------------- the folder summary


def summarize(cfg: ShardConfig, found: Discovery, n_shards: int, duration: float) -> dict:
    """dataset.json: counts over every shard's stats plus what discovery skipped."""
    skipped, samples, names, per_shard = Counter(found.skipped), 0, [], {}
    for index in range(n_shards):
        tar_path = cfg.output / shard_name(cfg.name, index)
        stats = json.loads(stats_path(tar_path).read_text())
        samples += stats["successes"]
        skipped.update(stats["failures"])
        names.append(tar_path.name)
        per_shard[tar_path.name] = stats["successes"]
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "max_shards"}
    return {
        "kind": "image_shards",
        "created_by": PROG,
        "samples": samples,
        "skipped": dict(sorted(skipped.items())),
        "warnings": dict(sorted(found.warnings.items())),
        "shards": names,
        "shard_samples": per_shard,  # the loader's sizes in one read (pipeline.data.sizes)
        "shard_pattern": f"{cfg.name}-{{000000..{max(n_shards - 1, 0):06d}}}.tar",
        "resolution": None if cfg.resize == "none" else cfg.resolution,
        "format": cfg.format,
        "options": options,
        "last_run_seconds": round(duration, 3),
    }


def summary_line(summary: dict, handled: int, duration: float) -> str:
    skipped = summary["skipped"]
    reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    return (
        f"{PROG}: wrote {summary['samples']} samples in {len(summary['shards'])} shard(s) to "
        f"{summary['options']['output']} | skipped {sum(skipped.values())} ({reasons}) | "
        f"{duration:.1f} s, {handled / max(duration, 1e-9):.1f} images/s"
    )


def run(cfg: ShardConfig, rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Shard ``cfg.input`` into ``cfg.output`` as worker ``rank`` of ``world_size`` (the shards
    ``i % world_size == rank``; each from the flags, else a SLURM array task read through the split
    recorded in the folder: ``data_tools.split.worker_split``); returns dataset.json's content when
    every shard is complete."""
    start = time.time()
    rank, world_size, workers = worker_split(cfg.output, rank, world_size, PROG)
    found, plan, tars = planned(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    check_plan(cfg, plan_fingerprint(cfg, plan), len(plan))
    record_split(cfg.output, workers)
    todo = claim(cfg.output, tars, rank, world_size)
    now = todo[: cfg.max_shards]
    handled = write_shards(cfg, plan, now)
    if len(now) < len(todo):
        whose = f" (worker {rank}/{world_size})" if world_size > 1 else ""
        print(f"{PROG}: {len(todo) - len(now)} of {len(tars)} shards remain{whose}; rerun the same command to continue")
        return None
    absent = len(missing(tars))
    if absent:
        print(progress_line(PROG, rank, world_size, len(todo), absent, len(tars)))
        return None
    return finish(cfg, found, tars, start, handled)


def finish(cfg: ShardConfig, found: Discovery, tars: list[Path], start: float, handled: int) -> dict:
    """Every shard is complete: dedup across shards (``--dedup``), then write dataset.json."""
    if cfg.dedup:
        drop_repeats(tars)
    duration = time.time() - start
    summary = summarize(cfg, found, len(tars), duration)
    write_json_atomic(cfg.output / "dataset.json", summary)
    print(summary_line(summary, handled, duration))
    return summary


def merge(cfg: ShardConfig) -> dict:
    """``--merge``: no processing; check that every planned shard is complete, then :func:`finish`."""
    start = time.time()
    found, plan, tars = planned(cfg)
    check_plan(cfg, plan_fingerprint(cfg, plan), len(plan), record=False)
    require_complete(tars, cfg.output)
    return finish(cfg, found, tars, start, 0)


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="folder of images + captions, or a .csv/.tsv/.jsonl/.parquet manifest")
    p.add_argument("--output", required=True, type=Path, help="folder for the shards (resumes if it holds this command's shards)")
    p.add_argument("--name", default="images", help="shard file prefix: NAME-000000.tar")
    p.add_argument("--resolution", type=int, default=256, help="output side in pixels (short side for keep_ratio)")
    p.add_argument("--resize", default="center_crop", choices=["center_crop", "keep_ratio", "none"])
    p.add_argument("--min-size", type=int, default=0, help="skip images whose short side is smaller (pixels)")
    p.add_argument("--max-aspect", type=float, default=None, help="skip images with long/short side above this")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="refuse larger images from the header (decompression bombs)")
    p.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality 1-100")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
    p.add_argument("--keep-order", dest="seed", action="store_const", const=None, help="keep the input order (no shuffle)")
    p.add_argument("--dedup", action="store_true", help="skip images whose bytes were already written (sha256, recorded in KEY.json)")
    p.add_argument("--image-column", default=None, help="manifest column with image paths (default: image, path, file_name, ...)")
    p.add_argument("--caption-column", default=None, help="manifest column with captions (default: caption, text, prompt)")
    p.add_argument("--max-shards", type=int, default=None, help="write at most this many shards now (rerun to continue)")
    p.add_argument("--rank", type=int, default=None, help="this worker's index (default: a SLURM array task's, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of workers, each writing shards i %% N == rank")
    p.add_argument("--merge", action="store_true", help="write dataset.json once every worker is done (no processing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    rank, world_size, merging = args.pop("rank"), args.pop("world_size"), args.pop("merge")
    with exit_on_config_error(PROG):
        cfg = from_dict(ShardConfig, args)
        try:
            summary = merge(cfg) if merging else run(cfg, rank, world_size)
        except SourceError as e:
            raise ConfigError(str(e)) from None
    if summary is not None and summary["samples"] == 0:
        print(f"{PROG}: no valid image-caption pair found in {cfg.input}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
