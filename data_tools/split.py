"""One shard folder written by several independent workers (``--rank R --world-size N``).

``data_tools.shard`` and ``data_tools.encode`` cut their work into numbered shards; worker ``R``
of ``N`` writes shard ``i`` when ``i % N == R``, so every shard has exactly one writer and the
folder ends the same for any ``N`` (a SLURM job array, or plain processes; no process group,
no worker ever waits for another). The worker that finds every planned shard complete when it
is done writes ``dataset.json``; ``--merge`` does that step alone. Where the worker's rank comes
from: :func:`pipeline.training.distributed.work_split`.

What a worker may touch besides its own shards: nothing another worker writes at the same time.
So it cleans up only its own shards' temporaries, and files every worker writes (the plan,
``dataset.json``) are written whole with identical content, under a temporary name unique to
the host and process.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.shards import _TMP_MARK, remove_partials, stats_path



def owned(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shard indices worker ``rank`` of ``world_size`` writes: ``i % world_size == rank``."""
    return list(range(rank, n_shards, world_size))


def remove_own_partials(tars: list[Path]) -> int:
    """Delete the temporaries left by an interrupted writer of these shards (tar and stats);
    another worker's temporaries, being written right now, stay. Returns how many."""
    names = {p.name for tar in tars for p in (tar, stats_path(tar))}
    removed = 0
    for folder in {tar.parent for tar in tars}:
        for path in folder.glob(f"*{_TMP_MARK}*"):
            if path.name.split(_TMP_MARK, 1)[0] in names and path.is_file():
                path.unlink()
                removed += 1
    return removed


def claim(output: Path, tars: list[Path], rank: int, world_size: int) -> list[int]:
    """The shard indices this worker still has to write: its share, minus the complete ones, after
    removing stale temporaries (all of them alone; only its own beside other live workers)."""
    mine = owned(len(tars), rank, world_size)
    if world_size == 1:
        remove_partials(output)
    else:
        remove_own_partials([tars[i] for i in mine])
    return [i for i in mine if not tars[i].exists()]


def missing(tars: list[Path]) -> list[Path]:
    """The planned shards that are not complete yet (a tar exists only once complete)."""
    return [tar for tar in tars if not tar.exists()]


def require_complete(tars: list[Path], folder: Path) -> None:
    """For ``--merge``: one line naming how many shards are missing, and the first of them."""
    absent = missing(tars)
    if absent:
        raise ConfigError(f"{len(absent)} of {len(tars)} shard(s) are missing in {folder} (first: {absent[0].name}): "
                          "run the workers that own them (same flags, their --rank/--world-size) before --merge")


def progress_line(prog: str, rank: int, world_size: int, wrote: int, absent: int, total: int) -> str:
    """What a worker that is not the last one says when it stops."""
    return (f"{prog}: worker {rank}/{world_size} wrote {wrote} shard(s); {absent} of {total} shard(s) are not complete yet: "
            "the last worker to finish writes dataset.json (or run the same command with --merge)")
