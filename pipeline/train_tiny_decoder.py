"""``python -m pipeline.train_tiny_decoder --latents runs/demo/latents --output runs/demo/diffusers/tiny_vae [--vae FOLDER]``

Trains a tiny preview decoder (TAESD-style ``AutoencoderTiny``) to imitate the frozen VAE's
decoder on the folder's latents, and saves it with ``save_pretrained`` plus ``train.json``
(losses, held-out PSNR against the full decoder). Put it in a model folder as ``tiny_vae/`` and
``TextToImage.from_folder`` offers it as ``decoder="tiny"``. The recipe is
``pipeline.training.tiny_decoder``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.encoders.common import EncoderLoadError
from pipeline.models.tiny_decoder import TinyDecoderConfig
from pipeline.training.tiny_decoder import PROG, TinyDecoderTrainConfig, train_tiny_decoder


def parse(argv: list[str] | None) -> TinyDecoderTrainConfig:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--latents", required=True, help="latent-shard folder (data_tools.encode)")
    p.add_argument("--output", required=True, help="folder for the AutoencoderTiny (e.g. MODEL/tiny_vae)")
    p.add_argument("--vae", help="the VAE folder to imitate (default: the one the latents' dataset.json names)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--samples", type=int, default=2048, help="latents read, held-out ones included")
    p.add_argument("--held-out", type=int, default=256, help="of them never trained on: the PSNR")
    p.add_argument("--channels", type=int, default=16, help="decoder width")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 1, 0], help="residual blocks per stage, lowest resolution first")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return TinyDecoderTrainConfig(
            latents=args.latents, output=args.output, vae=args.vae, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            samples=args.samples, held_out=args.held_out, seed=args.seed,
            model=TinyDecoderConfig(channels=args.channels, blocks=args.blocks))
    except ValueError as err:
        p.error(str(err))
        raise  # unreachable: p.error exits


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        record = train_tiny_decoder(cfg)
    except (EncoderLoadError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    psnr = record.get("psnr_vs_vae_held_out")
    print(f"{PROG}: loss {record['first_loss']:.4f} -> {record['final_loss']:.4f}"
          + (f", held-out PSNR vs the full decoder {psnr:.2f} dB" if psnr is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
