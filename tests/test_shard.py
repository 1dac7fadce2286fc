"""data_tools.shard end to end: every bad input counted, every valid pair written, plain
webdataset reads the result, resume after interruption equals an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_tools import shard
from tests import imagebytes as ib

ROOT = Path(__file__).resolve().parents[1]

VALID = {  # name -> image bytes; each gets a good same-stem caption
    "ok_red.jpg": ib.solid_jpeg(),
    "ok_blue.png": ib.solid_png(),
    "cmyk.jpg": ib.cmyk_jpeg(),
    "rgba.png": ib.rgba_png(),
    "la.png": ib.la_png(),
    "palette.png": ib.palette_transparent_png(),
    "gray16.png": ib.png16_gray((32, 32)),
    "rgb16.png": ib.png16_rgb((32, 32)),
    "exif.jpg": ib.exif_rotated_jpeg(),
    "sub/dir/nested.jpg": ib.solid_jpeg((50, 50), ib.GREEN),
    "twin.jpg": ib.solid_jpeg((48, 48)),  # two images, one stem, one caption: both kept
    "twin.png": ib.solid_png((48, 48)),
}
BAD_IMAGES = {  # name -> (image bytes, reason)
    "empty.jpg": (b"", "empty_file"),
    "truncated.jpg": (ib.truncated_jpeg(), "truncated_image"),
    "webpage.jpg": (ib.html_page(), "not_an_image"),
    "bomb.png": (ib.bomb_png(), "decompression_bomb"),
    "tiny.png": (ib.solid_png((16, 16)), "too_small"),
    "wide.png": (ib.solid_png((240, 30)), "bad_aspect"),
}
BAD_CAPTIONS = {  # image name -> (caption bytes, reason)
    "latin1.jpg": (b"caf\xe9 au lait \xff", "caption_not_utf8"),
    "blank.jpg": (b"  \n\t ", "empty_caption"),
}
OPTIONS = ["--resolution", "24", "--min-size", "24", "--max-aspect", "4", "--samples-per-shard", "5"]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def mixed_folder(root: Path) -> tuple[set[str], Counter]:
    """Valid pairs mixed with every bad input; returns (valid sources, expected skipped counts)."""
    for name, data in VALID.items():
        write(root / name, data)
        write((root / name).with_suffix(".txt"), f"a picture called {Path(name).stem}".encode())
    write(root / "json_caption.png", ib.solid_png((30, 30)))  # caption from a same-stem .json
    write(root / "json_caption.json", json.dumps({"caption": "from json", "id": 7}).encode())
    skipped = Counter()
    for name, (data, why) in BAD_IMAGES.items():
        write(root / name, data)
        write((root / name).with_suffix(".txt"), b"a caption")
        skipped[why] += 1
    for name, (caption, why) in BAD_CAPTIONS.items():
        write(root / name, ib.solid_jpeg())
        write((root / name).with_suffix(".txt"), caption)
        skipped[why] += 1
    write(root / "no_caption.jpg", ib.solid_jpeg())
    write(root / "no_image.txt", b"a caption whose image is missing")
    skipped.update({"missing_caption": 1, "caption_without_image": 1})
    return set(VALID) | {"json_caption.png"}, skipped


def read_shards(folder: Path) -> list[dict]:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_tools.shard", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_mixed_folder_writes_every_valid_pair_and_counts_the_rest(tmp_path):
    valid, skipped = mixed_folder(tmp_path / "in")
    result = run_cli("--input", tmp_path / "in", "--output", tmp_path / "out", *OPTIONS)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/dataset.json").read_text())
    assert summary["samples"] == len(valid)
    assert summary["skipped"] == dict(skipped)
    assert summary["warnings"] == {"duplicate_stem": 1}
    assert "wrote 13 samples" in result.stdout and "images/s" in result.stdout

    samples = read_shards(tmp_path / "out")
    sources = {json.loads(s["json"])["source"] for s in samples}
    assert sources == valid
    for s in samples:
        meta = json.loads(s["json"])
        assert Image.open(io.BytesIO(s["jpg"])).size == (24, 24)
        assert s["txt"].decode() == meta["caption"] and meta["key"] == s["__key__"]
    by_source = {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in samples}
    assert by_source["json_caption.png"]["caption"] == "from json"
    assert by_source["json_caption.png"]["meta"]["id"] == 7
    assert (by_source["exif.jpg"]["original_width"], by_source["exif.jpg"]["original_height"]) == (30, 60)


def test_stats_files_match_the_tars(tmp_path):
    mixed_folder(tmp_path / "in")
    assert shard.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPTIONS]) == 0
    tars = sorted((tmp_path / "out").glob("images-*.tar"))
    assert len(tars) == 5  # 21 candidates (13 valid, 8 bad), 5 per shard
    for tar in tars:
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        assert stats["successes"] == len(read_shards_of(tar))
        assert stats["count"] == stats["successes"] + stats["failed"]


def read_shards_of(tar: Path) -> list[dict]:
    return list(wds.WebDataset([str(tar)], shardshuffle=False, empty_check=False))


def manifest_inputs(root: Path) -> None:
    for i in range(4):
        write(root / "img" / f"{i}.png", ib.solid_png((32, 32)))


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifests(tmp_path, kind):
    root = tmp_path / "in"
    manifest_inputs(root)
    rows = [
        ("img/0.png", "zero"),
        ("img/1.png", "one"),
        ("img/missing.png", "a file that is not there"),
        ("img/2.png", "   "),
        ("img/3.png", "three"),
    ]
    path = root / f"list.{kind}"
    if kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        lines = [f"file_name{sep}text"] + [f"{p}{sep}{c}" for p, c in rows]
        write(path, ("\n".join(lines) + "\n").encode() + b"img/3.png" + sep.encode() + b"bad \xff\xfe\n")
        expected = {"missing_file": 1, "empty_caption": 1, "caption_not_utf8": 1}
    elif kind == "jsonl":
        lines = [json.dumps({"file_name": p, "text": c}) for p, c in rows] + ["{not json"]
        write(path, ("\n".join(lines) + "\n").encode())
        expected = {"missing_file": 1, "empty_caption": 1, "bad_manifest_row": 1}
    else:
        pq.write_table(pa.table({"file_name": [p for p, _ in rows], "text": [c for _, c in rows]}), path)
        expected = {"missing_file": 1, "empty_caption": 1}
    assert shard.main(["--input", str(path), "--output", str(tmp_path / "out"), "--resolution", "16"]) == 0
    summary = json.loads((tmp_path / "out/dataset.json").read_text())
    assert summary["samples"] == 3 and summary["skipped"] == expected
    captions = sorted(s["txt"].decode() for s in read_shards(tmp_path / "out"))
    assert captions == ["one", "three", "zero"]


def test_manifest_columns_can_be_named_and_are_checked(tmp_path):
    manifest_inputs(tmp_path)
    write(tmp_path / "m.csv", b"pic,words\nimg/0.png,hello\n")
    out = tmp_path / "out"
    assert shard.main(["--input", str(tmp_path / "m.csv"), "--output", str(out), "--image-column", "pic", "--caption-column", "words"]) == 0
    result = run_cli("--input", tmp_path / "m.csv", "--output", tmp_path / "out2")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--image-column" in result.stderr


def test_interrupted_run_resumes_to_identical_shards(tmp_path):
    mixed_folder(tmp_path / "in")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    args = ["--input", str(tmp_path / "in"), *OPTIONS, "--dedup"]
    assert shard.main([*args, "--output", str(clean)]) == 0
    assert shard.main([*args, "--output", str(resumed), "--max-shards", "2"]) == 0
    assert len(list(resumed.glob("*.tar"))) == 2 and not (resumed / "dataset.json").exists()
    (resumed / "images-000003.tar.tmp-999").write_bytes(b"half a shard")  # left by a crash
    assert shard.main([*args, "--output", str(resumed)]) == 0
    assert tar_bytes(resumed) == tar_bytes(clean)
    assert not list(resumed.glob("*.tmp-*"))
    done, full = (json.loads((d / "dataset.json").read_text()) for d in (resumed, clean))
    assert (done["samples"], done["skipped"]) == (full["samples"], full["skipped"])


def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    for i in range(90):
        write(tmp_path / "in" / f"{i:03d}.jpg", ib.noisy_jpeg((192, 192), seed=i))
        write(tmp_path / "in" / f"{i:03d}.txt", f"noise number {i}".encode())
    args = ["--input", tmp_path / "in", "--resolution", "64", "--samples-per-shard", "3"]
    cmd = [sys.executable, "-m", "data_tools.shard", *map(str, args), "--output", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((tmp_path / "killed").glob("*.tar"))) < 30, "finished before it could be killed"
    assert run_cli(*args, "--output", tmp_path / "killed").returncode == 0
    assert run_cli(*args, "--output", tmp_path / "clean").returncode == 0
    assert tar_bytes(tmp_path / "killed") == tar_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "killed/dataset.json").read_text())["samples"] == 90


def test_two_workers_write_the_same_shards_as_one(tmp_path):
    mixed_folder(tmp_path / "in")
    args = ["--input", str(tmp_path / "in"), *OPTIONS]
    assert shard.main([*args, "--output", str(tmp_path / "one")]) == 0
    assert shard.main([*args, "--output", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert tar_bytes(tmp_path / "one") == tar_bytes(tmp_path / "two")


def test_dedup_counts_duplicates_across_shards(tmp_path):
    for i in range(6):
        write(tmp_path / "in" / f"{i}.png", ib.solid_png((32, 32), (i * 40, 0, 0)))
        write(tmp_path / "in" / f"{i}.txt", b"x")
    write(tmp_path / "in" / "copy.png", ib.solid_png((32, 32), (0, 0, 0)))
    write(tmp_path / "in" / "copy.txt", b"same bytes as 0.png")
    args = ["--input", str(tmp_path / "in"), "--resolution", "16", "--samples-per-shard", "2"]
    assert shard.main([*args, "--output", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a/dataset.json").read_text())["samples"] == 7
    assert shard.main([*args, "--output", str(tmp_path / "b"), "--dedup"]) == 0
    summary = json.loads((tmp_path / "b/dataset.json").read_text())
    assert (summary["samples"], summary["skipped"]) == (6, {"duplicate": 1})
    hashed = {run: {"sha256" in json.loads(s["json"]) for s in read_shards(tmp_path / run)} for run in "ab"}
    assert hashed == {"a": {False}, "b": {True}}  # the image bytes are hashed only for --dedup
    assert shard.main([*args, "--output", str(tmp_path / "c"), "--dedup", "--workers", "2"]) == 0  # whole shards per worker
    assert tar_bytes(tmp_path / "c") == tar_bytes(tmp_path / "b")
    assert json.loads((tmp_path / "c/dataset.json").read_text())["skipped"] == {"duplicate": 1}


def test_other_options_into_the_same_output_is_refused(tmp_path):
    mixed_folder(tmp_path / "in")
    assert shard.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPTIONS]) == 0
    result = run_cli("--input", tmp_path / "in", "--output", tmp_path / "out", "--resolution", "32")
    assert result.returncode == 2 and "other input or options" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags,named",
    [(["--quality", "0"], "quality"), (["--samples-per-shard", "0"], "samples_per_shard"), (["--max-aspect", "0.5"], "max_aspect")],
)
def test_bad_options_are_one_line(tmp_path, flags, named):
    result = run_cli("--input", tmp_path, "--output", tmp_path / "out", *flags)
    assert result.returncode == 2 and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_input_is_one_line(tmp_path):
    result = run_cli("--input", tmp_path / "nope", "--output", tmp_path / "out")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_start_up_imports_no_torch():
    """The command's start-up counts in its speed (benchmarks/shard_throughput.py): importing torch
    (through webdataset, the loader or the training helpers) costs more than sharding 300 images."""
    code = "import sys, data_tools.shard; print(sorted(m for m in ('torch', 'webdataset', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tar_keys_split_as_webdataset_splits_them():
    """pipeline.data.tars keeps webdataset's key/extension split without importing webdataset (torch)."""
    from webdataset.tariterators import base_plus_ext as theirs

    from pipeline.data.tars import base_plus_ext

    names = ["000001.jpg", "part1/000001.seg.png", "./x.json", "noext", "dir.v2/file.txt", ".hidden", "a/.b.c", "k.tar.gz"]
    assert [base_plus_ext(n) for n in names] == [theirs(n) for n in names]


def test_discovered_image_paths_are_resolved_through_links(tmp_path):
    """Candidates carry each image's resolved path (the plan's fingerprint hashes it): an input
    folder reached through a link, and an image that is itself a link to a file elsewhere,
    resolve as ``Path.resolve`` does; the root is resolved once, not each file."""
    from data_tools.sources import discover

    real, elsewhere = tmp_path / "real", tmp_path / "elsewhere"
    write(real / "a.jpg", ib.solid_jpeg())
    write(real / "sub" / "b.jpg", ib.solid_jpeg())
    write(elsewhere / "target.jpg", ib.solid_jpeg())
    (real / "c.jpg").symlink_to(elsewhere / "target.jpg")
    for stem in ("a", "sub/b", "c"):
        write(real / f"{stem}.txt", b"a caption")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    found = discover(tmp_path / "link")
    assert {c.source: c.image for c in found.candidates} == {
        "a.jpg": str((real / "a.jpg").resolve()), "c.jpg": str((elsewhere / "target.jpg").resolve()),
        "sub/b.jpg": str((real / "sub" / "b.jpg").resolve())}
    assert "link" not in "".join(c.image for c in found.candidates)
