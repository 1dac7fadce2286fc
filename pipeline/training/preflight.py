"""What a training stage checks before any collective, and how it describes itself to the dry run.

:func:`preflight` runs on every rank before the accelerator exists (a shard listing and two small
JSON files), so a launch that cannot run stops every rank alike, with one line
(:class:`PlanError`) instead of leaving one rank waiting: too few shard groups for ranks × data
workers, a launch file whose DeepSpeed setting contradicts the config, or a resume whose data
position was written by another world size or ``num_workers``.

Each recipe also describes itself as a :class:`TrainingPlan` (its data, batch, precision,
DeepSpeed, and its networks as :class:`ModelSpec` built on the ``meta`` device); the dry run
(``pipeline.planning.dry_run``) prints such a plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.latents import shard_list
from pipeline.data.stream import LoaderConfig, StreamSchedule
from pipeline.training.checkpoint import Checkpoints
from pipeline.training.distributed import deepspeed_launch_conflict


class PlanError(RuntimeError):
    """A launch that cannot work, found before any collective (one line; the same on every rank)."""


@dataclass(frozen=True)
class ModelSpec:
    """One network a training stage holds, built on the ``meta`` device (no weights)."""

    name: str
    module: torch.nn.Module
    trained: bool = True  # trained: weights, gradients, optimizer state; else frozen weights only
    fp32_copies: tuple[str, ...] = ()  # full fp32 copies kept on every rank, by name ("EMA", "target network")
    frozen_bytes: int = 4  # bytes per parameter of a frozen model as the stage holds it
    gradient_checkpointing: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """What a training stage tells the dry run about itself."""

    prog: str
    latents: Path
    loader: LoaderConfig  # loader.batch_size is the per-process micro-batch
    grad_accum: int
    grad_clip: float
    mixed_precision: str  # "no", "bf16", "fp16"
    deepspeed: bool
    zero_stage: int
    deepspeed_template: Path | None
    models: tuple[ModelSpec, ...] = ()
    resume_from: Path | None = None  # the checkpoint a run would resume from


def check_shard_count(shards: str | Path | list[str], loader: LoaderConfig, world_size: int) -> list[str]:
    """The shard list (a folder is listed; no file is opened); :class:`PlanError` when there is
    none, or when its groups cannot feed every (rank, worker) stream and ``on_too_few_shards`` is
    "error" (the schedule's own check and message)."""
    try:
        listed = shard_list(shards)
        StreamSchedule(listed, [0] * len(listed), loader, world_size * max(1, loader.num_workers))
    except ValueError as err:
        raise PlanError(str(err)) from None
    return listed


def check_resume(folder: Path | None, world_size: int, loader: LoaderConfig, held_out: int | None = None) -> None:
    """The data position is per (rank, worker) stream: exact resume needs the same world size and
    num_workers, and the same samples held out for validation (``held_out``; None: not checked)."""
    position = None if folder is None else Path(folder) / "data_rank0.json"
    if position is None or not position.exists():
        return
    saved = json.loads(position.read_text())
    if (saved.get("world_size"), saved.get("num_workers")) != (world_size, loader.num_workers):
        raise PlanError(
            f"{folder} was written by {saved.get('world_size')} process(es) with data.loader.num_workers="
            f"{saved.get('num_workers')}; this launch has {world_size} and {loader.num_workers}: resume needs the same "
            "(the data position is per rank and worker; ZeRO optimizer state is partitioned per rank). "
            "Relaunch with those, or start a new run (checkpoint.resume=never, another run name)"
        )
    for key in ("batch_size", "shards_per_group", "shuffle_buffer"):  # the order of samples depends on them
        if key in saved and saved[key] != getattr(loader, key):
            raise PlanError(f"{folder} was written with data.loader.{key}={saved[key]}, this launch has {getattr(loader, key)}: "
                            "the samples would come in another order. Relaunch with it, or start a new run "
                            "(checkpoint.resume=never, another run name)")
    if held_out is not None and saved.get("held_out", 0) != held_out:
        raise PlanError(f"{folder} was written holding out {saved.get('held_out', 0)} sample(s) of the data for validation, this "
                        f"launch holds out {held_out}: the training samples would differ. Resume with the same validation.every / "
                        "validation.count, or validate on a separate set (validation.latents=FOLDER), which leaves the training "
                        "samples as they are")


def resume_target(cfg) -> Path | None:
    """The checkpoint a run with this config would resume from (``Checkpoints.resume_folder``)."""
    return Checkpoints(cfg.run_dir / "checkpoints").resume_folder(cfg.checkpoint.resume)


def preflight(
    shards: str | Path | list[str], loader: LoaderConfig, world_size: int, *, deepspeed: bool, zero_stage: int, resume_from: Path | None,
    held_out: int | None = None,
) -> None:
    """The checks every rank runs before any collective; raises :class:`PlanError` (one line).
    ``held_out``: samples of the shards left out of training for validation (None: not checked)."""
    check_shard_count(shards, loader, world_size)
    problem = deepspeed_launch_conflict(deepspeed, zero_stage)
    if problem:
        raise PlanError(problem)
    check_resume(resume_from, world_size, loader, held_out)
