"""Where this process sits in a job, from the launcher's environment variables, without torch.

Launchers describe the job in environment variables: ``accelerate launch`` and ``torchrun``
set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (+ ``MASTER_ADDR`` / ``MASTER_PORT``); SLURM sets
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; Open MPI sets ``OMPI_COMM_WORLD_*``.
:func:`dist_env` reads them once into an immutable :class:`DistEnv`; nothing else in the
project reads those variables (open_clip's ``world_info_from_env``, returned as a value).

Preprocessing runs as *independent* workers instead (no process group; a SLURM job array, or
several plain processes): :func:`work_split` says which share of the work this worker takes.
Those tools (``data_tools.shard``) import this module and not :mod:`pipeline.training.distributed`,
whose torch import would cost them more start-up than their work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import ConfigError

_SOURCES = (  # launcher, rank, world size, local rank
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (first launcher found wins; none -> single process)."""
    env = os.environ if env is None else env
    for launcher, rank, world, local in _SOURCES:
        if rank in env and world in env:
            port = env.get("MASTER_PORT")
            return DistEnv(
                rank=int(env[rank]),
                world_size=int(env[world]),
                local_rank=int(env.get(local, 0)),
                launcher=launcher,
                master_addr=env.get("MASTER_ADDR"),
                master_port=int(port) if port else None,
            )
    return DistEnv()


_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class ArrayRange:
    """A SLURM job array's indices as sbatch states them: ``low``, ``low + step``, … ``high``, and
    how many tasks it has (``--array=1-64`` is 1, 64, 1, 64; a list ``--array=17,40`` is 17, 40, 1, 2)."""

    low: int
    high: int
    step: int
    count: int

    @property
    def plain(self) -> bool:
        """Whether the indices are one range ``A-B[:STEP]`` (a list is not)."""
        return self.step >= 1 and (self.high - self.low) // self.step + 1 == self.count

    def rank_of(self, task: int) -> int | None:
        """Task index ``task``'s position in the range; None when it is not one of its indices."""
        rank, off = divmod(task - self.low, max(self.step, 1))
        return rank if not off and 0 <= rank < self.count else None

    def __str__(self) -> str:
        return f"{self.low}-{self.high}:{self.step}"


def array_task(env: Mapping[str, str] | None = None) -> tuple[int, ArrayRange] | None:
    """This SLURM array task's index and its array (unchecked); None outside a job array."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task, low, high, step, count = (env.get(name) for name in _ARRAY)
    task = int(task)
    low, step = int(low or 0), int(step or 1)
    count = int(count) if count else (int(high if high else task) - low) // step + 1
    high = int(high) if high else low + (count - 1) * step
    return task, ArrayRange(low, high, step, count)


def slurm_array(env: Mapping[str, str] | None = None, first: ArrayRange | None = None) -> tuple[int, int] | None:
    """``(rank, world size)`` of this SLURM job-array task; None outside an array.

    sbatch sets ``SLURM_ARRAY_TASK_ID`` with the array's ``_MIN``, ``_MAX``, ``_STEP`` and ``_COUNT``:
    ``--array=0-7`` gives ranks 0..7 of 8, and ``--array=1-16`` or ``--array=0-14:2`` work too (the
    rank is the task's position in the range). A list (``--array=1,5,9``) has no such position and
    is refused. A ``%`` limit (``--array=0-63%8``) only delays tasks: workers never wait for each other.

    ``first``: the array that started the first workers of this job (``data_tools.split`` records
    it). A task of an array of another size, a rerun of some of them (``--array=17``, a list too),
    is the rank its index had there, of that array's size.
    """
    found = array_task(env)
    if found is None:
        return None
    task, here = found
    if first is not None and here.count != first.count:
        rank = first.rank_of(task)
        if rank is None:
            raise ConfigError(f"SLURM array task {task} is not one of the first array's ({first}, {first.count} workers): "
                              "rerun with the first array's task indices, or pass --rank and --world-size")
        return rank, first.count
    rank = here.rank_of(task) if here.plain else None
    if rank is None:
        raise ConfigError(f"SLURM array task {task} of {here.count} (indices {here}) is not in a plain range: "
                          "submit with --array=A-B[:STEP], or pass --rank and --world-size")
    return rank, here.count


def work_split(rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None,
               first: ArrayRange | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of an independent worker: each value from the flags when given, else
    from a SLURM job array (:func:`slurm_array`, with the ``first`` array of the job), else ``(0, 1)``.
    Not from torchrun or SLURM task variables: one process in an ``sbatch --ntasks=4`` script sees
    ``SLURM_PROCID=0``, ``SLURM_NTASKS=4`` and would silently do a quarter of the work (``srun`` tasks
    pass ``--rank $SLURM_PROCID --world-size $SLURM_NTASKS``). Raises ``ConfigError`` (one line)
    unless ``0 <= rank < world size``."""
    if rank is None or world_size is None:
        found = slurm_array(env, first) or (0, 1)
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1 (got {world_size}): check --world-size")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size}): check --rank and --world-size")
    return rank, world_size
