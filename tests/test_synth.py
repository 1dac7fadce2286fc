"""Tests of ``data_tools.synth``: determinism, vocabulary, layout and the rendered pixels."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.synth import generate, main
from pipeline.evaluation.synthetic import BACKGROUNDS, COLOURS, NOVEL_COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, render_sample

REPO = Path(__file__).resolve().parents[1]


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def overlap(a: list[int], b: list[int]) -> bool:
    """Half-open boxes ``[x0, y0, x1, y1)`` share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", count=12, resolution=32, seed=5, second_object_prob=0.5)
    generate(tmp_path / "b", count=12, resolution=32, seed=5, second_object_prob=0.5)
    first, second = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len(first) == 3 * 12 + 1 and "dataset.json" in first
    assert first == second


def test_sample_does_not_depend_on_count_but_on_seed(tmp_path: Path) -> None:
    generate(tmp_path / "few", count=3, resolution=24, seed=7)
    generate(tmp_path / "many", count=9, resolution=24, seed=7)
    few, many = files_of(tmp_path / "few"), files_of(tmp_path / "many")
    for name in few:
        if name != "dataset.json":
            assert few[name] == many[name], name
    other_seed = [render_sample(i, 24, 8, 0.25)[1]["caption"] for i in range(9)]
    assert other_seed != [json.loads(many[f"{i:06d}.json"])["caption"] for i in range(9)]


def test_vocabulary() -> None:
    assert len(COLOURS) >= 8 and len(SHAPES) == 4 and set(SIZES) == {"small", "large"}
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}
    assert min(math.dist(a, b) for a, b in itertools.combinations(PALETTE.values(), 2)) >= 100
    assert not set(NOVEL_COLOURS) & set(COLOURS) and set(PALETTE) == set(COLOURS) | set(NOVEL_COLOURS)
    assert min(math.dist(c, b) for c in PALETTE.values() for b in BACKGROUNDS.values()) >= 100


def test_files_and_dataset_json(tmp_path: Path) -> None:
    generate(tmp_path, count=4, resolution=40, seed=1, second_object_prob=0.3)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["kind"] == "synthetic_images" and dataset["created_by"] == "data_tools.synth"
    assert (dataset["count"], dataset["resolution"], dataset["seed"], dataset["second_object_prob"]) == (4, 40, 1, 0.3)
    assert dataset["vocabulary"]["colours"]["red"] == list(COLOURS["red"])
    truth = json.loads((tmp_path / "000002.json").read_text())
    assert (tmp_path / "000002.txt").read_text(encoding="utf-8") == truth["caption"]
    assert (truth["index"], truth["seed"], truth["resolution"]) == (2, 1, 40)
    with Image.open(tmp_path / "000002.png") as image:
        assert image.size == (40, 40) and image.mode == "RGB"


@pytest.mark.parametrize("second_object_prob", [0.0, 1.0])
def test_captions_name_the_attributes(second_object_prob: float) -> None:
    for index in range(50):
        _, truth = render_sample(index, 32, 3, second_object_prob)
        assert len(truth["objects"]) == (1 if second_object_prob == 0 else 2)
        assert truth["caption"].endswith(f"{truth['background']} background")
        for obj in truth["objects"]:
            assert f"a {obj['size']} {obj['colour']} {obj['shape']} at the {obj['position']}" in truth["caption"]
            assert obj["rgb"] == list(COLOURS[obj["colour"]])


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_two_objects_never_overlap(resolution: int) -> None:
    for index in range(200):
        _, truth = render_sample(index, resolution, 11, 1.0)
        a, b = truth["objects"]
        assert a["position"] != b["position"]
        assert not overlap(a["bbox"], b["bbox"]), (index, a, b)
        if "center" in (a["position"], b["position"]):
            assert a["size"] == b["size"] == "small"


def test_pixels_match_the_ground_truth() -> None:
    corners = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
    for index in range(100):
        image, truth = render_sample(index, 32, 2, 0.5)
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))  # every shape covers its box centre
            assert math.dist(centre, obj["rgb"]) < 30, (index, obj, centre)
        occupied = {o["position"] for o in truth["objects"]}
        for name, (cx, cy) in corners.items():
            if name not in occupied:
                assert image.getpixel((cx * 31, cy * 31)) == tuple(truth["background_rgb"])


def test_squares_fill_their_bbox_exactly() -> None:
    for index in range(80):
        image, truth = render_sample(index, 32, 6, 0.0)
        obj = truth["objects"][0]
        if obj["shape"] == "square":
            x0, y0, x1, y1 = obj["bbox"]
            pixels = np.array(image)
            assert (pixels[y0:y1, x0:x1] == obj["rgb"]).all()
            pixels[y0:y1, x0:x1] = truth["background_rgb"]
            assert (pixels == truth["background_rgb"]).all()


def test_sizes_differ_in_area() -> None:
    areas = {}
    for index in range(60):
        image, truth = render_sample(index, 64, 4, 0.0)
        obj = truth["objects"][0]
        if obj["shape"] == "square":
            differs = (np.asarray(image) != np.array(truth["background_rgb"], dtype=np.uint8)).any(axis=-1)
            areas.setdefault(obj["size"], int(differs.sum()))
    assert areas["large"] > 3 * areas["small"]


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture) -> None:
    bad = {"--count": ["--count", "0"], "--resolution": ["--count", "2", "--resolution", "8"],
           "--second-object-prob": ["--count", "2", "--second-object-prob", "1.5"],
           "--concept-prob": ["--count", "2", "--concept", "mint", "--concept-prob", "-0.1"],
           "--underspecify": ["--count", "2", "--underspecify", "2"]}
    for flag, argv in bad.items():
        with pytest.raises(SystemExit) as exc:
            main(["--output", "/nonexistent/never-written", *argv])
        assert exc.value.code == 2
        assert f"error: {flag} must be" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_subprocess(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.synth", "--output", str(tmp_path), "--count", "5",
         "--resolution", "32", "--seed", "3", "--second-object-prob", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"wrote 5 samples to {tmp_path}"
    assert len(list(tmp_path.glob("*.png"))) == 5
    assert len(json.loads((tmp_path / "000004.json").read_text())["objects"]) == 2


def test_aspects_draw_non_square_scenes_without_changing_the_scene(tmp_path):
    sizes = set()
    for index in range(30):
        image, wide = render_sample(index, 32, 9, 0.5, aspects=(0.5, 1.0, 2.0))
        assert image.size == tuple(wide["size"]) and image.size[0] % 8 == 0 and image.size[1] % 8 == 0
        assert wide["caption"] == render_sample(index, 32, 9, 0.5)[1]["caption"]
        for obj in wide["objects"]:  # square objects, inside the image
            x0, y0, x1, y1 = obj["bbox"]
            assert x1 - x0 == y1 - y0 and x0 >= 0 and y0 >= 0 and x1 <= image.size[0] and y1 <= image.size[1]
        sizes.add(image.size)
    assert sizes == {(24, 48), (32, 32), (48, 24)}
    assert main(["--output", str(tmp_path), "--count", "2", "--aspect", "0.5,2"]) == 0
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--count", "2", "--aspect", "0.5,9"])


def test_a_concept_recolours_the_same_scenes_and_default_scenes_never_use_it(tmp_path):
    plain = [render_sample(i, 32, 4, 0.5)[1] for i in range(200)]
    assert not any(o["colour"] in NOVEL_COLOURS for t in plain for o in t["objects"])  # held out of default data
    half = [render_sample(i, 32, 4, 0.5, concept="mint", concept_prob=0.5)[1] for i in range(200)]
    painted = 0
    for a, b in zip(plain, half):  # same scene; some objects recoloured, their pixels with them
        assert [{**o, "colour": None, "rgb": None} for o in a["objects"]] == [{**o, "colour": None, "rgb": None} for o in b["objects"]]
        for before, after in zip(a["objects"], b["objects"]):
            assert after["colour"] in (before["colour"], "mint")
            painted += after["colour"] == "mint"
            assert after["rgb"] == list(PALETTE[after["colour"]])
    assert 0.4 < painted / sum(len(t["objects"]) for t in half) < 0.6
    image, truth = render_sample(0, 32, 4, 0.5, concept="mint", concept_prob=1.0)
    assert " mint " in truth["caption"]
    x0, y0, x1, y1 = truth["objects"][0]["bbox"]
    centre = np.asarray(image)[(y0 + y1) // 2, (x0 + x1) // 2]
    assert tuple(centre) == NOVEL_COLOURS["mint"]
    with pytest.raises(ValueError, match="concept must be one of"):
        render_sample(0, 32, 4, concept="red")
    assert main(["--output", str(tmp_path), "--count", "3", "--concept", "mint"]) == 0
    assert json.loads((tmp_path / "dataset.json").read_text())["concept"] == "mint"


def test_underspecified_captions_leave_one_attribute_out_and_keep_the_image():
    counts: dict = {}
    for i in range(400):
        full_image, full = render_sample(i, 32, 6, 0.5)
        image, truth = render_sample(i, 32, 6, 0.5, underspecify=0.5, unnameable=("colour", "background"))
        assert np.array_equal(np.asarray(image), np.asarray(full_image)) and truth["objects"] == full["objects"]
        unnamed = truth["unnamed"]
        counts[unnamed] = counts.get(unnamed, 0) + 1
        words = truth["caption"].split()
        if unnamed is None:
            assert truth["caption"] == full["caption"]
        elif unnamed == "colour":
            named = truth["caption"].split(" on a")[0].split()  # the objects' words ("dark green" is a background)
            assert not set(named) & set(PALETTE) and truth["caption"].endswith(f"{full['background']} background")
        else:
            assert "background" not in words and truth["caption"] == full["caption"].split(" on a")[0]
    assert set(counts) == {None, "colour", "background"}
    assert 0.43 < counts[None] / 400 < 0.57
    sizes = render_sample(3, 32, 6, 1.0, underspecify=1.0, unnameable=("size",))[1]["caption"]
    assert not {"small", "large"} & set(sizes.split())
    places = render_sample(3, 32, 6, 1.0, underspecify=1.0, unnameable=("position",))[1]["caption"]
    assert " at the " not in places and places.count(" and ") == 1
