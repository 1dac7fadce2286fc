"""``accelerate launch -m pipeline.distill --config configs/distill_demo.yaml [section.key=value ...]``

Consistency distillation of a trained teacher (an exported model folder) into a student that
samples in 1–4 steps, with the DiT stage's machinery: DeepSpeed or DDP, checkpoints and exact
resume, logging, sample grids. The recipe is ``pipeline.training.distill``; ``--dry-run
[--world-size N]`` prints its plan and exits. Compare the student with its teacher afterwards
with ``python -m pipeline.compare``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.config import parse_cli
from pipeline.planning import dry_run
from pipeline.training.core import run_training
from pipeline.training.distill import PROG, DistillConfig, Distiller, plan


def recipe(cfg: DistillConfig) -> tuple[type, Callable]:
    """The trainer and dry-run plan of ``distill.mode``: consistency distillation of the teacher
    (``cd``), or teacher-free consistency training (``ct``: nothing loads a teacher)."""
    if cfg.distill.mode == "ct":
        from pipeline.training.consistency_training import ConsistencyTrainer, plan_ct

        return ConsistencyTrainer, plan_ct
    return Distiller, plan


def main(argv: list[str] | None = None) -> int:
    options, argv = dry_run.split_flags(argv)  # --dry-run [--world-size N]: print the plan and exit
    cfg = parse_cli(DistillConfig, argv, PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    trainer, planner = recipe(cfg)
    if options is not None:
        return dry_run.run_stage(cfg, options, planner, PROG)
    return run_training(trainer, cfg, PROG)


if __name__ == "__main__":
    sys.exit(main())
