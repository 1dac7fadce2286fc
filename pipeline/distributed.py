"""The one place that reads the distributed environment and builds the ``Accelerator``.

Launchers describe the job in environment variables: ``accelerate launch`` and ``torchrun``
set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (+ ``MASTER_ADDR`` / ``MASTER_PORT``); SLURM sets
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; Open MPI sets ``OMPI_COMM_WORLD_*``.
:func:`dist_env` reads them once into an immutable :class:`DistEnv`; nothing else in the
project reads those variables (open_clip's ``world_info_from_env``, returned as a value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

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


def create_accelerator(**kwargs):
    """An ``accelerate.Accelerator`` that is really distributed on CPU-only machines too.

    Without a GPU, a multi-process launch leaves accelerate's process group unset and each
    process silently runs alone (ENV-NOTES.md). Plain jobs need ``cpu=True`` (accelerate then
    picks MULTI_CPU with gloo); DeepSpeed jobs need the gloo backend named explicitly.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not torch.cuda.is_available() and dist_env().world_size > 1:
        if _deepspeed_launch():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            kwargs.setdefault("cpu", True)
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def _deepspeed_launch() -> bool:
    """Whether ``accelerate launch --use_deepspeed`` (or a DeepSpeed config) started us."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def shutdown(accelerator) -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits
    (left to interpreter shutdown, gloo can abort a rank: "terminate called without an active exception")."""
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
