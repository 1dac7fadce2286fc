"""A deterministic, resumable, distributed batch stream over WebDataset shards.

How samples are ordered (everything follows from ``seed``, so a run can stop and resume):

- Epoch ``e`` permutes the shards with ``rng(seed, e)`` and cuts the order into *groups* of
  ``shards_per_group`` shards. There are ``G = world_size × max(1, num_workers)`` *streams*;
  stream ``g = rank × W + w`` reads groups ``g, g + G, g + 2G, …`` of every epoch, so ranks and
  workers see disjoint data. Within a group the samples are permuted with ``rng(seed, e, group)``.
- Each stream is endless (epoch after epoch) and batches its own samples, so every rank yields
  batches forever and no rank runs out before another (a hang under DDP).
- With fewer groups than streams, ``on_too_few_shards="error"`` stops with a clear message;
  ``"resample"`` lets each stream draw groups with replacement from ``rng(seed, e, g)``.

Resume: each batch carries its stream and the stream's raw-sample offset after it. The loader
records, per stream, where the last consumed batch ended, plus the number of batches consumed;
a restored loader seeks each stream to its offset (arithmetic over the shard sizes: no
re-reading) and rotates the DataLoader's round-robin so the next batches are the ones an
uninterrupted run would have produced. Exact when ``num_workers`` and ``world_size`` match.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shards import iter_samples, stats_path

Decode = Callable[[dict], dict | None]  # raw tar sample (bytes by extension) -> sample, or None to skip
Collate = Callable[[list[dict]], dict]  # samples -> batch


@dataclass(kw_only=True)
class LoaderConfig:
    """How a stage reads its shards."""

    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    shards_per_group: int = 1  # samples of this many shards are shuffled together
    on_too_few_shards: Literal["error", "resample"] = "error"
    prefetch_factor: int = 4

    def __post_init__(self) -> None:
        for key in ("batch_size", "shards_per_group", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (got {self.num_workers})")


def shard_sizes(shards: list[str]) -> list[int]:
    """Samples per shard, from ``*_stats.json`` when present, else by listing the tar."""
    sizes = []
    for shard in shards:
        stats = stats_path(Path(shard))
        if stats.exists():
            sizes.append(int(json.loads(stats.read_text())["successes"]))
            continue
        with tarfile.open(shard) as tar:
            sizes.append(len({m.name.split(".", 1)[0] for m in tar if m.isfile()}))
    return sizes


class StreamSchedule:
    """The group schedule shared by every stream (pure arithmetic, no I/O)."""

    def __init__(self, shards: list[str], sizes: list[int], cfg: LoaderConfig, n_streams: int) -> None:
        self.shards, self.sizes, self.cfg, self.n_streams = shards, sizes, cfg, n_streams
        self.n_groups = -(-len(shards) // cfg.shards_per_group)
        if self.n_groups < n_streams and cfg.on_too_few_shards == "error":
            raise ValueError(
                f"{len(shards)} shards make {self.n_groups} group(s) of {cfg.shards_per_group}, fewer than the "
                f"{n_streams} streams (world size × data workers): write more shards, lower num_workers or "
                "shards_per_group, or set on_too_few_shards=resample"
            )

    def groups(self, epoch: int, stream: int) -> list[list[int]]:
        """Shard indices of each group this stream reads in ``epoch``."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.shards))
        k = self.cfg.shards_per_group
        all_groups = [order[i : i + k].tolist() for i in range(0, len(order), k)]
        if self.n_groups >= self.n_streams:
            return all_groups[stream :: self.n_streams]
        rng = np.random.default_rng([self.cfg.seed, epoch, stream, 1])
        return [all_groups[i] for i in rng.integers(0, len(all_groups), max(1, self.n_groups))]

    def seek(self, stream: int, offset: int) -> tuple[int, int, int]:
        """Raw-sample ``offset`` of a stream -> (epoch, group position in epoch, offset in group)."""
        epoch = 0
        while True:
            groups = self.groups(epoch, stream)
            sizes = [sum(self.sizes[i] for i in g) for g in groups]
            if sum(sizes) == 0:
                raise ValueError("the shards hold no samples")
            for position, size in enumerate(sizes):
                if offset < size:
                    return epoch, position, offset
                offset -= size
            epoch += 1


class ShardStream(IterableDataset):
    """Yields ``(stream, end_offset, batch)``; one stream per data worker."""

    def __init__(self, schedule: StreamSchedule, decode: Decode, collate: Collate, rank: int, start: dict) -> None:
        self.schedule, self.decode, self.collate, self.rank = schedule, decode, collate, rank
        self.start = start  # {"offsets": {stream: raw offset}, "rotation": int}

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = get_worker_info()
        workers = max(1, info.num_workers if info else 1)
        local = ((info.id if info else 0) + self.start["rotation"]) % workers
        stream = self.rank * workers + local
        yield from self._batches(stream, int(self.start["offsets"].get(str(stream), 0)))

    def _batches(self, stream: int, offset: int) -> Iterator[tuple[int, int, dict]]:
        epoch, position, skip = self.schedule.seek(stream, offset)
        pending: list[dict] = []
        while True:
            groups = self.schedule.groups(epoch, stream)
            for group_index in range(position, len(groups)):
                group = groups[group_index]
                raw = list(iter_samples(self.schedule.shards[i] for i in group))
                gid = stream + group_index * self.schedule.n_streams
                order = np.random.default_rng([self.schedule.cfg.seed, epoch, gid]).permutation(len(raw))
                for i in order[skip:]:
                    offset += 1
                    sample = self.decode(raw[i])
                    if sample is not None:
                        pending.append(sample)
                    if len(pending) == self.schedule.cfg.batch_size:
                        yield stream, offset, self.collate(pending)
                        pending = []
                skip = 0
            epoch, position = epoch + 1, 0


class ShardLoader:
    """Endless batches from a ``ShardStream`` through a ``DataLoader``, with exact resume."""

    def __init__(self, shards: list[str], cfg: LoaderConfig, decode: Decode, collate: Collate, rank: int = 0, world_size: int = 1) -> None:
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.cfg, self.decode, self.collate = list(shards), cfg, decode, collate
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.schedule = StreamSchedule(self.shards, shard_sizes(self.shards), cfg, world_size * self.workers)
        self.batches = 0  # consumed by this rank
        self.offsets: dict[str, int] = {}  # stream -> raw samples consumed

    def __iter__(self) -> Iterator[dict]:
        start = {"offsets": dict(self.offsets), "rotation": self.batches % self.workers}
        dataset = ShardStream(self.schedule, self.decode, self.collate, self.rank, start)
        extra = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False} if self.cfg.num_workers else {}
        # its own generator: creating the iterator must not draw from the global RNG (exact resume)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, generator=generator, **extra)
        for stream, offset, batch in loader:
            self.offsets[str(stream)] = int(offset)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready data position (exact for the same world size and num_workers)."""
        return {
            "batches": self.batches,
            "offsets": dict(self.offsets),
            "num_workers": self.cfg.num_workers,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
            "samples_seen": self.batches * self.cfg.batch_size,
            "epoch": self.epoch(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_workers", "world_size", "seed"):
            mine = getattr(self.cfg, key, None) if key != "world_size" else self.world_size
            if state.get(key) != mine:
                raise ValueError(f"data position was saved with {key}={state.get(key)}, this run has {mine}: resume would not be exact")
        self.batches, self.offsets = int(state["batches"]), {str(k): int(v) for k, v in state["offsets"].items()}

    def epoch(self) -> int:
        """The oldest epoch any of this rank's streams is in (for logging)."""
        streams = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        return min(self.schedule.seek(s, self.offsets.get(str(s), 0))[0] for s in streams)


def npy(data: bytes) -> np.ndarray:
    """Decode a ``.npy`` member."""
    return np.load(io.BytesIO(data), allow_pickle=False)
