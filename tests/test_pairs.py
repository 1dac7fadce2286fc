"""data_tools.pairs (paired image shards from shards, folders and tables), pipeline.data.images'
pair reader, and data_tools.encode's source latents."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import pairs
from data_tools.shard import read_samples
from pipeline.data.degradations import parse_degradation
from pipeline.data.images import image_to_tensor, pair_loader
from pipeline.data.shards import complete_shards, write_tar_atomic
from pipeline.data.stream import LoaderConfig
from pipeline.evaluation.synthetic import object_box, render_sample

QUANT = 1 / 127.5 + 1e-6  # one 8-bit step in [-1, 1]


def samples_of(folder: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for tar in complete_shards(folder) for key, members in read_samples(tar)}


def tensor(data: bytes) -> torch.Tensor:
    return image_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))  # (3, H, W)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_source(spec: str, members: dict[str, bytes]) -> None:
    """The stored source is what the degradation makes of the stored target (to 8-bit rounding)."""
    target, source = tensor(members["png"])[None], tensor(members["src.png"])[None]  # (1, 3, H, W)
    mask = None
    if "mask.png" in members:
        mask = (tensor(members["mask.png"])[:1] > 0).float()[None]  # (1, 1, H, W)
        assert 0 < mask.mean() < 1
    expected = parse_degradation(spec).source(target, mask)
    assert (source - expected).abs().max() <= QUANT, spec


def test_shards_with_mixed_degradations(image_shards: Path, tmp_path: Path):
    out = tmp_path / "pairs"
    assert pairs.main(["--input", str(image_shards), "--output", str(out), "--degradation", "grayscale,down4,objects,mask,canny",
                       "--samples-per-shard", "20"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["samples"] == 48 and meta["skipped"] == {} and meta["resolution"] == 32
    assert meta["pairs"] == {"degradations": ["grayscale", "down4", "objects", "mask", "canny"], "input": "shards"}
    assert meta["shard_samples"] == {"pairs-000000.tar": 20, "pairs-000001.tar": 20, "pairs-000002.tar": 8}
    found, inputs = Counter(), samples_of(image_shards)
    for members in samples_of(out).values():
        info = json.loads(members["json"])
        spec = info["pair"]["degradation"]
        found[spec] += 1
        original = inputs[info["pair"]["input_key"]]
        assert members["png"] == original["png"] and members["txt"] == original["txt"]  # the target is the input image
        assert ("mask.png" in members) == (spec == "mask")
        if spec == "objects":
            check_objects(members["src.png"], info["meta"]["objects"])
        else:
            check_source(spec, members)
    assert set(found) == {"grayscale", "down4", "objects", "mask", "canny"} and sum(found.values()) == 48
    again = tmp_path / "again"  # each sample's spec is drawn from its key and the seed: the same on a rerun
    pairs.main(["--input", str(image_shards), "--output", str(again), "--degradation", "grayscale,down4,objects,mask,canny",
                "--samples-per-shard", "48"])
    specs = lambda folder: sorted(tuple(json.loads(m["json"])["pair"].values()) for m in samples_of(folder).values())  # noqa: E731
    assert specs(again) == specs(out)


def check_objects(data: bytes, objects: list[dict]) -> None:
    """Each object's box centre shows its shape class's colour, the corners of the map are black."""
    label = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)
    assert (label[0, 0] == 0).all() and (label[-1, -1] == 0).all()
    for obj in objects:
        x0, y0, x1, y1 = object_box(obj, label.shape[1], label.shape[0])
        assert tuple(label[(y0 + y1) // 2, (x0 + x1) // 2]) == pairs.SHAPE_COLOURS[obj["shape"]]


def test_objects_without_meta_are_counted(tmp_path: Path):
    image, truth = render_sample(0, 32, seed=1)
    with_meta = {"png": png(image), "txt": b"a scene", "json": json.dumps({"meta": truth}).encode()}
    (tmp_path / "in").mkdir()
    write_tar_atomic(tmp_path / "in/00000.tar", [("a", with_meta), ("b", {"png": png(image), "txt": b"no metadata"})])
    assert pairs.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--degradation", "objects"]) == 0
    meta = json.loads((tmp_path / "out/dataset.json").read_text())
    assert meta["samples"] == 1 and meta["skipped"] == {"no_meta": 1}
    stats = json.loads((tmp_path / "out/pairs-000000_stats.json").read_text())
    assert stats["failures"] == {"no_meta": 1} and stats["successes"] == 1


def scene(index: int, size: int = 32) -> Image.Image:
    return render_sample(index, size, seed=3)[0]


def test_real_pairs_folder_counts_bad_pairs_and_keeps_the_rest(tmp_path: Path):
    root = tmp_path / "real"
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    for i in range(5):
        scene(i).save(root / f"target/p{i}.png")
        scene(i).convert("L").save(root / f"source/p{i}.jpg", quality=95)  # real grayscale photos, another format
    (root / "target/p0.txt").write_text("a caption\n")
    (root / "source/p3.jpg").unlink()
    scene(9, 24).save(root / "source/p3.png")  # p3: a 24 px source for a 32 px target
    (root / "source/p4.jpg").write_bytes(b"not an image")
    scene(7).save(root / "target/lonely.png")  # no source
    assert pairs.main(["--folder", str(root), "--output", str(tmp_path / "out"), "--degradation", "grayscale"]) == 0
    meta = json.loads((tmp_path / "out/dataset.json").read_text())
    assert meta["samples"] == 3
    assert meta["skipped"] == {"missing_source": 1, "size_mismatch": 1, "unreadable_source": 1}
    assert meta["pairs"] == {"degradations": ["grayscale"], "input": "folder"}
    written = {json.loads(m["json"])["pair"]["input_key"]: m for m in samples_of(tmp_path / "out").values()}
    assert sorted(written) == ["p0", "p1", "p2"]
    assert written["p0"]["txt"] == b"a caption" and written["p1"]["txt"] == b""
    for name, members in written.items():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["png"]))), np.asarray(scene(int(name[1]))))
        source = np.asarray(Image.open(io.BytesIO(members["src.png"])), dtype=int)  # (H, W, 3)
        stored = np.asarray(Image.open(root / f"source/{name}.jpg").convert("RGB"), dtype=int)
        assert np.array_equal(source, stored)


def test_table_of_pairs(tmp_path: Path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        scene(i).save(tmp_path / f"img/t{i}.png")
        scene(i).resize((8, 8)).resize((32, 32), Image.Resampling.BICUBIC).save(tmp_path / f"img/s{i}.png")
        rows.append({"src": f"img/s{i}.png", "tgt": f"img/t{i}.png", "caption": f"scene {i}"})
    rows.append({"src": "img/s0.png", "tgt": "img/absent.png", "caption": "gone"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["src", "tgt", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    args = ["--table", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "out"), "--source-column", "src", "--target-column", "tgt"]
    assert pairs.main([*args, "--degradation", "down4", "--resolution", "16"]) == 0
    meta = json.loads((tmp_path / "out/dataset.json").read_text())
    assert meta["samples"] == 4 and meta["skipped"] == {"missing_target": 1} and meta["resolution"] == 16
    written = samples_of(tmp_path / "out")
    assert sorted(m["txt"].decode() for m in written.values()) == [f"scene {i}" for i in range(4)]
    assert {Image.open(io.BytesIO(m["src.png"])).size for m in written.values()} == {(16, 16)}
    with pytest.raises(SystemExit) as info:  # a column that is not there: one config-error line
        pairs.main(["--table", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "bad")])
    assert info.value.code == 2


def test_pair_loader_batches(paired_image_shards: Path):
    loader = pair_loader(paired_image_shards, LoaderConfig(batch_size=8, shuffle_buffer=16))
    batches = list(itertools.islice(loader, 6))  # 48 samples: one epoch
    assert {k: tuple(v.shape) for k, v in batches[0].items() if torch.is_tensor(v)} == {
        "image": (8, 3, 32, 32), "source": (8, 3, 32, 32), "mask": (8, 1, 32, 32)}
    assert len({k for b in batches for k in b["key"]}) == 48
    specs = {k: json.loads(m["json"])["pair"]["degradation"] for k, m in samples_of(paired_image_shards).items()}
    assert 0 < Counter(specs.values())["grayscale"] < 48
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            expected = parse_degradation(specs[key]).source(batch["image"][i : i + 1])[0]  # (3, H, W)
            assert (batch["source"][i] - expected).abs().max() <= QUANT, key


def test_encode_writes_source_latents(paired_latents: Path, paired_image_shards: Path, latent_shards: Path, tiny_vae_dir: Path):
    from pipeline.data.latents import collate_latents, decode_latent_sample, latent_meta
    from pipeline.encoders.vae import FrozenVAE, VAEConfig

    meta = latent_meta(paired_latents)
    assert meta["image_condition"] == {"degradations": ["grayscale", "down4"]} and meta["samples"] == 48
    assert "image_condition" not in latent_meta(latent_shards)  # the plain path: unchanged
    assert all("src_latent.npy" not in m for m in samples_of(latent_shards).values())
    raws = [{"__key__": k, **m} for k, m in itertools.islice(samples_of(paired_latents).items(), 8)]
    batch = collate_latents([decode_latent_sample(r) for r in raws])
    assert batch["src_latent"].shape == batch["latent"].shape == (8, 4, 8, 8)
    images = samples_of(paired_image_shards)
    sources = torch.stack([tensor(images[r["__key__"]]["src.png"]) for r in raws])  # (8, 3, 32, 32)
    vae = FrozenVAE(VAEConfig(path=tiny_vae_dir), torch.device("cpu"))
    with torch.no_grad():
        direct = vae.encode(sources)  # (8, 4, 8, 8)
        stored, target = batch["src_latent"].float(), batch["latent"].float()
        assert (stored - direct).abs().max() < 2e-2 * direct.abs().max()  # the source's own latent, fp16-stored
        decoded, round_trip, from_target = vae.decode(stored), vae.decode(direct), vae.decode(target)
    psnr = lambda a, b: (10 * torch.log10(4 / (a - b).pow(2).mean())).item()  # noqa: E731  (range 2: peak² = 4)
    assert psnr(decoded, round_trip) > 40  # decodes as the source's round trip through the VAE
    assert psnr(decoded, round_trip) > psnr(from_target, round_trip) + 10  # and not as the target's
