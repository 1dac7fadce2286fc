"""``accelerate launch -m data_tools.encode --input SHARDS --output DIR --config X.yaml``

Image shards (ours or img2dataset's) -> latent shards, once, with the frozen VAE and text
encoders (DESIGN.md §1, §4). Per sample: ``KEY.latent.npy`` (C, h, w), ``KEY.t5.npy`` (L, D)
without padding, ``KEY.clip.npy`` (D,), ``KEY.clip_tokens.npy`` when asked, ``KEY.txt``,
``KEY.json``. ``dataset.json`` records the latent shape and dtype, the VAE's scale/shift and the
encoders, so the next stage needs no flags this one knew.

Paired image shards (``data_tools.pairs``: ``KEY.src.png`` beside the target) also give
``KEY.src_latent.npy`` (C, h, w): the source through the same VAE, normalisation, resize/crop and
bucket as the target; ``dataset.json`` then names the degradations under ``"image_condition"``.
Shards without sources take the plain path unchanged.

Input shard ``i`` becomes ``latents-i.tar`` and rank ``r`` of ``N`` encodes the shards with
``i % N == r``: the result is the same set of keys for any number of processes. A shard is
committed atomically; a rerun skips finished shards. After the start the ranks never meet in a
collective: each leaves a completion file when its share is done and the main process waits for
them (``wait_timeout``, a day by default) before writing ``dataset.json``, so a rank far behind
the others trips no process-group timeout (``group_timeout``).

Aspect-ratio buckets (``--buckets BASE`` or ``buckets: BASE``; ``pipeline.data.buckets``): each image
is cropped to the bucket of about BASE² pixels nearest its aspect, its latent stored at that shape
and ``KEY.json`` names the bucket; a batch of the encoders holds one bucket; ``dataset.json`` has
the histogram.

Across machines without a process group (a SLURM job array, ``launch/preprocess.sbatch``):
``python -m data_tools.encode ... --rank R --world-size N`` (or the array task's own numbers) is one
independent worker with the same split; the worker that finds every latent shard complete when
it is done writes ``dataset.json``, and ``--merge`` does that step alone (``data_tools/split.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, exit_on_config_error, load_config, to_dict
from pipeline.config.source import Source
from pipeline.data.buckets import Bucketing, bucket_name, nearest_bucket, parse_bucket
from pipeline.data.images import SOURCE_MEMBER, decode_image_sample
from pipeline.training.distributed import array_task, create_accelerator, dist_env
from data_tools.shard import PLAN_FILE
from data_tools.split import (claim, mark_done, missing, progress_line, record_split, refuse_beside_workers, require_complete,
                              wait_for_ranks, worker_split)
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.data.paths import map_paths, relative_to
from pipeline.data.remote import SourceError, SourceNotFound, dataset_meta, is_url, list_shards, read_shard
from pipeline.data.sizes import shard_sizes
from pipeline.planning.dry_run import DryRunOptions, spread
from pipeline.data.shards import complete_shards, shard_key, shard_name, stats_path, write_json_atomic, write_tar_atomic

PROG = "data_tools.encode"
NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass(kw_only=True)
class EncodeConfig:
    """What ``data_tools.encode`` reads, runs and writes."""

    input: Source | None = None  # image-shard folder, its URL or a URL pattern (or --input; pipeline.data.remote)
    output: Path | None = None  # latent-shard folder (or --output)
    vae: VAEConfig
    text: TextEncodersConfig
    resolution: int | None = None  # None: the input's dataset.json resolution, else the images' own size
    batch_size: int = 64
    store_dtype: Literal["fp16", "fp32"] = "fp16"
    name: str = "latents"
    buckets: int | None = None  # aspect-ratio buckets of about buckets² pixels (pipeline.data.buckets); None: one square size
    bucket_table: Path | None = None  # or a YAML list of [width, height] buckets (PixArt/SDXL tables)
    bucket_step: int | None = None  # bucket sides are multiples of this; None: about buckets / 16 in whole DiT patches (VAE factor × 2)
    wait_timeout: float = 86_400.0  # seconds the main process of an accelerate launch waits for the other ranks' shards
    group_timeout: float | None = None  # seconds, the process group's (torch's 30 min when None); only the start uses it

    def __post_init__(self) -> None:
        if self.input is None or self.output is None:
            raise ValueError("input and output are required (--input DIR --output DIR)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {self.resolution})")
        if self.buckets is not None and self.buckets < 8:
            raise ValueError(f"buckets must be >= 8 pixels (got {self.buckets})")
        if (self.buckets or self.bucket_table) and self.resolution is not None:
            raise ValueError("resolution and buckets/bucket_table exclude each other: buckets set each image's size")
        if self.wait_timeout <= 0 or (self.group_timeout is not None and self.group_timeout <= 0):
            raise ValueError(f"wait_timeout and group_timeout must be > 0 seconds (got {self.wait_timeout}, {self.group_timeout})")

    def bucketing(self, vae_factor: int) -> Bucketing | None:
        """The bucket table, or None for one square size. Sides are multiples of ``bucket_step``,
        by default about ``buckets / 16`` rounded to whole 2×2 DiT patches of latents (SDXL's 64 px at
        1024 with an /8 VAE), so every bucket makes whole tokens."""
        patch = vae_factor * 2
        step = self.bucket_step or patch * max(1, round((self.buckets or 0) / 16 / patch))
        if step % vae_factor:
            raise ConfigError(f"bucket_step {step} must be a multiple of the VAE factor {vae_factor}")
        return Bucketing.build(self.buckets, self.bucket_table, step)


@dataclass
class Encoders:
    """The frozen models, built once per process."""

    vae: FrozenVAE
    text: TextEncoders
    store: type = field(default=np.float16)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def input_resolution(cfg: EncodeConfig) -> int | None:
    if cfg.resolution is not None:
        return cfg.resolution
    try:
        return dataset_meta(cfg.input).get("resolution")
    except SourceNotFound:  # img2dataset's folders have no dataset.json
        return None


def input_shards(cfg: EncodeConfig) -> list[Path | str]:
    """The input image shards: a local folder's complete ones, or those a URL or pattern names."""
    if not is_url(cfg.input):
        return complete_shards(cfg.input)
    try:
        return list_shards(cfg.input)
    except ValueError as err:
        raise ConfigError(f"input: {err}") from None


def batches(shard: Path, size: int, resolution: int | None, bucketing: Bucketing | None, skipped: Counter) -> Iterator[list[dict]]:
    """Decoded samples of one image shard in batches of one image size; undecodable ones are
    counted and dropped. A size's batch is yielded when full, the partial ones at the end."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    keys: set[str] = set()
    for raw in read_shard(shard):  # strict: a shard cut short raises SourceError, and nothing of it is committed
        key = shard_key(raw["__key__"])  # part1/000001 (a tar of folders) -> part1__000001
        if key in keys:
            skipped["duplicate_key"] += 1
            continue
        keys.add(key)
        sample = decode_image_sample(raw, resolution, bucketing.assign if bucketing else None)
        if sample is None:
            skipped["undecodable_image"] += 1  # also a decompression bomb (over 2× PIL's MAX_IMAGE_PIXELS)
            continue
        sample["key"] = key
        if not sample["caption"].strip():
            skipped["empty_caption"] += 1
            continue
        if SOURCE_MEMBER in raw and not attach_source(sample, raw[SOURCE_MEMBER], resolution, bucketing):
            skipped["unusable_source"] += 1  # undecodable, or not at the target's size
            continue
        sample["json"] = sample_json(raw.get("json", b"{}"), sample["image"].shape, bucketing)
        group_key = (tuple(sample["image"].shape), "source" in sample)  # a batch is all pairs or all plain
        group = pending.setdefault(group_key, [])
        group.append(sample)
        if len(group) == size:
            yield pending.pop(group_key)
    yield from pending.values()  # first-seen order: deterministic


def attach_source(sample: dict, data: bytes, resolution: int | None, bucketing: Bucketing | None) -> bool:
    """Decode a pair's source image with the target's resize/crop (a bucket is chosen by aspect, and
    the source has the target's size) into ``sample["source"]``; False when unusable."""
    source = decode_image_sample({"png": data, "__key__": sample["key"]}, resolution, bucketing.assign if bucketing else None)
    if source is None or source["image"].shape != sample["image"].shape:
        return False
    sample["source"] = source["image"]  # (3, H, W)
    return True


def sample_json(source: bytes, shape: torch.Size, bucketing: Bucketing | None) -> bytes:
    """The image shard's ``KEY.json``, plus ``"bucket": "WxH"`` when bucketing (else unchanged)."""
    if bucketing is None:
        return source
    meta = json.loads(source or b"{}")
    meta["bucket"] = bucket_name((shape[2], shape[1]))
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


@torch.no_grad()
def encode_batch(samples: list[dict], encoders: Encoders, device: torch.device) -> list[tuple[str, dict[str, bytes]]]:
    """One batch of decoded images + captions -> tar members (text unpadded)."""
    images = torch.stack([s["image"] for s in samples]).to(device)  # (B, 3, H, W)
    latents = encoders.vae.encode(images).cpu().numpy()  # (B, C, h, w)
    sources = None  # (B, C, h, w) for a batch of pairs
    if "source" in samples[0]:
        sources = encoders.vae.encode(torch.stack([s["source"] for s in samples]).to(device)).cpu().numpy()
    text = {k: v.cpu() for k, v in encoders.text.encode([s["caption"] for s in samples]).items()}
    out = []
    for i, s in enumerate(samples):
        members = {"latent.npy": npy_bytes(latents[i].astype(encoders.store)), "txt": s["caption"].encode(), "json": s["json"]}
        for name in ("t5", "clip_tokens"):
            if name in text:
                real = text[f"{name}_mask"][i]  # (L,) bool
                members[f"{name}.npy"] = npy_bytes(text[name][i][real].numpy().astype(encoders.store))  # (L_i, D)
        if sources is not None:
            members["src_latent.npy"] = npy_bytes(sources[i].astype(encoders.store))  # (C, h, w)
        if "clip" in text:
            members["clip.npy"] = npy_bytes(text["clip"][i].numpy().astype(encoders.store))
        out.append((s["key"], members))
    return out


def encode_shard(src: Path, dst: Path, cfg: EncodeConfig, encoders: Encoders, device: torch.device, bar: tqdm) -> dict:
    """Encode one image shard into ``dst`` atomically; returns its stats."""
    start, skipped, written, sizes = time.time(), Counter(), [], Counter()
    bucketing = cfg.bucketing(encoders.vae.downsample)
    for samples in batches(src, cfg.batch_size, None if bucketing else input_resolution(cfg), bucketing, skipped):
        written += encode_batch(samples, encoders, device)
        sizes[bucket_name((samples[0]["image"].shape[2], samples[0]["image"].shape[1]))] += len(samples)
        bar.update(len(samples))
    stats = {
        "shard": dst.name,
        "source": Path(src).name,  # src may be a URL
        "count": len(written) + sum(skipped.values()),
        "successes": len(written),
        "failed": sum(skipped.values()),
        "failures": dict(sorted(skipped.items())),
        "buckets": dict(sorted(sizes.items())),  # image size "WxH" -> samples
        "duration": time.time() - start,
    }
    write_json_atomic(stats_path(dst), stats)
    write_tar_atomic(dst, written)
    return stats


def describe(cfg: EncodeConfig, encoders: Encoders, shards: list[Path]) -> dict:
    """dataset.json of the latent folder, from every shard's stats and the encoders."""
    samples, skipped, sizes, per_shard = 0, Counter(), Counter(), {}
    for shard in shards:
        stats = json.loads(stats_path(shard).read_text())
        samples += stats["successes"]
        per_shard[shard.name] = stats["successes"]
        skipped.update(stats["failures"])
        sizes.update(stats.get("buckets", {}))
    resolution, down, channels = input_resolution(cfg), encoders.vae.downsample, encoders.vae.latent_channels
    bucketing = cfg.bucketing(down)
    if bucketing is not None:  # the model's default (square) size: the table's bucket nearest 1:1
        resolution = nearest_bucket(1, 1, list(bucketing.table))[0]
    latent_shape = [channels, resolution // down, resolution // down] if resolution else None
    if latent_shape is None and sizes:  # no resolution known (img2dataset's folders): the most common size encoded
        latent_shape = bucket_histogram(Counter(dict(sizes.most_common(1))), channels, down).popitem()[1]["latent_shape"]
    several = bucketing is not None or len(sizes) > 1  # images kept at several sizes are buckets too
    summary = {
        "kind": "latent_shards",
        "created_by": PROG,
        "input": str(cfg.input),
        "samples": samples,
        "skipped": dict(sorted(skipped.items())),
        "shards": [s.name for s in shards],
        "shard_samples": per_shard,  # the loader's sizes in one read (pipeline.data.sizes)
        "resolution": resolution,
        "latent_shape": latent_shape,
        "latent_dtype": cfg.store_dtype,
        "buckets": bucket_histogram(sizes, channels, down) if several else None,
        "vae": encoders.vae.describe(),
        "text_encoders": encoders.text.describe(),
        "config": to_dict(cfg),
    }
    pairs = input_pairs(cfg)
    if pairs is not None:
        summary["image_condition"] = {"degradations": list(pairs.get("degradations", []))}
    return map_paths(summary, relative_to(cfg.output))  # local paths relative to the folder


def input_pairs(cfg: EncodeConfig) -> dict | None:
    """The input's ``"pairs"`` entry (paired image shards, ``data_tools.pairs``), else None."""
    try:
        return dataset_meta(cfg.input).get("pairs")
    except SourceNotFound:  # img2dataset's folders have no dataset.json
        return None


def bucket_histogram(sizes: Counter, channels: int, down: int) -> dict:
    """``{"WxH": {"samples": n, "latent_shape": [C, h, w]}}``, portrait to landscape."""
    ordered = sorted(sizes, key=lambda name: (parse_bucket(name)[0] / parse_bucket(name)[1], name))
    return {name: {"samples": sizes[name], "latent_shape": [channels, parse_bucket(name)[1] // down, parse_bucket(name)[0] // down]}
            for name in ordered}


def run(cfg: EncodeConfig) -> dict | None:
    """One launch of N processes (``accelerate launch``, or one plain process): rank ``r`` encodes
    the shards ``i % N == r``; the main process writes dataset.json once every rank is done."""
    refuse_beside_workers(cfg.output, "a launch without --rank/--world-size")
    accelerator = create_accelerator(timeout=timedelta(seconds=cfg.group_timeout) if cfg.group_timeout else None)
    try:
        return encode(cfg, accelerator)
    finally:  # no barrier: the main process knows from the ranks' completion files that they are done
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def encode(cfg: EncodeConfig, accelerator) -> dict | None:
    """:func:`run` on a given ``Accelerator``. The one collective is at the start (the launch's id);
    then each rank removes only its own shards' temporaries, encodes them and leaves a completion
    file, and the main process waits for the others' files (``cfg.wait_timeout``), not at a barrier:
    a rank hours behind the rest (a rerun after a crash, slow remote reads) trips no process-group
    timeout (``data_tools.split.wait_for_ranks``)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    launch = launch_id(accelerator)
    sources, targets = shard_pairs(cfg)
    mine = claim(cfg.output, targets, rank, world)
    encoders = build_encoders(cfg, accelerator.device) if mine or accelerator.is_main_process else None
    encode_shards(cfg, [(sources[i], targets[i]) for i in mine], encoders, accelerator.device, rank, world)
    if not accelerator.is_main_process:
        mark_done(cfg.output, rank, launch)
        return None
    wait_for_ranks(cfg.output, world, launch, cfg.wait_timeout, PROG)
    require_read(targets)
    return write_summary(cfg, encoders, targets)


def launch_id(accelerator) -> str:
    """An id of this launch, the same on every rank, so completion files of an earlier launch never
    count. Broadcast right after the process group is made, while every rank is there, over a gloo
    group: on GPUs no NCCL communicator is ever made, so a rank that is done tears its process group
    down at once instead of waiting there for the slowest rank."""
    ids = [uuid.uuid4().hex if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(ids, src=0, group=torch.distributed.new_group(backend="gloo"))
    return ids[0]


def require_read(targets: list[Path]) -> None:
    """After every shard was tried: the ones whose input could not be read, as one line (exit 2)."""
    absent = missing(targets)
    if absent:
        raise SourceError(f"{len(absent)} latent shard(s) not written (first: {absent[0].name}): their input could not be read; "
                          "rerun the same command to encode just those")


def encode_worker(cfg: EncodeConfig, rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Independent worker ``rank`` of ``world_size`` (each from the flags, else a SLURM array task read
    through the split recorded in the output folder: ``data_tools.split.worker_split``; no process
    group, no waiting): encodes input shards ``i % world_size == rank`` on this machine's GPU (else
    the CPU). The worker that finds every latent shard complete when it is done writes dataset.json."""
    launch = dist_env()
    if launch.launcher == "torchrun" and launch.world_size > 1:  # its processes would all do this worker's share
        raise ConfigError(f"an independent worker (--rank/--world-size, a SLURM array task) is one process, but this launch "
                          f"started {launch.world_size}: start one process per worker, or drop --rank/--world-size")
    rank, world_size, workers = worker_split(cfg.output, rank, world_size, PROG)
    sources, targets = shard_pairs(cfg)
    record_split(cfg.output, workers)
    todo = claim(cfg.output, targets, rank, world_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = build_encoders(cfg, device) if todo else None
    encode_shards(cfg, [(sources[i], targets[i]) for i in todo], encoders, device, rank, world_size, position=0)
    require_read([targets[i] for i in todo])
    absent = len(missing(targets))
    if absent:
        print(progress_line(PROG, rank, world_size, len(todo), absent, len(targets)))
        return None
    return write_summary(cfg, encoders or build_encoders(cfg, device), targets)


def merge(cfg: EncodeConfig) -> dict:
    """``--merge``: no encoding; once every latent shard is complete, write dataset.json (the
    encoders are loaded, on this machine's GPU else the CPU, for what it records about them)."""
    sources, targets = shard_pairs(cfg)
    require_complete(targets, cfg.output)
    return write_summary(cfg, build_encoders(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu")), targets)


def shard_pairs(cfg: EncodeConfig) -> tuple[list[Path], list[Path]]:
    """The input image shards and the latent shard each becomes (input shard ``i`` -> ``latents-i``).

    Shards are numbered by their place in the input folder, so every process must see the same
    list: an image folder that ``data_tools.shard`` has not finished (a plan without dataset.json,
    or a dataset.json naming shards that are not there) is refused, with one line.
    """
    sources = input_shards(cfg)
    if not sources:
        raise ConfigError(f"no image shards in {cfg.input}")
    if not is_url(cfg.input):  # a URL names finished shards only: its dataset.json's list, or a pattern
        meta = cfg.input / "dataset.json"
        listed = json.loads(meta.read_text()).get("shards", []) if meta.exists() else []
        absent = sorted(set(listed) - {s.name for s in sources})
        if absent or ((cfg.input / PLAN_FILE).exists() and not meta.exists()):
            what = f"{len(absent)} shard(s) its dataset.json lists are missing" if absent else "no dataset.json yet"
            raise ConfigError(f"the image shards in {cfg.input} are not finished ({what}): let every data_tools.shard worker "
                              "finish, or run it with --merge, before encoding")
    cfg.output.mkdir(parents=True, exist_ok=True)
    return sources, [cfg.output / shard_name(cfg.name, i) for i in range(len(sources))]


def build_encoders(cfg: EncodeConfig, device: torch.device) -> Encoders:
    """The frozen VAE and text encoders on ``device``, storing in ``cfg.store_dtype``."""
    return Encoders(FrozenVAE(cfg.vae, device), TextEncoders(cfg.text, device), NUMPY_DTYPES[cfg.store_dtype])


def encode_shards(cfg: EncodeConfig, pairs: list[tuple[Path, Path]], encoders: Encoders | None, device: torch.device,
                  rank: int, world_size: int, position: int | None = None) -> None:
    """Encode each ``(image shard, latent shard)`` pair, with a progress bar and a rate line. An input
    shard that cannot be read to its end (after the reader's retries) leaves its latent shard
    unwritten, with one warning line, and the others go on: a rerun encodes just the missing ones."""
    start, done, unreadable = time.time(), 0, 0
    with tqdm(desc=f"{PROG} rank {rank}", unit="img", position=rank if position is None else position, mininterval=0.5) as bar:
        for src, dst in pairs:
            try:
                done += encode_shard(src, dst, cfg, encoders, device, bar)["count"]
            except SourceError as err:
                unreadable += 1
                print(f"{PROG}: warning: {dst.name} not written: {err}", file=sys.stderr, flush=True)
    rate = done / max(time.time() - start, 1e-9)
    print(f"{PROG}: rank {rank}/{world_size} encoded {len(pairs) - unreadable} shard(s), {done} samples, {rate:.1f} samples/s")


def write_summary(cfg: EncodeConfig, encoders: Encoders, targets: list[Path]) -> dict:
    """Write dataset.json (:func:`describe`; whole, as any worker may) and say what the folder holds."""
    summary = describe(cfg, encoders, targets)
    write_json_atomic(cfg.output / "dataset.json", summary)
    skipped = summary["skipped"] or "none"
    print(f"{PROG}: {summary['samples']} samples in {len(targets)} latent shard(s) at {cfg.output}, skipped {skipped}")
    return summary


def plan(cfg: EncodeConfig, options: DryRunOptions, out: TextIO | None = None) -> int:
    """``--dry-run``: the encoding job's split, input shard ``i`` -> latent shard ``i``, encoded by
    rank ``i mod N``; no encoder is built and no image decoded."""
    out, prog = out or sys.stdout, PROG
    env = dist_env()
    world = options.world_size or env.world_size
    if options.world_size is None and not env.is_main:
        return 0
    try:
        sources = input_shards(cfg)
    except ConfigError as err:  # a URL whose shard listing cannot be read
        print(f"{prog}: dry run: {err}", file=sys.stderr)
        return 1
    if not sources:
        print(f"{prog}: dry run: no image shards in {cfg.input}", file=sys.stderr)
        return 1
    sizes = shard_sizes([str(s) for s in sources])
    todo = [i for i in range(len(sources)) if not (Path(cfg.output) / shard_name(cfg.name, i)).exists()]
    per_rank = [[i for i in todo if i % world == r] for r in range(world)]
    resolution = input_resolution(cfg)
    lines = [f"{prog} dry run (no encoder built, no image decoded)"]
    kv = lambda k, v: lines.append(f"  {k:<24}{v}")  # noqa: E731
    kv("world size", f"{world} ({f'--world-size {world}' if options.world_size else f'launcher: {env.launcher}'})")
    kv("batch size", f"{cfg.batch_size} images per process per forward")
    kv("input", f"{cfg.input}: {len(sources)} shards, {sum(sizes):,} samples")
    kv("output", f"{cfg.output}: {len(sources) - len(todo)} shard(s) done, {len(todo)} to encode")
    kv("shards per rank", spread([len(s) for s in per_rank]))
    kv("samples per rank", spread([sum(sizes[i] for i in s) for s in per_rank]))
    kv("latent shape", _latent_shape(cfg, resolution))
    kv("encoders", f"VAE {cfg.vae.path}; " + "; ".join(f"{k} {v}" for k, v in _text_sources(cfg).items()))
    for line in lines:
        print(line, file=out)
    idle = sum(1 for s in per_rank if not s)
    if idle:
        print(f"{prog}: warning: {idle} of {world} ranks have no shard to encode (they wait for the others)", file=sys.stderr)
    return 0


def _latent_shape(cfg, resolution: int | None) -> str:
    """From the VAE's local config.json (channels, 2^(levels-1) downsampling); unknown for hub ids."""
    folder = Path(cfg.vae.path) / (cfg.vae.subfolder or "")
    if not (folder / "config.json").exists() or resolution is None:
        return f"unknown (resolution {resolution}; VAE config not local)"
    vae: dict[str, Any] = json.loads((folder / "config.json").read_text())
    down = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return f"[{vae.get('latent_channels', 4)}, {resolution // down}, {resolution // down}] (resolution {resolution}, VAE /{down})"


def _text_sources(cfg) -> dict[str, str]:
    text, found = cfg.text, {}
    if text.t5 is not None:
        found["T5"] = f"{text.t5.path} (max_length {text.t5.max_length})"
    if text.clip is not None:
        found["CLIP"] = str(text.clip.path or text.clip.model)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="image-shard folder, its URL, or a shard URL pattern (…/images-{000000..000099}.tar)")
    p.add_argument("--output", type=Path, help="latent-shard folder (resumes when rerun)")
    p.add_argument("--config", type=Path, help="YAML with vae:, text:, batch_size, ...")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--dry-run", action="store_true", help="print each rank's share of the shards and exit")
    p.add_argument("--world-size", type=int, help="N independent workers, this one encoding shards i %% N == --rank (no "
                   "process group); with --dry-run: plan for N processes (default: this launch's)")
    p.add_argument("--rank", type=int, help="this independent worker's index (default: a SLURM array task's)")
    p.add_argument("--merge", action="store_true", help="write dataset.json once every worker is done (no encoding)")
    p.add_argument("--buckets", type=int, metavar="BASE", help="aspect-ratio buckets of about BASE² pixels (= buckets=BASE)")
    args = p.parse_args(argv)
    given = (("input", args.input), ("output", args.output), ("buckets", args.buckets))
    paths = [f"{k}={v}" for k, v in given if v is not None]
    with exit_on_config_error(PROG):
        cfg = load_config(EncodeConfig, args.config, [*args.overrides, *paths])
    if args.dry_run:
        return plan(cfg, DryRunOptions(args.world_size))
    try:
        with exit_on_config_error(PROG):
            if args.merge:
                merge(cfg)
            elif args.rank is not None or args.world_size is not None or array_task() is not None:
                encode_worker(cfg, args.rank, args.world_size)
            else:
                run(cfg)  # one accelerate launch: its processes split the shards, the main one waits for the others
    except (SourceError, TimeoutError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
