"""``accelerate launch -m data_tools.encode --input SHARDS --output DIR --config X.yaml``

Image shards (ours or img2dataset's) -> latent shards, once, with the frozen VAE and text
encoders (DESIGN.md §1, §4). Per sample: ``KEY.latent.npy`` (C, h, w), ``KEY.t5.npy`` (L, D)
without padding, ``KEY.clip.npy`` (D,), ``KEY.clip_tokens.npy`` when asked, ``KEY.txt``,
``KEY.json``. ``dataset.json`` records the latent shape and dtype, the VAE's scale/shift and the
encoders, so the next stage needs no flags this one knew.

Input shard ``i`` becomes ``latents-i.tar`` and rank ``r`` of ``N`` encodes the shards with
``i % N == r``: the result is the same set of keys for any number of processes. A shard is
committed atomically; a rerun skips finished shards.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, exit_on_config_error, load_config, to_dict
from pipeline.data.images import decode_image_sample
from pipeline.training.distributed import create_accelerator, dist_env, shutdown
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.data.paths import map_paths, relative_to
from pipeline.data.stream import shard_sizes
from pipeline.planning.dry_run import DryRunOptions, spread
from pipeline.data.shards import complete_shards, iter_samples, remove_partials, shard_name, stats_path, write_json_atomic, write_tar_atomic

PROG = "data_tools.encode"
NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass(kw_only=True)
class EncodeConfig:
    """What ``data_tools.encode`` reads, runs and writes."""

    input: Path | None = None  # image-shard folder (or --input)
    output: Path | None = None  # latent-shard folder (or --output)
    vae: VAEConfig
    text: TextEncodersConfig
    resolution: int | None = None  # None: the input's dataset.json resolution, else the images' own size
    batch_size: int = 64
    store_dtype: Literal["fp16", "fp32"] = "fp16"
    name: str = "latents"

    def __post_init__(self) -> None:
        if self.input is None or self.output is None:
            raise ValueError("input and output are required (--input DIR --output DIR)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {self.resolution})")


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
    meta = cfg.input / "dataset.json"
    return json.loads(meta.read_text()).get("resolution") if meta.exists() else None


def batches(shard: Path, size: int, resolution: int | None, skipped: Counter) -> Iterator[list[dict]]:
    """Decoded samples of one image shard in batches; undecodable ones are counted and dropped."""
    pending = []
    for raw in iter_samples([shard]):
        sample = decode_image_sample(raw, resolution)
        if sample is None:
            skipped["undecodable_image"] += 1
            continue
        if not sample["caption"].strip():
            skipped["empty_caption"] += 1
            continue
        sample["json"] = raw.get("json", b"{}")
        pending.append(sample)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


@torch.no_grad()
def encode_batch(samples: list[dict], encoders: Encoders, device: torch.device) -> list[tuple[str, dict[str, bytes]]]:
    """One batch of decoded images + captions -> tar members (text unpadded)."""
    images = torch.stack([s["image"] for s in samples]).to(device)  # (B, 3, H, W)
    latents = encoders.vae.encode(images).cpu().numpy()  # (B, C, h, w)
    text = {k: v.cpu() for k, v in encoders.text.encode([s["caption"] for s in samples]).items()}
    out = []
    for i, s in enumerate(samples):
        members = {"latent.npy": npy_bytes(latents[i].astype(encoders.store)), "txt": s["caption"].encode(), "json": s["json"]}
        for name in ("t5", "clip_tokens"):
            if name in text:
                real = text[f"{name}_mask"][i]  # (L,) bool
                members[f"{name}.npy"] = npy_bytes(text[name][i][real].numpy().astype(encoders.store))  # (L_i, D)
        if "clip" in text:
            members["clip.npy"] = npy_bytes(text["clip"][i].numpy().astype(encoders.store))
        out.append((s["key"], members))
    return out


def encode_shard(src: Path, dst: Path, cfg: EncodeConfig, encoders: Encoders, device: torch.device, bar: tqdm) -> dict:
    """Encode one image shard into ``dst`` atomically; returns its stats."""
    start, skipped, written = time.time(), Counter(), []
    for samples in batches(src, cfg.batch_size, input_resolution(cfg), skipped):
        written += encode_batch(samples, encoders, device)
        bar.update(len(samples))
    stats = {
        "shard": dst.name,
        "source": src.name,
        "count": len(written) + sum(skipped.values()),
        "successes": len(written),
        "failed": sum(skipped.values()),
        "failures": dict(sorted(skipped.items())),
        "duration": time.time() - start,
    }
    write_json_atomic(stats_path(dst), stats)
    write_tar_atomic(dst, written)
    return stats


def describe(cfg: EncodeConfig, encoders: Encoders, shards: list[Path]) -> dict:
    """dataset.json of the latent folder, from every shard's stats and the encoders."""
    samples, skipped = 0, Counter()
    for shard in shards:
        stats = json.loads(stats_path(shard).read_text())
        samples += stats["successes"]
        skipped.update(stats["failures"])
    resolution = input_resolution(cfg)
    down = encoders.vae.downsample
    summary = {
        "kind": "latent_shards",
        "created_by": PROG,
        "input": str(cfg.input),
        "samples": samples,
        "skipped": dict(sorted(skipped.items())),
        "shards": [s.name for s in shards],
        "resolution": resolution,
        "latent_shape": [encoders.vae.latent_channels, resolution // down, resolution // down] if resolution else None,
        "latent_dtype": cfg.store_dtype,
        "vae": encoders.vae.describe(),
        "text_encoders": encoders.text.describe(),
        "config": to_dict(cfg),
    }
    return map_paths(summary, relative_to(cfg.output))  # local paths relative to the folder


def run(cfg: EncodeConfig) -> dict | None:
    """Encode this rank's share of the shards; the main process writes dataset.json."""
    accelerator = create_accelerator()
    try:
        return encode(cfg, accelerator)
    finally:
        shutdown(accelerator)


def encode(cfg: EncodeConfig, accelerator) -> dict | None:
    """:func:`run` on a given ``Accelerator`` (left running)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    sources = complete_shards(cfg.input)
    if not sources:
        raise ConfigError(f"no image shards in {cfg.input}")
    cfg.output.mkdir(parents=True, exist_ok=True)
    targets = [cfg.output / shard_name(cfg.name, i) for i in range(len(sources))]
    if accelerator.is_main_process:
        remove_partials(cfg.output)
    accelerator.wait_for_everyone()
    mine = [i for i in range(len(sources)) if i % world == rank and not targets[i].exists()]
    encoders = Encoders(FrozenVAE(cfg.vae, accelerator.device), TextEncoders(cfg.text, accelerator.device), NUMPY_DTYPES[cfg.store_dtype])
    start, done = time.time(), 0
    with tqdm(desc=f"{PROG} rank {rank}", unit="img", position=rank, mininterval=0.5) as bar:
        for i in mine:
            done += encode_shard(sources[i], targets[i], cfg, encoders, accelerator.device, bar)["count"]
    rate = done / max(time.time() - start, 1e-9)
    print(f"{PROG}: rank {rank}/{world} encoded {len(mine)} shard(s), {done} samples, {rate:.1f} samples/s")
    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
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
    sources = complete_shards(cfg.input)
    if not sources:
        print(f"{prog}: dry run: no image shards in {cfg.input}", file=sys.stderr)
        return 1
    sizes = shard_sizes([str(s) for s in sources])
    todo = [i for i in range(len(sources)) if not (Path(cfg.output) / shard_name(cfg.name, i)).exists()]
    per_rank = [[i for i in todo if i % world == r] for r in range(world)]
    meta_path = Path(cfg.input) / "dataset.json"
    resolution = cfg.resolution or (json.loads(meta_path.read_text()).get("resolution") if meta_path.exists() else None)
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
    p.add_argument("--input", type=Path, help="image-shard folder")
    p.add_argument("--output", type=Path, help="latent-shard folder (resumes when rerun)")
    p.add_argument("--config", type=Path, help="YAML with vae:, text:, batch_size, ...")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--dry-run", action="store_true", help="print each rank's share of the shards and exit")
    p.add_argument("--world-size", type=int, help="with --dry-run: plan for N processes (default: this launch's)")
    args = p.parse_args(argv)
    paths = [f"{k}={v}" for k, v in (("input", args.input), ("output", args.output)) if v is not None]
    with exit_on_config_error(PROG):
        cfg = load_config(EncodeConfig, args.config, [*args.overrides, *paths])
    if args.dry_run:
        return plan(cfg, DryRunOptions(args.world_size))
    with exit_on_config_error(PROG):
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
