"""``accelerate launch -m pipeline.train_autoencoder --config configs/autoencoder_demo.yaml [section.key=value ...]``

Trains an ``AutoencoderKL`` (VAE + patch-GAN) on image shards when no pretrained VAE is given,
checkpointing and resuming like every stage, and exports ``RUN/vae/`` with its measured latent
scale and shift, ``RUN/eval.json`` (held-out PSNR) and ``RUN/reconstructions.png``. The recipe is
``pipeline.training.autoencoder``.
"""

from __future__ import annotations

import sys

from pipeline.config import parse_cli
from pipeline.training.autoencoder import PROG, AutoencoderTrainConfig, AutoencoderTrainer
from pipeline.training.core import run_training


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(AutoencoderTrainConfig, argv, PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    return run_training(AutoencoderTrainer, cfg, PROG)


if __name__ == "__main__":
    sys.exit(main())
