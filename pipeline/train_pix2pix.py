"""``accelerate launch -m pipeline.train_pix2pix --config configs/pix2pix_demo.yaml [section.key=value ...]``

Trains the pix2pix baseline (a U-Net generator with a conditional PatchGAN and L1, or the L2
regression baseline with loss.kind=l2) on paired image shards from data_tools.pairs, checkpointing
and resuming like every stage, and exports ``RUN/generator/`` (``Translator.from_pretrained``),
``RUN/eval.json`` (held-out PSNR) and ``RUN/samples.png`` (source | output | target). The recipe is
``pipeline.training.pix2pix``.
"""

from __future__ import annotations

import sys

from pipeline.config import parse_cli
from pipeline.training.core import run_training
from pipeline.training.pix2pix import PROG, Pix2PixTrainConfig, Pix2PixTrainer


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(Pix2PixTrainConfig, argv, PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    return run_training(Pix2PixTrainer, cfg, PROG)


if __name__ == "__main__":
    sys.exit(main())
