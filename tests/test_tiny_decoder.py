"""The tiny preview decoder (TAESD-style ``AutoencoderTiny``): training, the stock diffusers
format, and ``TextToImage``'s ``decoder="tiny"``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import train_tiny_decoder as cli
from pipeline.encoders.vae import FrozenTinyDecoder
from pipeline.evaluation import evaluate
from pipeline.inference.pipeline import TINY_DECODER, TextToImage
from pipeline.models.tiny_decoder import TinyDecoderConfig, build_tiny_decoder
from pipeline.training.tiny_decoder import TinyDecoderTrainConfig, read_latents, train_tiny_decoder


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory, latent_shards: Path) -> Path:
    """A tiny decoder trained for 40 steps on ``latent_shards`` against the VAE their dataset.json names."""
    folder = tmp_path_factory.mktemp("tiny_decoder") / "tiny_vae"
    cfg = TinyDecoderTrainConfig(latents=str(latent_shards), output=str(folder), steps=40, batch_size=16, samples=48, held_out=8)
    train_tiny_decoder(cfg, progress=False)
    return folder


def test_training_lowers_the_loss_and_reports_the_held_out_psnr(tiny_decoder_dir):
    record = json.loads((tiny_decoder_dir / "train.json").read_text())
    losses = record["losses"]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert record["samples"] == 48 and record["config"]["held_out"] == 8
    assert 0 < record["psnr_vs_vae_held_out"] < 100


def test_stock_diffusers_loads_it_and_decodes_the_same(tiny_decoder_dir, latent_shards):
    from diffusers import AutoencoderTiny

    stock = AutoencoderTiny.from_pretrained(tiny_decoder_dir).eval()
    ours = FrozenTinyDecoder(str(tiny_decoder_dir))
    z = read_latents(str(latent_shards), 6)  # (6, 4, 8, 8)
    with torch.no_grad():
        expected = stock.decode(z).sample.clamp(-1, 1)  # (6, 3, 32, 32)
    got = ours.decode(z)
    assert got.shape == (6, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latents must be"):
        ours.decode(z[:, :3])


def test_text_to_image_decodes_with_the_tiny_decoder_when_asked(teacher_dir, tiny_decoder_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(teacher_dir, folder)
    with pytest.raises(OSError, match="tiny decoder"):
        TextToImage.from_folder(folder, decoder="tiny")  # no tiny_vae/ yet: one line naming it
    shutil.copytree(tiny_decoder_dir, folder / TINY_DECODER)
    full, preview = TextToImage.from_folder(folder), TextToImage.from_folder(folder, decoder="tiny")
    assert full.preview is None and isinstance(preview.preview, FrozenTinyDecoder)
    prompts = ["a small red circle at the center on a white background", "a large blue square at the top left on a black background"]
    images, _ = preview.generate(prompts, steps=2, seed=3)
    side = full.latent_shape[-1] * full.vae.downsample
    assert [image.size for image in images] == [(side, side)] * 2
    latents = full.latents(prompts, 2, 4.0, seed=[3, 4])
    torch.testing.assert_close(preview.decode(latents), preview.preview.decode(latents))
    torch.testing.assert_close(full.decode(latents), full.vae.decode(latents))
    with pytest.raises(ValueError, match="decoder must be one of"):
        TextToImage.from_folder(folder, decoder="taesd")
    (tmp_path / "p.txt").write_text(prompts[0] + "\n")
    args = ["--model", str(folder), "--steps", "1", "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out")]
    assert evaluate.main([*args, "--preview-decoder"]) == 0
    assert json.loads((tmp_path / "out/summary.json").read_text())["decoder"] == "tiny"  # the scores say they are previews


def test_configs_refuse_bad_values_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        TinyDecoderConfig(channels=0)
    with pytest.raises(ValueError, match="blocks must list 3 stages"):
        build_tiny_decoder(TinyDecoderConfig(blocks=[1, 1]), 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        build_tiny_decoder(TinyDecoderConfig(), 4, 3)
    with pytest.raises(ValueError, match="held_out"):
        TinyDecoderTrainConfig(latents="x", output="y", samples=8, held_out=8)
    with pytest.raises(SystemExit):
        cli.parse(["--latents", "x", "--output", "y", "--steps", "0"])
    assert cli.main(["--latents", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2  # one line, no traceback


def test_cli_trains_and_saves_a_loadable_folder(latent_shards, tmp_path, capsys):
    out = tmp_path / "tiny"
    args = ["--latents", str(latent_shards), "--output", str(out), "--steps", "3", "--samples", "16", "--held-out", "4",
            "--channels", "8", "--blocks", "1", "0", "0"]
    assert cli.main(args) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    decoder = FrozenTinyDecoder(str(out))
    assert decoder.decode(torch.zeros(2, 4, 8, 8)).shape == (2, 3, 32, 32)
