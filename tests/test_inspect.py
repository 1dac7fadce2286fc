"""Tests of ``data_tools.inspect`` on small shards built here with ``tarfile``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageFont

from data_tools.inspect import inspect_shards, main
from pipeline.figures.sheets import MAX_CAPTION_LINES, contact_sheet, wrap

REPO = Path(__file__).resolve().parents[1]


def png_bytes(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(key: str, caption: str = "a small red circle at the center") -> dict[str, bytes]:
    image = png_bytes()
    meta = {"key": key, "source": f"{key}.png", "width": 32, "height": 32, "original_width": 64,
            "original_height": 64, "sha256": "0" * 64, "caption": caption}
    return {"png": image, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode()}


def write_shard(
    directory: Path, index: int, samples: list[tuple[str, dict[str, bytes]]], successes: int | None = None
) -> None:
    """``images-{index:06d}.tar`` with the given members, plus its ``_stats.json``."""
    with tarfile.open(directory / f"images-{index:06d}.tar", "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    count = len(samples) if successes is None else successes
    stats = {"count": count, "successes": count, "failed": 0, "failures": {}}
    (directory / f"images-{index:06d}_stats.json").write_text(json.dumps(stats))


def write_dataset_json(directory: Path, samples: int) -> None:
    (directory / "dataset.json").write_text(json.dumps({"kind": "image_shards", "samples": samples, "skipped": {}}))


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    for shard in range(2):
        write_shard(tmp_path, shard, [(f"{shard:06d}{i:06d}", make_sample(f"{shard}{i}")) for i in range(5)])
    write_dataset_json(tmp_path, 10)
    (tmp_path / "images-000002.tar.tmp-123").write_bytes(b"partial garbage")
    return tmp_path


def test_valid_shards(good_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(good_dir), "--samples", "6", "--columns", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 2 and summary["samples"] == 10 and summary["valid"] == 10
    assert summary["invalid_by_reason"] == {} and summary["counts_match"] is True and summary["ok"]
    assert summary["width"] == {"min": 32, "mean": 32, "max": 32}
    assert summary["caption_words"]["mean"] == 7
    assert json.loads((good_dir / "inspect.json").read_text())["samples"] == 10
    with Image.open(good_dir / "contact_sheet.png") as sheet:
        width, height = sheet.size
    assert 3 * 128 <= width <= 3 * 128 + 3 * 40  # three tiles of 128 px plus padding
    assert 2 * 128 <= height <= 2 * (128 + 100)  # two rows, each with a caption


def test_invalid_samples_are_counted_by_reason(tmp_path: Path) -> None:
    corrupt = make_sample("b")
    corrupt["png"] = corrupt["png"][: len(corrupt["png"]) // 2]
    no_caption = make_sample("d")
    del no_caption["txt"]
    not_utf8 = make_sample("e")
    not_utf8["txt"] = b"\xff\xfe caption"
    no_image = make_sample("f")
    del no_image["png"]
    samples = [("a", make_sample("a")), ("b", corrupt), ("c", make_sample("c", caption="  \n")),
               ("d", no_caption), ("e", not_utf8), ("f", no_image)]
    write_shard(tmp_path, 0, samples)
    write_dataset_json(tmp_path, 6)
    summary = inspect_shards(tmp_path)
    assert summary["samples"] == 6 and summary["valid"] == 1 and summary["invalid"] == 5
    assert summary["invalid_by_reason"] == {
        "no_image": 1, "undecodable_image": 1, "no_caption": 1, "empty_caption": 1, "caption_not_utf8": 1
    }
    assert summary["counts_match"] is True and not summary["ok"]
    assert main([str(tmp_path)]) == 1


def test_count_mismatch_is_reported(good_dir: Path, capsys: pytest.CaptureFixture) -> None:
    write_dataset_json(good_dir, 12)
    assert main([str(good_dir), "--samples", "0"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "12" in out
    summary = json.loads((good_dir / "inspect.json").read_text())
    assert summary["counts_match"] is False and summary["valid"] == 10 and summary["contact_sheet"] is None


def test_stats_mismatch_and_missing_dataset_json(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [("a", make_sample("a"))], successes=3)
    summary = inspect_shards(tmp_path, samples=0)
    assert not summary["ok"] and summary["expected_samples"] is None
    assert any("3 successes" in p for p in summary["problems"])
    assert any("dataset.json" in w for w in summary["warnings"])


def test_truncated_shard_is_a_problem(good_dir: Path) -> None:
    tar = good_dir / "images-000001.tar"
    tar.write_bytes(tar.read_bytes()[: 512 + 40])  # inside the first member's data
    summary = inspect_shards(good_dir, samples=0)
    assert not summary["ok"] and summary["counts_match"] is False
    assert any(p.startswith("images-000001.tar: unreadable") for p in summary["problems"])


def test_empty_directory_fails(tmp_path: Path) -> None:
    summary = inspect_shards(tmp_path)
    assert summary["shards"] == 0 and not summary["ok"]


def test_seeded_sheet_is_deterministic(good_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one.png", tmp_path / "two.png"
    inspect_shards(good_dir, first, samples=4, seed=3)
    inspect_shards(good_dir, second, samples=4, seed=3)
    assert first.read_bytes() == second.read_bytes()


def test_contact_sheet_upscales_and_wraps(tmp_path: Path) -> None:
    tiny = Image.new("RGB", (16, 8), (0, 0, 255))
    caption = "word " * 40 + "x" * 200
    sheet = contact_sheet([(tiny, caption), (tiny, "short")], tmp_path / "sheet.png", columns=4)
    assert sheet.width >= 2 * 128 and sheet.getpixel((8 + 64, 8 + 64)) == (0, 0, 255)
    font = ImageFont.load_default()
    lines = wrap(caption, font, 128)
    assert len(lines) == MAX_CAPTION_LINES and lines[-1].endswith("...")
    assert all(0 < font.getlength(line) <= 128 for line in lines)


def test_cli_subprocess(good_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.inspect", str(good_dir), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 10
