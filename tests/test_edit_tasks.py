"""The inverse-problem tasks of ``pipeline.evaluate_edits`` (colourise, sr4, edges, deblur): their
cases, their scores, LPIPS from a real torchvision weights file, and the report command on the
tiny teacher (tables, sheets, a pix2pix generator on the tasks it was trained for)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from pipeline.data.degradations import parse_degradation
from pipeline.data.images import image_to_tensor
from pipeline.evaluation import lpips as lpips_module
from pipeline.evaluation.edit_cases import INVERSE_TASKS, TASK_DEGRADATIONS, edit_cases
from pipeline.evaluation.edit_eval import score_inverse
from pipeline.evaluation.edit_report import main


@pytest.fixture
def no_alexnet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def random_alexnet(tmp_path, monkeypatch):
    """Random AlexNet weights saved where torchvision's loader looks, in its own format (a state
    dict of every key and shape). LPIPS reads the convolutional features only: the classifier's
    58 M weights are saved as one zero broadcast to their shapes, so the file stays small."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = lpips_module.alexnet_path()
    path.parent.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = torchvision.models.alexnet(weights=None).features.state_dict()
    shapes = {"classifier.1": (4096, 256 * 6 * 6), "classifier.4": (4096, 4096), "classifier.6": (1000, 4096)}
    classifier = {f"{name}.{kind}": torch.zeros(1).expand(shape if kind == "weight" else shape[:1])
                  for name, shape in shapes.items() for kind in ("weight", "bias")}
    torch.save({**{f"features.{k}": v for k, v in features.items()}, **classifier}, path)
    return path


@pytest.mark.parametrize("task", INVERSE_TASKS)
def test_cases_are_deterministic_and_measure_their_render(task):
    first, again = edit_cases(task, 2, 32, seed=11), edit_cases(task, 2, 32, seed=11)
    deg = parse_degradation(TASK_DEGRADATIONS[task])
    for a, b in zip(first, again):
        assert a.image.tobytes() == b.image.tobytes() and torch.equal(a.measurement, b.measurement)
        assert a.degradation == TASK_DEGRADATIONS[task] and a.image.size == a.reference.size == (32, 32)
        exact = deg.measure(image_to_tensor(a.reference)[None])[0]  # y on the 8-bit grid: within half a level of A(x)
        assert (a.measurement - exact).abs().max() <= 1 / 255 + 1e-6
        assert torch.equal(a.measurement, ((a.measurement + 1) * 127.5).round() / 127.5 - 1)
    assert first[0].prompt != first[1].prompt


@pytest.mark.parametrize("task", INVERSE_TASKS)
def test_the_target_scores_perfectly_and_a_wrong_image_does_not(task, no_alexnet):
    cases = edit_cases(task, 4, 32, seed=11)
    right, _ = score_inverse(cases, [c.reference for c in cases])
    assert right["objects_kept"] == right["colour_right"] == 1.0
    assert right["psnr"] == pytest.approx(100.0)  # pipeline.data.quality.psnr's cap for equal images
    assert right["consistency"] < 0.5 / 255 and right["lpips"] is None  # y's 8-bit rounding only
    wrong, rows = score_inverse(cases, [c.reference for c in cases[1:] + cases[:1]])  # each another's target
    assert wrong["objects_kept"] < 1.0 and wrong["psnr"] < 30 and wrong["consistency"] > 0.01
    assert len(rows) == 4 and set(rows[0]) >= {"objects_kept", "colour_right", "psnr", "lpips", "consistency"}


def test_lpips_without_alexnet_weights_says_so_in_one_line(no_alexnet):
    x = torch.zeros(1, 3, 32, 32)
    assert lpips_module.lpips(x, x) is None
    assert lpips_module.lpips_unavailable() == f"LPIPS: n/a (no AlexNet weights at {lpips_module.alexnet_path()})"


def test_lpips_is_zero_on_equal_images_and_grows_with_noise(random_alexnet):
    assert lpips_module.lpips_unavailable() is None
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 32, 32, generator=g)
    distances = [lpips_module.lpips(x, (x + sigma * noise).clamp(-1, 1)) for sigma in (0.0, 0.05, 0.2, 0.8)]
    assert torch.equal(distances[0], torch.zeros(3))
    for smaller, larger in zip(distances, distances[1:]):
        assert (larger > smaller).all(), distances


def _tiny_translator(folder, degradations):
    from pipeline.models.translator import TranslatorConfig, build_translator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_translator(TranslatorConfig(base_channels=8, depth=2, norm_groups=4), degradations).save_pretrained(folder)
    return folder


def test_the_report_puts_every_method_side_by_side(teacher_dir, tmp_path, no_alexnet):
    pix2pix = _tiny_translator(tmp_path / "p2p" / "generator", ["grayscale", "blur"])
    out = tmp_path / "report"
    args = ["--teacher", str(teacher_dir), "--teacher-steps", "2", "--count", "2", "--guidance", "2", "--tasks",
            ",".join(INVERSE_TASKS), "--pix2pix", str(pix2pix), "--inverse-strength", "edges=0.8", "--output", str(out)]
    assert main(args) == 0
    report = json.loads((out / "edit_report.json").read_text())
    assert report["tasks"] == [] and list(report["inverse"]) == list(INVERSE_TASKS)
    methods = {task: list(result["methods"]) for task, result in report["inverse"].items()}
    assert methods["colourise"] == methods["deblur"] == ["source", "pix2pix", "sdedit", "solver", "vae"]
    assert methods["sr4"] == ["source", "sdedit", "solver", "vae"]
    assert methods["edges"] == ["source", "sdedit", "vae"] and report["inverse"]["edges"]["strength"] == 0.8
    for task in ("colourise", "sr4", "deblur"):
        rows = report["inverse"][task]["methods"]
        assert rows["solver"]["consistency"] <= rows["sdedit"]["consistency"] / 10
        assert rows["solver"]["raw_consistency"] > rows["solver"]["consistency"]
    assert {g["goal"] for g in report["inverse_goals"]} == {"solver consistency ≤ 1/10 of SDEdit's"}
    text = (out / "edit_report.md").read_text()
    assert "LPIPS: n/a (no AlexNet weights at" in text and "| solver |" in text and "| pix2pix |" in text
    for task in INVERSE_TASKS:
        assert (out / f"sheet_{task}.png").stat().st_size > 1000
    lines = (out / "per_case.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (5 + 4 + 3 + 5)


def test_report_input_errors_are_one_line(teacher_dir, tmp_path, capsys):
    base = ["--teacher", str(teacher_dir), "--count", "1", "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit):
        main([*base, "--tasks", "colorize"])
    assert "unknown task(s) colorize" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--tasks", "sr4", "--inverse-strength", "sr4=1.5"])
    assert "strength must be in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--teacher-steps", "1", "--tasks", "sr4", "--conditioned", str(teacher_dir)]) == 2
    assert "not image-conditioned" in capsys.readouterr().err
