"""One shard folder written by several independent workers (``--rank R --world-size N``).

``data_tools.shard`` and ``data_tools.encode`` cut their work into numbered shards; worker ``R``
of ``N`` writes shard ``i`` when ``i % N == R``, so every shard has exactly one writer and the
folder ends the same for any ``N`` (a SLURM job array, or plain processes; no process group,
no worker ever waits for another). The worker that finds every planned shard complete when it
is done writes ``dataset.json``; ``--merge`` does that step alone. Where the worker's rank comes
from: :func:`pipeline.training.job_env.work_split`.

What a worker may touch besides its own shards: nothing another worker writes at the same time.
So it cleans up only its own shards' temporaries, and files every worker writes (the plan,
``dataset.json``) are written whole with identical content, under a temporary name unique to
the host and process.

A rerun of some tasks keeps the first split. The first workers record it in the output folder
(``worker_plan.json``: the world size and, from a SLURM job array, its range), so a task of a
later array of another size (``sbatch --array=17``, which SLURM calls task 17 of 1) is worker
``(17 - min) / step`` of that world size. A run that names no split, or another one, beside a
recorded one is refused in one line rather than claiming the other workers' shards. Only a run
that is truly one process (``--world-size 1``, or no split anywhere) does every shard and removes
every temporary.

The ranks of one launch (``accelerate launch -m data_tools.encode``) split the same way, and wait
for each other through files, not a collective: each rank leaves a completion file of this
launch when its share is done (:func:`mark_done`), and the main process waits for the others'
(:func:`wait_for_ranks`) before writing ``dataset.json``. So a rank that takes hours longer than
the rest (a rerun after a crash, slow remote reads) trips no process-group timeout.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.shards import _TMP_MARK, remove_partials, stats_path, write_json_atomic
from pipeline.training.job_env import ArrayRange, array_task, work_split

WORKER_PLAN = "worker_plan.json"
DONE_DIR = ".ranks-done"  # completion files of the ranks of one launch, removed once all are in


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
    removing stale temporaries: only its own shards' beside other workers (another's, being written
    right now, stay), every one when it is the only process (``world_size == 1``: :func:`worker_split`
    gives that only to ``--world-size 1`` or where no split of several workers was recorded)."""
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


# ---------------------------------------------------------------------------- reruns keep the first split


@dataclass(frozen=True)
class WorkerPlan:
    """How the workers of one output folder split it: ``world_size`` workers and, when a SLURM job
    array started them, its range (so a later task's index maps back to its rank)."""

    world_size: int
    array: ArrayRange | None = None


def read_plan(output: Path) -> WorkerPlan | None:
    """The split recorded in ``output`` (:data:`WORKER_PLAN`); None when there is none."""
    path = Path(output) / WORKER_PLAN
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    array = found.get("array")
    return WorkerPlan(found["world_size"], ArrayRange(**array) if array else None)


def record_split(output: Path, plan: WorkerPlan) -> None:
    """Record the split of the first workers of ``output`` (several of them; once: every worker of
    that split writes the same file whole, and a later one never changes it)."""
    if plan.world_size > 1 and read_plan(output) is None:
        Path(output).mkdir(parents=True, exist_ok=True)
        array = None if plan.array is None else vars(plan.array)
        record = {"world_size": plan.world_size, "array": array, "created_by": "data_tools.split"}
        write_json_atomic(Path(output) / WORKER_PLAN, record)


def worker_split(output: Path, rank: int | None, world_size: int | None, prog: str,
                 env: Mapping[str, str] | None = None) -> tuple[int, int, WorkerPlan]:
    """``(rank, world size)`` of an independent worker writing into ``output`` (flags, else a SLURM
    array task, :func:`work_split`, read through the split recorded there), and the plan to
    record once its folder checks pass (:func:`record_split`). Says in one line when a task's rank
    comes from the recorded array; refuses (one line) a split that differs from the recorded one."""
    recorded = read_plan(output)
    first = recorded.array if recorded else None
    rank_, world = work_split(rank, world_size, env, first)
    task = array_task(env)
    if rank is None and task is not None and first is not None and task[1].count != first.count:
        print(f"{prog}: SLURM array task {task[0]} is worker {rank_} of {world}, as the first array ({first}) "
              f"recorded in {Path(output) / WORKER_PLAN}")
    if recorded is not None and world != recorded.world_size and world_size != 1:  # --world-size 1: one process, asked for
        seen = f"--world-size {world}" if world_size is not None else (
            f"a SLURM array of {task[1].count} task(s)" if task is not None else "no --rank/--world-size and no SLURM array")
        raise ConfigError(_theirs(output, recorded, seen))
    from_array = rank is None and task is not None and task[1].plain and task[1].count == world
    return rank_, world, recorded or WorkerPlan(world, task[1] if from_array else None)


def refuse_beside_workers(output: Path, launch: str) -> None:
    """One line (``ConfigError``) when independent workers recorded their split in ``output``: the
    ranks of ``launch`` (a process group) would take those workers' shards."""
    recorded = read_plan(output)
    if recorded is not None:
        raise ConfigError(_theirs(output, recorded, launch))


def _theirs(output: Path, recorded: WorkerPlan, seen: str) -> str:
    return (f"{output} holds the shards of {recorded.world_size} workers ({WORKER_PLAN}); {seen} would take their shards: "
            f"rerun worker R with --rank R --world-size {recorded.world_size}, or do every shard left in one process "
            "with --world-size 1 once no worker runs")


# ---------------------------------------------------------------------------- the ranks of one launch


def mark_done(output: Path, rank: int, launch: str) -> None:
    """Rank ``rank`` of launch ``launch`` has tried every shard of its share (some may have been
    unreadable: the main process names those)."""
    folder = Path(output) / DONE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank-{rank}.json", {"launch": launch, "rank": rank})


def _done(output: Path, rank: int, launch: str) -> bool:
    path = Path(output) / DONE_DIR / f"rank-{rank}.json"
    try:
        return json.loads(path.read_text()).get("launch") == launch
    except (OSError, ValueError):
        return False


def wait_for_ranks(output: Path, world_size: int, launch: str, timeout: float, prog: str, every: float = 60.0) -> None:
    """The main process: wait until ranks ``1..world_size-1`` have left their completion file of
    ``launch`` (an earlier, crashed launch's files never count), saying which ranks it waits for
    at once and every ``every`` seconds; then remove the files. Past ``timeout`` seconds, one line
    (``TimeoutError``) names the ranks still missing."""
    start, said = time.monotonic(), None
    while waiting := [r for r in range(1, world_size) if not _done(output, r, launch)]:
        waited = time.monotonic() - start
        names = ", ".join(map(str, waiting))
        if waited > timeout:
            raise TimeoutError(f"rank(s) {names} did not finish their shards within wait_timeout={timeout:g} s: see their logs, "
                               "then rerun the same command to encode what they left")
        if said is None or waited - said >= every:
            print(f"{prog}: rank 0 is done; waiting for rank(s) {names} to finish their shards ({waited:.0f} s, "
                  f"wait_timeout={timeout:g} s)", flush=True)
            said = waited
        time.sleep(min(1.0, timeout / 10))
    shutil.rmtree(Path(output) / DONE_DIR, ignore_errors=True)
