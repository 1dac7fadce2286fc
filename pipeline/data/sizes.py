"""How many samples each shard holds, found once per run.

The loader's order of samples is arithmetic over the shard sizes (``pipeline.data.stream``), so it
needs them before the first batch. Where a size comes from, cheapest first:

1. the source's ``dataset.json`` ``"shard_samples"`` (``{shard name: samples}``; ``data_tools.shard``
   and ``data_tools.encode`` write it): one small file for the whole dataset;
2. each shard's ``{stem}_stats.json`` ``"successes"`` (img2dataset's layout), read in parallel;
3. a local tar's headers (no sample data read), or, for a remote or ``pipe:`` shard, the shard
   streamed once and its samples counted.

A stats file that cannot be read (an S3 bucket without ListBucket answers 403 for a missing key)
counts as absent, not as an error: the shard is counted instead, and one line says how many were.

In a distributed run only the main process looks (:func:`sizes_once`): it reads the run's cache
(``RUN/shard_sizes.json``, written the first time), else finds the sizes as above and writes the
cache, and hands them to the other ranks. So the bytes read before step 1 do not grow with the
number of ranks, and a resumed run reads nothing at all.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.data.remote import SourceError, dataset_meta, is_url, read_json, read_shard
from pipeline.data.tars import sample_key

PROG = "pipeline.data.sizes"
THREADS = 16  # parallel stats requests / shard counts
CACHE_FILE = "shard_sizes.json"


def shard_name(shard: str) -> str:
    """The file name a dataset.json lists for a shard path or URL."""
    return str(shard).rstrip("/").rsplit("/", 1)[-1]


def listed_sizes(shards: list[str], meta: dict | None) -> list[int] | None:
    """The sizes a ``dataset.json`` records for every one of ``shards`` (by file name); None when
    it records none, or not all of them."""
    listed = (meta or {}).get("shard_samples")
    if not isinstance(listed, dict) or any(str(s).startswith("pipe:") for s in shards):  # a command is not a file name
        return None
    sizes = [listed.get(shard_name(s)) for s in shards]
    return sizes if all(isinstance(n, int) and n >= 0 for n in sizes) else None


def source_meta(shards: list[str]) -> dict | None:
    """The ``dataset.json`` of the folder the shards come from, when there is one to read."""
    try:
        meta = dataset_meta(shards)
    except (OSError, ValueError):  # none (img2dataset), unreadable, or a pipe: source
        return None
    return meta if isinstance(meta, dict) else None


def shard_sizes(shards: list[str], meta: dict | None = None) -> list[int]:
    """Samples per shard (see the module docstring); ``meta`` is the source's dataset.json when
    the caller has read it already (else it is looked up)."""
    shards = [str(s) for s in shards]
    listed = listed_sizes(shards, meta if meta is not None else source_meta(shards))
    if listed is not None:
        return listed
    with ThreadPoolExecutor(max_workers=max(1, min(THREADS, len(shards)))) as pool:
        stats = list(pool.map(_stats_size, shards))
        counted = [i for i, n in enumerate(stats) if n is None]
        remote = [shards[i] for i in counted if is_url(shards[i])]
        if remote:
            print(f"{PROG}: {len(remote)} of {len(shards)} shard(s) have no recorded size (no shard_samples in a dataset.json, "
                  f"no readable _stats.json; first: {remote[0]}): counting them by reading each once", file=sys.stderr, flush=True)
        for i, n in zip(counted, pool.map(_count, [shards[i] for i in counted])):
            stats[i] = n
    return stats


def _stats_size(shard: str) -> int | None:
    """``successes`` of the shard's ``_stats.json``; None when there is none or it cannot be read."""
    if not shard.endswith(".tar") or shard.startswith("pipe:"):
        return None
    try:
        stats = read_json(shard[: -len(".tar")] + "_stats.json", retries=1)
    except SourceError:  # absent, forbidden (403), unreachable, not JSON: count the shard instead
        return None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    return successes if isinstance(successes, int) and successes >= 0 else None


def _count(shard: str) -> int:
    """Samples in a shard: a local tar's headers (no data read), else the shard streamed once."""
    if not is_url(shard):
        with tarfile.open(shard) as tar:
            keys = [key for key in (sample_key(m.name)[0] for m in tar if m.isfile()) if key is not None]
        return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])  # a sample: a run of one key
    return sum(1 for _ in read_shard(shard))


def sizes_once(shards: list[str], cache: Path | None, is_main: bool, share: Callable[[Any], Any],
               meta: dict | None = None) -> list[int]:
    """The shard sizes of a (possibly distributed) run: the main process reads ``cache`` when it
    holds these shards, else finds them (:func:`shard_sizes`) and writes it; ``share`` hands the
    main process's value to every rank (a broadcast; identity in one process)."""
    sizes = None
    if is_main:
        sizes = _cached(shards, cache)
        if sizes is None:
            sizes = shard_sizes(shards, meta)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({"shards": [str(s) for s in shards], "sizes": sizes}) + "\n")
    return list(share(sizes))


def _cached(shards: list[str], cache: Path | None) -> list[int] | None:
    if cache is None or not cache.is_file():
        return None
    try:
        saved = json.loads(cache.read_text())
    except ValueError:
        return None
    if saved.get("shards") != [str(s) for s in shards] or len(saved.get("sizes", [])) != len(shards):
        return None
    return [int(n) for n in saved["sizes"]]
