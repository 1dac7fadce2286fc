"""``accelerate launch -m pipeline.train --config configs/X.yaml [section.key=value ...]``

Trains a DiT on latent shards with rectified flow, under accelerate with DeepSpeed ZeRO-2 by
default (ZeRO-3 as an option, plain DDP when DeepSpeed is off), an fp32 EMA, atomic checkpoints
with the complete state (model, optimizer, LR schedule, EMA, step, RNG states, data position) and
exact resume, a guided sample grid every N steps, and at the end the EMA weights exported as a
``from_pretrained`` model folder. The recipe is ``pipeline.training.dit``; ``--dry-run
[--world-size N]`` prints its plan (``pipeline.planning.dry_run``) and exits.
"""

from __future__ import annotations

import sys

from pipeline.config import parse_cli
from pipeline.planning import dry_run
from pipeline.training.core import run_training
from pipeline.training.dit import PROG, Trainer, plan
from pipeline.training.dit_config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    options, argv = dry_run.split_flags(argv)  # --dry-run [--world-size N]: print the launch plan and exit
    cfg = parse_cli(TrainConfig, argv, PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    if options is not None:
        return dry_run.run_stage(cfg, options, plan, PROG)
    return run_training(Trainer, cfg, PROG)


if __name__ == "__main__":
    sys.exit(main())
