"""A deterministic, resumable, distributed batch stream over WebDataset shards, read as a stream.

How samples are ordered (everything follows from ``seed``, so a run can stop and resume):

- Epoch ``e`` permutes the shards with ``rng(seed, e)`` and cuts the order into *groups* of
  ``shards_per_group`` shards. There are ``G = world_size × max(1, num_workers)`` *streams*;
  stream ``g = rank × W + w`` reads groups ``g, g + G, g + 2G, …`` of every epoch, so ranks and
  workers see disjoint data.
- A group's samples are read in file order and shuffled through a buffer of ``shuffle_buffer``
  samples (webdataset's scheme: each new sample takes the place of a random one, which is
  emitted). Which sample leaves at each step depends only on ``rng(seed, e, group)`` and the
  group's size (``pipeline.data.sizes``), so the *emission order* is computed without
  reading (:func:`buffer_order`) and memory stays at ``shuffle_buffer`` samples, flat in shard
  size. With a buffer at least the group's size it is a full permutation of the group.
- Each stream is endless (epoch after epoch) and batches its own samples, so every rank yields
  batches forever and no rank runs out before another (a hang under DDP).
- Buckets: with ``bucket`` (a sample -> its shape), every batch holds samples of one bucket. A
  bucket's partial batch waits, across groups and epochs, until it fills: nothing is dropped,
  and a rare bucket's samples wait longer (the loader reports how many are waiting). Batches of
  different buckets may meet in one step on different ranks; that is fine for DDP and DeepSpeed.
- With fewer groups than streams, ``on_too_few_shards="error"`` stops with a clear message;
  ``"resample"`` lets each stream draw groups with replacement from ``rng(seed, e, g)``.
- Empty shards (an encode whose every sample failed, img2dataset's, one emptied by ``--dedup``)
  are kept in the schedule and hold nothing: a stream whose groups of an epoch are all empty
  goes on to the next epoch. The loader counts them (``shards_empty``); only a dataset whose every
  shard is empty is an error. Samples beyond a shard's recorded size are counted, not read.

Resume: each batch carries its stream, the number of samples the stream had emitted after it and,
for each sample left waiting in a partial bucket, its emission offset, shard and byte span. The
loader records these per stream, plus the batches consumed; a restored loader seeks each stream to
its offset (arithmetic over the shard sizes), reads each waiting sample alone by its byte span (a
seek, an HTTP Range: no shard prefix is read again, however many buckets wait), and rotates the
DataLoader's round-robin so the next batches are the ones an uninterrupted run would have
produced. Exact when the settings the order depends on match (world size, ``num_workers``, seed,
batch size, ``shards_per_group``, ``shuffle_buffer``, the shards): the position records them and
a restore with others is refused.

Batch memory: a data worker builds each batch in shared memory (:func:`batch_tensor`), so handing
it to the main process copies nothing; fresh shared memory costs its zeroing and page faults
(about 0.9 ms per MB here: more than decoding the batch), so a worker reuses the storages the main
process has released (:class:`BatchMemory`). The main process sends a storage back when the last
tensor viewing it is gone, never earlier: a consumer that keeps batches only makes workers allocate.
A loader without workers reuses its large batch storages the same way, in process (:class:`LocalBatchMemory`).

Held out (validation, ``pipeline.training.validation``): ``held_out[k]`` leading samples of shard
``k`` are never emitted. The schedule runs on the remaining sizes and a group's reader passes over
those samples (they are read, not decoded), so the held-out set and the training stream are
disjoint whatever the epoch, rank or worker. :func:`held_out_split` says which samples a count
holds out (the first ones of the last shard, then of the shard before it, …) and
:func:`read_held_out` reads them; the total held out is one of the order settings.
"""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.remote import PROG as SOURCE_PROG
from pipeline.data.remote import SourceError, iter_shard, read_span
from pipeline.data.sizes import shard_sizes
from pipeline.data.tars import SPAN

Decode = Callable[[dict], dict | None]  # raw tar sample (bytes by extension) -> sample, or None to skip
Collate = Callable[[list[dict]], dict]  # samples -> batch
Bucket = Callable[[dict], Hashable]  # decoded sample -> its bucket (e.g. the latent's shape)


@dataclass(kw_only=True)
class LoaderConfig:
    """How a stage reads its shards."""

    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    shards_per_group: int = 1  # samples of this many shards are shuffled together
    on_too_few_shards: Literal["error", "resample"] = "error"
    prefetch_factor: int = 4
    shuffle_buffer: int = 1024  # samples a data worker holds to shuffle a group: its memory bound (~1 GB at T5-XXL width)
    # each http(s) shard is read as this many concurrent 8 MB Range pieces (object stores cap each GET stream at
    # ~100 MB/s: 4 read 3.5x one); 1: one GET stream. Memory: 2 pieces a connection, twice that at a shard's end.
    # Local shards, and servers that ignore Range, are read as one stream whatever it says.
    http_connections: int = 4

    def __post_init__(self) -> None:
        for key in ("batch_size", "shards_per_group", "prefetch_factor", "shuffle_buffer", "http_connections"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (got {self.num_workers})")


class StreamSchedule:
    """The group schedule shared by every stream (pure arithmetic, no I/O)."""

    def __init__(self, shards: list[str], sizes: list[int], cfg: LoaderConfig, n_streams: int, held_out: list[int] | None = None) -> None:
        """``sizes``: the samples each shard gives the stream (its held-out ones not counted);
        ``held_out``: how many leading samples of each shard the reader passes over."""
        self.shards, self.sizes, self.cfg, self.n_streams = shards, sizes, cfg, n_streams
        self.held_out = [0] * len(shards) if held_out is None else list(held_out)
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}
        self._totals: dict[int, list[int]] = {}  # stream -> samples in each epoch so far (seek's arithmetic)
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

    def order(self, epoch: int, stream: int, position: int) -> np.ndarray:
        """Emission order (raw indices in file order) of the stream's ``position``-th group of
        ``epoch``; the last few are kept (resume locates many waiting samples in few groups)."""
        key = (epoch, stream, position)
        if key not in self._orders:
            size = sum(self.sizes[i] for i in self.groups(epoch, stream)[position])
            gid = stream + position * self.n_streams
            if len(self._orders) >= 8:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = buffer_order(size, self.cfg.shuffle_buffer, np.random.default_rng([self.cfg.seed, epoch, gid]))
        return self._orders[key]

    def raw_samples(self, group: list[int], skipped: Counter, then: int | None = None) -> Iterator[tuple[int, int, dict]]:
        """``(raw index, shard, raw sample with its byte span)`` of a group's shards in file order; a
        shard that ends early (unreadable: counted in ``skipped``) leaves its remaining indices out;
        samples beyond a shard's recorded size are counted (``beyond_recorded_size``), not read; a
        shard's held-out samples are passed over. ``then``: the shard after the group (each shard's
        successor is read ahead behind it over HTTP with ``http_connections`` > 1)."""
        base, following = 0, [*group[1:], then]
        for shard, after in zip(group, following):
            then_url = self.shards[after] if after is not None and self.cfg.http_connections > 1 else None
            shard_samples = iter_shard(self.shards[shard], skipped, spans=True, connections=self.cfg.http_connections, then=then_url)
            for index, raw in enumerate(shard_samples, start=-self.held_out[shard]):
                if index < 0:  # held out (validation): never trained on
                    continue
                if index >= self.sizes[shard]:
                    skipped["beyond_recorded_size"] += 1
                    continue
                yield base + index, shard, raw
            base += self.sizes[shard]

    def locate(self, stream: int, offset: int) -> tuple[int, int]:
        """Emission ``offset`` of a stream -> (shard index, sample index in that shard)."""
        epoch, position, k = self.seek(stream, offset)
        raw = int(self.order(epoch, stream, position)[k])
        for shard in self.groups(epoch, stream)[position]:
            if raw < self.sizes[shard]:
                return shard, raw
            raw -= self.sizes[shard]
        raise AssertionError("offset beyond its group")

    def following(self, groups: list[list[int]], epoch: int, stream: int, position: int) -> int:
        """The first shard of the group after the ``position``-th of ``groups`` (the stream's in
        ``epoch``): the next epoch's first group after the last."""
        return groups[position + 1][0] if position + 1 < len(groups) else self.groups(epoch + 1, stream)[0][0]

    def seek(self, stream: int, offset: int) -> tuple[int, int, int]:
        """Emission ``offset`` of a stream -> (epoch, group position in epoch, offset in group). An
        epoch whose groups for this stream hold no sample (empty shards) is passed over."""
        if not any(self.sizes):
            raise ValueError(f"all {len(self.shards)} shards are empty: there is no sample to read")
        totals, epoch = self._totals.setdefault(stream, []), 0  # samples per epoch of this stream, found once
        while True:
            if epoch == len(totals):
                totals.append(sum(self.sizes[i] for g in self.groups(epoch, stream) for i in g))
            if offset < totals[epoch]:
                break
            offset, epoch = offset - totals[epoch], epoch + 1
        for position, group in enumerate(self.groups(epoch, stream)):
            size = sum(self.sizes[i] for i in group)
            if offset < size:
                return epoch, position, offset
            offset -= size
        raise AssertionError("offset beyond its epoch")


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer`` slots emits ``n`` samples read in order
    0, 1, …: position ``k`` emits a sample read before ``buffer + k`` (so a reader holds at most
    ``buffer`` samples). ``buffer >= n`` is a uniform permutation."""
    slots = np.arange(min(buffer, n))
    picks = rng.integers(0, len(slots), n - len(slots)) if n > len(slots) else np.empty(0, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    for k, j in enumerate(picks):  # sample len(slots) + k arrives, a random slot leaves
        order[k] = slots[j]
        slots[j] = len(slots) + k
    order[len(picks):] = slots[rng.permutation(len(slots))]
    return order


@dataclass
class Emitted:
    """One sample leaving a stream: its emission offset, raw tar members (None: missing) and the
    shard they came from (their byte span is ``raw["__span__"]``)."""

    offset: int
    raw: dict | None
    shard: int = -1

    def where(self) -> list[int]:
        """``[offset, shard, start, end]``: how a resumed stream reads this sample alone."""
        return [self.offset, self.shard, *self.raw[SPAN]]


class ShardStream(IterableDataset):
    """Yields ``(worker, stream, end_offset, waiting_offsets, skipped, batch)``; one stream per data worker."""

    def __init__(self, schedule: StreamSchedule, decode: Decode, collate: Collate, rank: int, start: dict, bucket: Bucket | None,
                 returned: list[Connection] | None = None) -> None:
        """``returned``: per data worker, the pipe on which the main process gives batch storages back."""
        self.schedule, self.decode, self.collate, self.rank, self.bucket = schedule, decode, collate, rank, bucket
        self.start = start  # {"offsets": {stream: emission offset}, "waiting": {stream: [offsets]}, "rotation": int}
        self.returned = returned or []
        self.unreadable: Counter = Counter()  # shards cut short since the last batch

    def __iter__(self) -> Iterator[tuple[int, int, int, list[int], dict, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None and worker < len(self.returned):
            BatchMemory.start(self.returned[worker], keep=2 * self.schedule.cfg.prefetch_factor)
        local = (worker + self.start["rotation"]) % workers
        stream = self.rank * workers + local
        offset = int(self.start["offsets"].get(str(stream), 0))
        for batch in self._batches(stream, offset, self.start.get("waiting", {}).get(str(stream), [])):
            BatchMemory.collect()  # every batch, whatever its collate allocates: the give-backs never fill the pipe
            yield worker, *batch

    def _batches(self, stream: int, offset: int, waiting: list) -> Iterator[tuple[int, int, list[list[int]], dict, dict]]:
        buckets: dict[Any, list[tuple[list[int], dict]]] = {}  # bucket -> [(where, decoded sample)] (Emitted.where)
        skipped: Counter = Counter()
        for item in self._rewind(stream, waiting):
            self._add(buckets, item, skipped)
        for item in self._emitted(stream, offset):
            full = self._add(buckets, item, skipped)
            if full is not None:
                left = sorted(where for samples in buckets.values() for where, _ in samples)
                skipped.update(self.unreadable)
                yield stream, item.offset + 1, left, dict(skipped), self.collate([s for _, s in full])
                skipped = Counter()
                self.unreadable.clear()  # the same Counter: a group's reader holds it

    def _add(self, buckets: dict, item: Emitted, skipped: Counter) -> list | None:
        """Decode ``item`` into its bucket; the bucket's batch when it is full (then removed)."""
        sample = self.decode(item.raw) if item.raw is not None else None
        if sample is None:
            skipped["missing" if item.raw is None else "undecodable"] += 1
            return None
        key = self.bucket(sample) if self.bucket else None
        samples = buckets.setdefault(key, [])
        samples.append((item.where(), sample))
        return buckets.pop(key) if len(samples) == self.schedule.cfg.batch_size else None

    def _emitted(self, stream: int, offset: int) -> Iterator[Emitted]:
        """The stream's samples from emission ``offset`` on, forever."""
        epoch, position, skip = self.schedule.seek(stream, offset)
        ahead = self.schedule.cfg.http_connections > 1  # each shard's successor is read ahead behind it
        while True:
            groups = self.schedule.groups(epoch, stream)
            for index in range(position, len(groups)):
                order = self.schedule.order(epoch, stream, index)
                then = self.schedule.following(groups, epoch, stream, index) if ahead else None
                yield from self._group(groups[index], order, skip, offset - skip, then)
                offset += len(order) - skip
                skip = 0
            epoch, position = epoch + 1, 0

    def _group(self, group: list[int], order: np.ndarray, skip: int, base: int, then: int | None = None) -> Iterator[Emitted]:
        """Emit a group's samples ``order[skip:]``, reading its shards once, in file order; a
        reader holds at most ``shuffle_buffer`` samples. ``base`` is the group's first offset;
        ``then`` the shard read after the group."""
        wanted = np.zeros(len(order), dtype=bool)
        wanted[order[skip:]] = True
        reader, held, read = self.schedule.raw_samples(group, self.unreadable, then), {}, -1
        for k in range(skip, len(order)):
            want = int(order[k])
            while want not in held and read < want:
                read, shard, raw = next(reader, (len(order), -1, None))
                if raw is not None and wanted[read]:
                    held[read] = (shard, raw)
            shard, raw = held.pop(want, (-1, None))
            yield Emitted(base + k, raw, shard)
        if read == len(order) - 1:  # all read: what is left are samples beyond the recorded sizes, to count
            for _ in reader:
                pass

    def _rewind(self, stream: int, waiting: list) -> Iterator[Emitted]:
        """The samples that were waiting in partial buckets when the state was saved, in offset
        order, each read alone from its byte span (a seek, an HTTP Range): a resume reads no shard
        prefix, however many buckets wait. A position saved before spans were recorded lists bare
        offsets: those are located and read from their shards, each shard once."""
        spans = sorted([int(v) for v in entry] for entry in waiting if isinstance(entry, list))
        legacy = [int(entry) for entry in waiting if not isinstance(entry, list)]
        found = {offset: (shard, self._read_span(shard, start, end)) for offset, shard, start, end in spans}
        found.update(self._read_located(stream, legacy))
        for offset in sorted(found):
            yield Emitted(offset, found[offset][1], found[offset][0])

    def _read_span(self, shard: int, start: int, end: int) -> dict | None:
        """One waiting sample by its byte span; None (counted as missing) when it cannot be read."""
        try:
            return read_span(self.schedule.shards[shard], start, end)
        except SourceError as err:
            self.unreadable["unreadable_shard"] += 1
            print(f"{SOURCE_PROG}: warning: a waiting sample could not be read again: {err}", file=sys.stderr, flush=True)
            return None

    def _read_located(self, stream: int, offsets: list[int]) -> dict[int, tuple[int, dict | None]]:
        """Samples by emission offset, located by arithmetic and read from their shards, each shard once."""
        located: dict[int, dict[int, int]] = {}  # shard -> {index in shard: offset}
        for offset in offsets:
            shard, index = self.schedule.locate(stream, offset)
            located.setdefault(shard, {})[index + self.schedule.held_out[shard]] = offset  # its index in the shard file
        found: dict[int, tuple[int, dict | None]] = {offset: (-1, None) for offset in offsets}
        for shard, by_index in located.items():
            for index, raw in enumerate(iter_shard(self.schedule.shards[shard], self.unreadable, spans=True,
                                                connections=self.schedule.cfg.http_connections)):
                if index in by_index:
                    found[by_index[index]] = (shard, raw)
                if index >= max(by_index):
                    break
        return found


class ShardLoader:
    """Endless batches from a ``ShardStream`` through a ``DataLoader``, with exact resume."""

    def __init__(
        self, shards: list[str], cfg: LoaderConfig, decode: Decode, collate: Collate, rank: int = 0, world_size: int = 1,
        bucket: Bucket | None = None, sizes: list[int] | None = None, held_out: list[int] | None = None,
    ) -> None:
        """``sizes``: samples per shard when the caller found them (a run counts them once:
        ``pipeline.data.sizes.sizes_once``); else they are looked up here. ``held_out``: leading
        samples of each shard never emitted (:func:`held_out_split`; None: none)."""
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.cfg, self.decode, self.collate, self.bucket = list(shards), cfg, decode, collate, bucket
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, cfg.num_workers)
        sizes = shard_sizes(self.shards) if sizes is None else list(sizes)
        if len(sizes) != len(self.shards):
            raise ValueError(f"{len(sizes)} sizes for {len(self.shards)} shards")
        if not any(sizes):
            raise ValueError(f"all {len(sizes)} shard(s) are empty (first: {self.shards[0]}): there is no sample to read")
        self.held_out = [0] * len(sizes) if held_out is None else list(held_out)
        if len(self.held_out) != len(sizes) or any(not 0 <= h <= n for h, n in zip(self.held_out, sizes)):
            raise ValueError(f"held_out {self.held_out} does not fit the shard sizes {sizes}")
        trained = [n - h for n, h in zip(sizes, self.held_out)]
        if not any(trained):
            raise ValueError(f"all {sum(sizes)} samples of the {len(sizes)} shard(s) are held out: there is no sample to train on")
        self.empty_shards = sizes.count(0)  # skipped: their groups hold nothing
        self.schedule = StreamSchedule(self.shards, trained, cfg, world_size * self.workers, self.held_out)
        self.batches = 0  # consumed by this rank
        self.offsets: dict[str, int] = {}  # stream -> samples emitted up to the last consumed batch
        self.waiting: dict[str, list[list[int]]] = {}  # stream -> [offset, shard, start, end] of samples in partial buckets
        self.skipped: Counter = Counter()  # samples that could not be read or decoded, by reason

    def __iter__(self) -> Iterator[dict]:
        start = {"offsets": dict(self.offsets), "waiting": dict(self.waiting), "rotation": self.batches % self.workers}
        pipes = [multiprocessing.Pipe(duplex=False) for _ in range(self.cfg.num_workers)] if BatchMemory.recycles() else []
        for _, writer in pipes:  # a give-back never blocks the trainer: on a full pipe it is dropped (_send)
            os.set_blocking(writer.fileno(), False)
        dataset = ShardStream(self.schedule, self.decode, self.collate, self.rank, start, self.bucket, [r for r, _ in pipes])
        extra = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False} if self.cfg.num_workers else {}
        # its own generator: creating the iterator must not draw from the global RNG (exact resume)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, generator=generator, **extra)
        in_process = not self.cfg.num_workers
        if in_process:
            LocalBatchMemory.enter()
        try:
            for worker, stream, offset, waiting, skipped, batch in loader:
                self.offsets[str(stream)], self.waiting[str(stream)] = int(offset), [[int(v) for v in w] for w in waiting]
                self.skipped.update(skipped)
                self.batches += 1
                if pipes:
                    BatchMemory.give_back_when_freed(batch, pipes[worker][1])
                yield batch
        finally:
            if in_process:
                LocalBatchMemory.leave()
            for reader, writer in pipes:
                reader.close()
                writer.close()

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready data position, with the settings it is exact for (:meth:`order_settings`)."""
        return {
            "batches": self.batches,
            "offsets": dict(self.offsets),
            "waiting": {k: list(v) for k, v in self.waiting.items() if v},
            "skipped": dict(self.skipped),
            **self.order_settings(),
            "samples_seen": self.batches * self.cfg.batch_size,
            "epoch": self.epoch(),
            "samples_waiting": sum(len(v) for v in self.waiting.values()),  # in partial buckets
        }

    ADDED_LATER = ("batch_size", "shards_per_group", "shuffle_buffer", "shards")  # older positions lack them: as this run's
    BEFORE_ADDED = {"held_out": 0}  # older positions lack them too: what they were before

    def order_settings(self) -> dict[str, int]:
        """Everything the order of samples (and so a saved position) depends on."""
        mine = {k: getattr(self.cfg, k) for k in ("num_workers", "seed", "batch_size", "shards_per_group", "shuffle_buffer")}
        return {**mine, "world_size": self.world_size, "shards": len(self.shards), "held_out": sum(self.held_out)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in self.order_settings().items():
            saved = state.get(key, mine if key in self.ADDED_LATER else self.BEFORE_ADDED.get(key))
            if saved != mine:
                raise ValueError(f"data position was saved with {key}={saved}, this run has {mine}: resume would not be exact")
        self.batches, self.offsets = int(state["batches"]), {str(k): int(v) for k, v in state["offsets"].items()}
        self.waiting = {str(k): list(v) for k, v in state.get("waiting", {}).items()}  # [offset, shard, start, end] (or an offset)
        self.skipped = Counter(state.get("skipped", {}))

    def report(self) -> dict[str, int]:
        """For the metrics: the epoch, samples waiting in partial buckets, samples skipped so far."""
        samples = sum(n for reason, n in self.skipped.items() if reason != "unreadable_shard")
        return {"epoch": self.epoch(), "samples_waiting": sum(len(v) for v in self.waiting.values()),
                "samples_skipped": samples, "shards_unreadable": self.skipped["unreadable_shard"], "shards_empty": self.empty_shards}

    def epoch(self) -> int:
        """The oldest epoch any of this rank's streams is in (for logging)."""
        streams = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        return min(self.schedule.seek(s, self.offsets.get(str(s), 0))[0] for s in streams)


def held_out_split(sizes: list[int], count: int) -> list[int]:
    """How many leading samples of each shard ``count`` holds out: the first ones of the last shard,
    then (when it holds fewer) of the shard before it, and so on."""
    split, left = [0] * len(sizes), count
    for k in reversed(range(len(sizes))):
        split[k] = min(left, sizes[k])
        left -= split[k]
    return split


def read_held_out(shards: list[str], split: list[int], decode: Decode) -> list[dict]:
    """The first ``split[k]`` samples of each shard ``k`` (in shard order), decoded; one that does
    not decode is left out (it is not trained on either)."""
    samples = []
    for shard, count in zip(shards, split):
        for index, raw in enumerate(iter_shard(shard) if count else ()):
            if index >= count:
                break
            sample = decode(raw)
            if sample is not None:
                samples.append(sample)
    return samples


def read_first(shards: list[str], count: int, decode: Decode) -> list[dict]:
    """The first ``count`` samples of the shards, in order, that decode (a separate validation set)."""
    samples = []
    for shard in shards:
        for raw in iter_shard(shard):
            sample = decode(raw)
            if sample is not None:
                samples.append(sample)
            if len(samples) == count:
                return samples
    return samples


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # a .npy header -> (dtype, shape, fortran order)


def npy(data: bytes | bytearray) -> np.ndarray:
    """Decode a ``.npy`` member as a view of ``data`` (no copy when ``data`` is writable, as tar
    members are: ``pipeline.data.tars``; a copy of immutable ``bytes``). The header is parsed by numpy's own reader, once per
    distinct header; what it does not read (version 3, object arrays) goes through ``np.load``."""
    found = _npy_header(data)
    if found is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    (dtype, shape, fortran), offset = found
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    if not array.flags.writeable:  # immutable bytes (not a tar member): a copy, so tensors made from it may be written
        array = array.copy()
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _npy_header(data: bytes | bytearray) -> tuple[tuple[np.dtype, tuple[int, ...], bool], int] | None:
    """((dtype, shape, fortran order), data offset) of a version 1 or 2 ``.npy`` of plain dtype."""
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return None
    offset = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = bytes(data[:offset])
    if header not in _NPY_HEADERS:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
        if dtype.hasobject:
            return None
        if len(_NPY_HEADERS) >= 1024:  # many sequence lengths: start again
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = (dtype, tuple(shape), fortran)
    return _NPY_HEADERS[header], offset


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch: in shared memory inside a data worker (handing it to
    the main process then moves no bytes; recycled: :class:`BatchMemory`), ordinary memory in the
    main process (recycled while a loader without workers runs: :class:`LocalBatchMemory`)."""
    nbytes = math.prod(shape) * dtype.itemsize
    storage = BatchMemory.storage(nbytes) if get_worker_info() is not None else LocalBatchMemory.storage(nbytes)
    return torch.empty(shape, dtype=dtype) if storage is None else torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class LocalBatchMemory:
    """The batch storages of loaders without data workers, reused once no tensor views them.

    The allocator maps a large batch tensor afresh each time and unmaps it when freed: a 64-sample
    batch of T5-XXL tokens (63 MB) then costs 16,000 page faults, about 70 ms, more than reading
    and copying its samples (the 0-worker loader ran at 0.55x the 1-worker one at real shapes).
    While a 0-worker :class:`ShardLoader` iterates (:meth:`enter`), tensors of ``MIN_BYTES`` or
    more take a kept storage that only this pool references (the storage's use count is 1: no
    tensor, view or storage object elsewhere holds it), else a new one, kept when there is room
    (``KEEP``). The pool is emptied when the last such loader stops."""

    MIN_BYTES = 1 << 20  # smaller tensors come from the allocator's heap, without page faults
    KEEP = 8  # storages kept: a batch holds a few, and the trainer may hold a batch or two
    loaders = 0  # 0-worker loaders iterating in this process
    kept: ClassVar[list[torch.UntypedStorage]] = []

    @classmethod
    def enter(cls) -> None:
        cls.loaders += 1

    @classmethod
    def leave(cls) -> None:
        cls.loaders = max(0, cls.loaders - 1)
        if not cls.loaders:
            cls.kept = []

    @classmethod
    def storage(cls, nbytes: int) -> torch.UntypedStorage | None:
        """A storage of at least ``nbytes`` nobody else uses, or ``None`` (allocate as usual)."""
        if not cls.loaders or nbytes < cls.MIN_BYTES or _use_count is None:
            return None
        free = best_fit([s for s in cls.kept if _use_count(s._cdata) == 1], nbytes)
        if free is not None:
            return free
        storage = torch.UntypedStorage(nbytes)
        if len(cls.kept) >= cls.KEEP:  # make room: drop a storage nobody uses (one in use is theirs to free)
            idle = [s for s in cls.kept if _use_count(s._cdata) == 1]
            if not idle:
                return storage
            cls.kept.remove(idle[0])
        cls.kept.append(storage)
        return storage


def best_fit(storages: list[torch.UntypedStorage], nbytes: int) -> torch.UntypedStorage | None:
    """The smallest storage of at least ``nbytes`` and at most twice that, if any."""
    fits = [s for s in storages if nbytes <= s.nbytes() <= 2 * nbytes]
    return min(fits, key=lambda s: s.nbytes()) if fits else None


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a storage (tensors, views, storage objects)


class BatchMemory:
    """The shared-memory storages of one data worker's batches, reused once the main process frees them.

    Worker side (:meth:`storage`): a free storage of at least the size asked (at most twice it),
    else a new one; each storage lent is remembered by its inode (at most ``4 × keep``: a consumer
    that keeps batches only costs new storages). Main side (:meth:`give_back_when_freed`): a
    finaliser on each shared storage of a batch sends its inode back on the worker's pipe when the
    storage dies, i.e. when no tensor in the main process views it any more. Only under torch's
    ``file_descriptor`` sharing (the Linux default), where both processes see the same inode."""

    _worker: BatchMemory | None = None  # this data worker's

    def __init__(self, returned: Connection, keep: int) -> None:
        self.returned, self.keep = returned, keep
        self.lent: dict[int, torch.UntypedStorage] = {}  # inode -> storage, oldest first
        self.free: list[torch.UntypedStorage] = []

    @classmethod
    def recycles(cls) -> bool:
        return torch.multiprocessing.get_sharing_strategy() == "file_descriptor"

    @classmethod
    def start(cls, returned: Connection, keep: int) -> None:
        cls._worker = cls(returned, keep)

    @classmethod
    def storage(cls, nbytes: int) -> torch.UntypedStorage:
        """A shared storage of at least ``nbytes`` for this worker's next batch tensor."""
        memory = cls._worker
        if memory is None:
            return torch.UntypedStorage._new_shared(nbytes)
        memory._collect()
        storage = best_fit(memory.free, nbytes)
        if storage is None:
            storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
        else:
            memory.free.remove(storage)
        if len(memory.lent) >= 4 * memory.keep:
            memory.lent.pop(next(iter(memory.lent)))
        memory.lent[_inode(storage)] = storage
        return storage

    @classmethod
    def collect(cls) -> None:
        """In a data worker: read what the main process gave back so far (once per batch, also when
        the batch was not built here: an image batch's storages come back too, and unread they
        filled the pipe after ~4,000 and hung the trainer, 3,441 steps into the demo's autoencoder)."""
        if cls._worker is not None:
            cls._worker._collect()

    def _collect(self) -> None:
        """Move the storages the main process gave back to the free list (at most ``keep``)."""
        try:
            while self.returned.poll():
                storage = self.lent.pop(self.returned.recv(), None)
                if storage is not None and len(self.free) < self.keep:
                    self.free.append(storage)
        except (EOFError, OSError):  # the main process stopped reading: nothing more comes back
            pass

    @staticmethod
    def give_back_when_freed(batch: dict, writer: Connection) -> None:
        """Main side: each shared storage of ``batch`` goes back to its worker when it dies."""
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_shared():
                storage = value.untyped_storage()
                weakref.finalize(storage, _send, writer, _inode(storage)).atexit = False


def _inode(storage: torch.UntypedStorage) -> int:
    """The inode of a shared storage's memory file: the same number in every process that maps it."""
    return os.fstat(storage._share_fd_cpu_()[0]).st_ino


def _send(writer: Connection, inode: int) -> None:
    """Give ``inode`` back; a message this small is written whole or not at all (< PIPE_BUF), so on
    a full pipe (non-blocking: ``BlockingIOError``) it is dropped and the worker makes a new storage."""
    try:
        writer.send(inode)
    except (OSError, ValueError):  # the loader (and its workers) is gone, or the pipe is full: nothing to give back
        pass
