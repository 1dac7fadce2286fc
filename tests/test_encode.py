"""data_tools.encode: latent shards from image shards, 1 vs 2 processes, resume, bad samples."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image

from data_tools import encode
from pipeline.data.images import image_to_tensor
from pipeline.data.latents import latent_meta
from pipeline.data.shards import iter_samples, shard_name, write_tar_atomic
from tests.helpers import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encode_config(tmp_path_factory, tiny_vae_dir, tiny_text_encoders_dir) -> Path:
    text = yaml.safe_load((tiny_text_encoders_dir / "encoders.yaml").read_text())
    text["clip"]["return_tokens"] = True
    cfg = {"vae": {"path": str(tiny_vae_dir)}, "text": text, "batch_size": 5}
    path = tmp_path_factory.mktemp("cfg") / "encode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_encode(image_shards: Path, out: Path, config: Path) -> None:
    assert encode.main(["--input", str(image_shards), "--output", str(out), "--config", str(config)]) == 0


def latent_samples(folder: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(sorted(folder.glob("*.tar")))}


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def test_latent_shards_hold_normalised_latents_and_unpadded_text(image_shards, encode_config, tiny_vae_dir, tmp_path):
    run_encode(image_shards, tmp_path / "lat", encode_config)
    meta = json.loads((tmp_path / "lat/dataset.json").read_text())
    assert meta["samples"] == 48 and meta["latent_shape"] == [4, 8, 8] and meta["latent_dtype"] == "fp16"
    assert meta["vae"]["scaling_factor"] == 0.5 and meta["vae"]["shift_factor"] == 0.1
    stored = meta["config"]["vae"]["path"]  # relative to the latent folder, resolved by the reader
    assert not os.path.isabs(stored) and (tmp_path / "lat" / stored).resolve() == tiny_vae_dir.resolve()
    assert Path(latent_meta(tmp_path / "lat")["config"]["vae"]["path"]).resolve() == tiny_vae_dir.resolve()
    samples = latent_samples(tmp_path / "lat")
    images = {s["__key__"]: s for s in iter_samples(sorted(image_shards.glob("*.tar")))}
    assert set(samples) == set(images)

    key = sorted(samples)[0]
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    pixels = image_to_tensor(Image.open(io.BytesIO(images[key]["png"])).convert("RGB"))
    with torch.no_grad():
        raw = vae.encode(pixels[None]).latent_dist.mode()[0]
    expected = ((raw - 0.1) * 0.5).numpy()
    np.testing.assert_allclose(npy(samples[key]["latent.npy"]), expected, atol=2e-3, rtol=2e-3)  # fp16 storage

    lengths = {npy(s["t5.npy"]).shape[0] for s in samples.values()}
    assert len(lengths) > 1, "T5 embeddings must be stored without padding"
    assert all(npy(s["clip.npy"]).ndim == 1 and npy(s["clip_tokens.npy"]).ndim == 2 for s in samples.values())
    assert all(s["txt"] == images[k]["txt"] for k, s in samples.items())


def test_two_processes_give_the_same_keys(image_shards, encode_config, tmp_path):
    run_encode(image_shards, tmp_path / "one", encode_config)
    cmd = ["-m", "data_tools.encode", "--input", str(image_shards), "--output", str(tmp_path / "two"), "--config", str(encode_config)]
    result = accelerate_launch(cmd, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1/2" in result.stdout and "rank 0/2" in result.stdout
    one, two = latent_samples(tmp_path / "one"), latent_samples(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(two) == 48  # same keys, no duplicates, none missing
    for key in one:
        np.testing.assert_allclose(npy(one[key]["latent.npy"]), npy(two[key]["latent.npy"]), atol=1e-3)


def test_interrupted_encode_resumes(image_shards, encode_config, tmp_path):
    out = tmp_path / "lat"
    run_encode(image_shards, out, encode_config)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / shard_name("latents", 2)).unlink()
    (out / shard_name("latents", 3)).unlink()
    (out / "dataset.json").unlink()
    (out / "latents-000003.tar.tmp-4242").write_bytes(b"partial")
    run_encode(image_shards, out, encode_config)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert not list(out.glob("*.tmp-*")) and json.loads((out / "dataset.json").read_text())["samples"] == 48


def test_bad_samples_are_skipped_and_counted(image_shards, encode_config, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(image_shards, bad)
    samples = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in iter_samples([bad / shard_name("images", 0)])]
    samples[0][1]["png"] = b"not a png"
    write_tar_atomic(bad / shard_name("images", 0), samples)
    (bad / "images-000000_stats.json").unlink()
    run_encode(bad, tmp_path / "lat", encode_config)
    meta = json.loads((tmp_path / "lat/dataset.json").read_text())
    assert meta["samples"] == 47 and meta["skipped"] == {"undecodable_image": 1}


def png_bytes(side: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tars_of_folders_repeated_keys_and_decompression_bombs_are_normalised_or_counted(
        encode_config, tmp_path, monkeypatch):
    """A tar made with ``tar -cf x.tar .`` or of folders (members ``./000001.png``,
    ``part1/000002.png``, ``part.v2/000003.png``), a key seen twice, and an image over PIL's
    decompression-bomb limit: encode normalises the keys, counts the rest, and keeps every valid sample."""
    import tarfile

    from pipeline.data.images import image_loader
    from pipeline.data.stream import LoaderConfig

    members = [("./000001", 32, 0), ("part1/000002", 32, 1), ("part.v2/000003", 32, 2), ("./000001", 32, 3),
               ("000004", 64, 4)]  # 64² = 4096 pixels > 2 × the limit below: PIL refuses it as a bomb
    shard = tmp_path / "in" / shard_name("images", 0)
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, side, value in members:
            for ext, data in (("png", png_bytes(side, value)), ("txt", f"a red square {value}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    run_encode(shard.parent, tmp_path / "lat", encode_config)
    meta = json.loads((tmp_path / "lat/dataset.json").read_text())
    assert meta["skipped"] == {"duplicate_key": 1, "undecodable_image": 1} and meta["samples"] == 3
    assert sorted(latent_samples(tmp_path / "lat")) == ["000001", "part1__000002", "part_v2__000003"]
    loader = image_loader([str(shard)], LoaderConfig(batch_size=2))  # a loader's decode skips and counts the bomb too
    seen = [key for batch in itertools.islice(loader, 3) for key in batch["key"]]  # epoch 0's 5 samples, and 2 more
    assert sorted(seen[:4]) == ["000001", "000001", "part.v2/000003", "part1/000002"]
    assert loader.skipped["undecodable"] in (1, 2) and "beyond_recorded_size" not in loader.skipped  # once an epoch


def test_config_errors_are_one_line(image_shards, tmp_path):
    (tmp_path / "c.yaml").write_text("vae: {path: x}\ntext: {t5: {path: y}}\nbatch_sise: 3\n")
    cmd = [sys.executable, "-m", "data_tools.encode", "--input", str(image_shards), "--output", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "batch_sise" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_preview_decodes_latents_with_the_recorded_vae(image_shards, encode_config, tiny_vae_dir, tmp_path):
    from data_tools import preview_latents

    run_encode(image_shards, tmp_path / "lat", encode_config)
    meta, samples, pixels = preview_latents.decode_first(tmp_path / "lat", 3)
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    raw = torch.stack([s["latent"] for s in samples]).float() / 0.5 + 0.1  # the recorded scale 0.5 and shift 0.1 undone
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(torch.stack(pixels), expected, atol=1e-5, rtol=1e-5)

    assert preview_latents.main([str(tmp_path / "lat"), "--count", "4"]) == 0
    paired = Image.open(tmp_path / "lat/preview.png")
    shutil.move(image_shards, tmp_path / "gone")  # without the input shards: decoded images alone
    try:
        assert preview_latents.main([str(tmp_path / "lat"), "--count", "4", "--output", str(tmp_path / "alone.png")]) == 0
    finally:
        shutil.move(tmp_path / "gone", image_shards)
    assert Image.open(tmp_path / "alone.png").size != paired.size


def test_preview_of_a_folder_without_latents_is_one_line(tmp_path, capsys):
    from data_tools import preview_latents

    assert preview_latents.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no dataset.json" in err
