"""pipeline.evaluation.evaluate and pipeline.evaluation.metrics: prompt files, generation with per-image seeds, FID/KID
through the real torchmetrics path with a locally saved Inception, CLIP score with open_clip, diversity per feature
space (Inception and a locally saved DINOv2), guidance × steps sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.evaluation import evaluate, metrics
from tests.test_diversity import save_tiny_dinov2


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """The FID Inception-v3 architecture (torch-fidelity's) with seeded random weights, saved as
    safetensors. Real weights cannot be downloaded here; batch-norm statistics are calibrated on
    one random batch so the features are not degenerate."""
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RandomInception("inception", ["2048"], feature_extractor_weights_path=str(root / "empty.pt"))
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.momentum = None  # cumulative average: running stats = this batch's stats
            bn.reset_running_stats()
        with torch.no_grad():
            model.train()(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "inception.safetensors")
    return root / "inception.safetensors"


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2", processor_size=56)


def test_prompt_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a red circle"}\n{"prompt": "a blue square", "caption": "x"}\n')
    pq.write_table(pa.table({"text": ["a red circle", "a blue square"]}), tmp_path / "p.parquet")
    for name in ("p.txt", "p.jsonl", "p.parquet"):
        assert evaluate.read_prompts(tmp_path / name) == ["a red circle", "a blue square"], name


@pytest.mark.parametrize("content, message", [
    ('{"caption": "ok"}\n{broken\n', "p.jsonl:2: not JSON"),
    ('{"url": "x"}\n', "no string field named one of"),
    ("", "no prompts"),
])
def test_bad_prompt_files_are_named(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(evaluate.EvalInputError, match=message):
        evaluate.read_prompts(tmp_path / "p.jsonl")


def test_fid_matches_the_closed_form_for_an_affine_copy():
    """fake = 2 * real + 1: mu_f - mu_r = mu_r + 1, S_f = 4 S_r, sqrt(S_r S_f) = 2 S_r,
    so FID = |mu_r + 1|^2 + tr(S_r)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    expected = float(((real.mean(0) + 1) ** 2).sum() + torch.cov(real.T).trace())
    result = metrics.fid_kid(real, 2 * real + 1, kid_subset=200)
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["kid_mean"] > 0
    same = metrics.fid_kid(real, real.clone(), kid_subset=200)
    assert abs(same["fid"]) < 1e-6
    assert result["kid_mean"] > 10 * abs(same["kid_mean"])  # the unbiased MMD of a set with itself: ~0, not 0


def test_inception_loads_safely_and_errors_name_the_file(inception_file, tmp_path):
    model = metrics.load_inception(inception_file)
    features = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048) and features.std() > 0
    with pytest.raises(metrics.MetricError, match="not found"):
        metrics.load_inception(tmp_path / "nope.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(metrics.MetricError, match="wrong.pth' is not the FID Inception"):
        metrics.load_inception(tmp_path / "wrong.pth")


def test_clip_score_prefers_the_matching_prompt(tiny_text_encoders_dir):
    from PIL import Image

    from pipeline.encoders.clip import ClipEncoderConfig

    scorer = metrics.ClipScorer(ClipEncoderConfig(path=str(tiny_text_encoders_dir / "clip")))
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    scores = scorer(images, ["a red image", "a blue image"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()
    assert torch.equal(scores, scorer(images, ["a red image", "a blue image"]))  # deterministic


def run(teacher_dir, out, *extra):
    return evaluate.main(["--model", str(teacher_dir), "--steps", "2", "--guidance", "2", "--output", str(out), *extra])


def test_evaluate_writes_per_prompt_summary_and_report(teacher_dir, image_shards, tiny_text_encoders_dir,
                                                       inception_file, dinov2_dir, tmp_path):
    args = ["--reference", str(image_shards), "--count", "6", "--batch-size", "4", "--inception", str(inception_file),
            "--kid-subset", "3", "--clip", str(tiny_text_encoders_dir / "clip"), "--dinov2", str(dinov2_dir)]
    assert run(teacher_dir, tmp_path / "a", *args) == 0
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["count"] == 6 and summary["skipped"] == {}
    for key in ("adherence_all", "clip_score", "fid", "kid_mean", "kid_std", "seconds_per_image"):
        assert isinstance(summary[key], float), key
    assert summary["fid"] > 0 and summary["reference_count"] == 6
    rows = [json.loads(line) for line in (tmp_path / "a/per_prompt.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(6)) and all("all" in r["adherence"] for r in rows)
    assert all((tmp_path / "a" / r["image"]).is_file() for r in rows)
    assert "| fid |" in (tmp_path / "a/report.md").read_text() and (tmp_path / "a/grid.png").is_file()
    blocks = summary["diversity"]  # one block per feature space, each naming its extractor
    assert {name: (b["features"], b["dim"]) for name, b in blocks.items()} == {"inception": ("inception", 2048), "dinov2": ("dinov2", 32)}
    for block in blocks.values():
        assert all(0 <= block[k] <= 1 for k in ("precision", "recall", "coverage")) and block["density"] >= 0
        assert 1 <= block["vendi"] <= 6 and 1 <= block["vendi_reference"] <= 6
    assert blocks["dinov2"]["fd"] > 0 and blocks["inception"]["source"] == str(inception_file)
    assert "| dinov2 (32-d) |" in (tmp_path / "a/report.md").read_text()
    counts = {"1": 0, "2": 0}
    for r in rows:
        counts[str(r["prompt"].count(" at the "))] += 1
    split = summary["adherence_by_objects"]
    assert set(split) == {k for k, n in counts.items() if n} and all(0 <= v <= 1 for v in split.values())
    assert sum(split[k] * counts[k] for k in split) / 6 == pytest.approx(summary["adherence_all"])  # the split adds up
    ceiling = summary["adherence_vae_ceiling"]
    assert set(ceiling) == {"all", *split} and all(0 <= v <= 1 for v in ceiling.values())
    assert "VAE ceiling" in (tmp_path / "a/report.md").read_text()
    # image k depends on seed + k only, not on the batch it was generated in
    assert run(teacher_dir, tmp_path / "b", "--reference", str(image_shards), "--count", "6", "--batch-size", "6") == 0
    for r in rows:
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()


def test_one_to_many_and_pixel_features_through_the_cli(teacher_dir, image_shards, tmp_path, capsys):
    """``--one-to-many K`` draws K images per under-specified prompt through the evaluation's own
    sampler (seed + m, batch-independent) and scores them; ``--pixels`` adds a weight-free feature space."""
    from pipeline.evaluation.evaluate import pipeline_generator
    from pipeline.evaluation.one_to_many import evaluate_one_to_many, underspecified_prompts
    from pipeline.inference.pipeline import TextToImage

    args = ["--reference", str(image_shards), "--count", "6", "--batch-size", "4", "--pixels", "--one-to-many", "3",
            "--one-to-many-prompts", "4", "--one-to-many-attributes", "colour,background"]
    assert run(teacher_dir, tmp_path / "a", *args) == 0
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    o2m = summary["one_to_many"]
    assert o2m["k"] == 3 and o2m["prompt_seed"] == 12345 and set(o2m["by_attribute"]) <= {"colour", "background"}
    assert summary["one_to_many_tv_excess"] == pytest.approx(summary["one_to_many_tv"] - summary["one_to_many_tv_perfect"])
    rows = [json.loads(line) for line in (tmp_path / "a/one_to_many.jsonl").read_text().splitlines()]
    prompts = underspecified_prompts(4, 12345, ("colour", "background"))
    assert [r["prompt"] for r in rows] == prompts
    # the same numbers as the library call with a batch size of 1: nothing depends on the batching
    pipe = TextToImage.from_folder(teacher_dir, "cpu")
    direct = evaluate_one_to_many(pipeline_generator(pipe, 2, 2.0, batch_size=1), prompts, 3, seed=0)
    assert direct["overall"] == pytest.approx(o2m["overall"])
    pixels = summary["diversity"]["pixels"]
    assert pixels["dim"] == 768 and 0 <= pixels["coverage"] <= 1 and 1 <= pixels["vendi"] <= 6
    assert "## One-to-many" in (tmp_path / "a/report.md").read_text()
    with pytest.raises(SystemExit):
        run(teacher_dir, tmp_path / "b", *args[:-1], "colour,shape")
    assert "attributes must be among" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(teacher_dir, tmp_path / "b", "--reference", str(image_shards), "--one-to-many", "1")
    assert "--one-to-many must be >= 2" in capsys.readouterr().err


def test_missing_metric_models_are_said_not_faked(teacher_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    assert run(teacher_dir, tmp_path / "out", "--prompts", str(tmp_path / "p.txt")) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert set(summary["skipped"]) == {"adherence", "clip_score", "fid_kid", "diversity"}
    assert "fid" not in summary and "adherence_all" not in summary
    assert "no Inception weights given" in capsys.readouterr().out


def test_bad_inputs_exit_with_one_line(teacher_dir, image_shards, tmp_path, capsys):
    assert run(teacher_dir, tmp_path / "o", "--reference", str(tmp_path / "nothing")) == 2
    assert "reference shards not found" in capsys.readouterr().err
    args = ["--reference", str(image_shards), "--count", "2", "--inception", str(tmp_path / "x.pth")]
    assert run(teacher_dir, tmp_path / "o", *args) == 2
    assert "Inception weights not found: " in capsys.readouterr().err
    assert run(teacher_dir, tmp_path / "o", "--reference", str(image_shards), "--count", "2", "--dinov2", str(tmp_path / "d")) == 2
    assert capsys.readouterr().err.strip().endswith(f"DINOv2 folder not found or without config.json: '{tmp_path / 'd'}'")
    with pytest.raises(SystemExit):
        run(teacher_dir, tmp_path / "o")  # neither --prompts nor --reference


def test_several_steps_load_the_model_once_and_match_single_runs(teacher_dir, image_shards, tmp_path, capsys):
    base = ["--model", str(teacher_dir), "--guidance", "2", "--reference", str(image_shards), "--count", "4"]
    assert evaluate.main([*base, "--steps", "1", "2", "--output", str(tmp_path / "t_{steps}")]) == 0
    assert evaluate.main([*base, "--steps", "2", "--output", str(tmp_path / "single")]) == 0
    assert [json.loads((tmp_path / f"t_{n}/summary.json").read_text())["steps"] for n in (1, 2)] == [1, 2]
    for k in range(4):
        assert (tmp_path / f"t_2/images/{k:05d}.png").read_bytes() == (tmp_path / f"single/images/{k:05d}.png").read_bytes()
    with pytest.raises(SystemExit):
        evaluate.main([*base, "--steps", "1", "2", "--output", str(tmp_path / "no_placeholder")])
    assert "--output must contain {steps}" in capsys.readouterr().err


def test_sample_draws_image_k_from_seed_plus_k_as_evaluate_does(teacher_dir):
    """``pipeline.sample``'s ``generate``: image k comes from seed + k alone, the image ``pipeline.evaluate``
    draws for prompt k; its batch partners do not change it."""
    from pipeline.inference.pipeline import TextToImage

    pipe = TextToImage.from_folder(teacher_dir)
    prompts = ["a small red circle at the top left on a white background", "a large blue square at the center on a navy background"]
    together, _ = pipe.generate(prompts, steps=3, seed=5)
    alone, _ = pipe.generate(prompts[1:], steps=3, seed=6)
    evaluated, _ = evaluate.generate_images(pipe, prompts, 3, 4.0, seed=5, batch_size=1)
    for a, b in ((together[1], alone[0]), (together[1], evaluated[1]), (together[0], evaluated[0])):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # the VAE's CPU kernels: 1 level


def student_with_range(teacher_dir: Path, latent_shards: Path, folder: Path, guidance_range: list[float]) -> Path:
    """The teacher as a fresh consistency student, exported with a distillation ``guidance_range``."""
    from pipeline.data.model_folder import export_model
    from pipeline.models.student import load_teacher, student_from

    meta = json.loads((latent_shards / "dataset.json").read_text())
    extra = {"kind": "consistency_student", "sampler": "consistency", "teacher": str(teacher_dir),
             "sampling": {"steps": 2, "guidance": 2.0, "shift": 1.0}, "guidance_range": guidance_range}
    return export_model(folder / "model", student_from(load_teacher(teacher_dir)), meta, extra)


def test_guidance_sweep_draws_teacher_and_student_side_by_side(teacher_dir, latent_shards, image_shards, dinov2_dir,
                                                               tmp_path, tmp_path_factory, capsys):
    """``--guidance`` with several values: one cell per (guidance, steps) named by ``{guidance}``, with
    the images a single-guidance run draws; the teacher's and then the student's run fill one
    ``sweep/`` (JSON, Markdown, PNG); a scale outside the student's guidance_range is warned about."""
    student = student_with_range(teacher_dir, latent_shards, tmp_path_factory.mktemp("student"), [1.0, 3.0])
    common = ["--reference", str(image_shards), "--count", "6", "--dinov2", str(dinov2_dir), "--steps", "1"]
    assert evaluate.main(["--model", str(teacher_dir), "--guidance", "1", "3", *common,
                          "--output", str(tmp_path / "eval/teacher_g{guidance}_{steps}")]) == 0
    assert "warning" not in capsys.readouterr().out
    assert evaluate.main(["--model", str(student), "--guidance", "2", "5", *common,
                          "--output", str(tmp_path / "eval/student_g{guidance}_{steps}")]) == 0
    out = capsys.readouterr().out
    assert "warning: guidance 5 is outside the guidance_range [1, 3]" in out and "guidance 2 is outside" not in out
    cells = json.loads((tmp_path / "eval/sweep/sweep.json").read_text())["cells"]
    assert sorted((c["label"].split()[0], c["guidance"]) for c in cells) == [("student", 2.0), ("student", 5.0), ("teacher", 1.0), ("teacher", 3.0)]
    assert all(c["features"] == "dinov2" and 0 <= c["coverage"] <= 1 and 0 <= c["adherence_all"] <= 1 for c in cells)
    assert [c["guidance"] for c in cells if c.get("outside_guidance_range") == [1.0, 3.0]] == [5.0]
    summary = json.loads((tmp_path / "eval/teacher_g3_1/summary.json").read_text())
    assert (summary["guidance"], summary["steps"]) == (3.0, 1)
    table = (tmp_path / "eval/sweep/sweep.md").read_text()
    assert "| teacher | 1 | 3 |" in table and " | 1 | 5 (outside the trained range) |" in table
    from PIL import Image

    with Image.open(tmp_path / "eval/sweep/sweep.png") as png:
        assert png.width > 2 * png.height  # adherence vs coverage, adherence vs recall: two panels side by side
    # the teacher again: its cells are replaced, the student's kept
    assert evaluate.main(["--model", str(teacher_dir), "--guidance", "3", "--sweep", str(tmp_path / "eval/sweep"), *common,
                          "--output", str(tmp_path / "single")]) == 0
    cells = json.loads((tmp_path / "eval/sweep/sweep.json").read_text())["cells"]
    assert sorted((c["label"].split()[0], c["guidance"]) for c in cells) == [("student", 2.0), ("student", 5.0), ("teacher", 3.0)]
    for k in range(6):  # one guidance: today's layout, the sweep cell's images
        assert (tmp_path / f"single/images/{k:05d}.png").read_bytes() == (tmp_path / f"eval/teacher_g3_1/images/{k:05d}.png").read_bytes()
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(teacher_dir), "--guidance", "1", "2", *common, "--output", str(tmp_path / "no_placeholder")])
    assert "--output must contain {guidance}" in capsys.readouterr().err


def test_compare_sweeps_guidance_and_warns_outside_the_students_range(teacher_dir, latent_shards, tmp_path_factory, capsys):
    """``pipeline.compare --guidance 1 5``: a report per scale under g{guidance}/ and the sweep of
    teacher (50 steps) and student (1/2/4/8) adherence along guidance; 5 is outside [1, 3]."""
    from pipeline.evaluation.compare import main as compare

    root = tmp_path_factory.mktemp("compare")
    student = student_with_range(teacher_dir, latent_shards, root, [1.0, 3.0])
    out = root / "report"
    assert compare(["--student", str(student), "--teacher", str(teacher_dir), "--prompts", "2", "--guidance", "1", "5",
                    "--output", str(out)]) == 0
    assert "warning: guidance 5 is outside the guidance_range [1, 3]" in capsys.readouterr().out
    assert [json.loads((out / f"g{g}/report.json").read_text())["guidance"] for g in (1, 5)] == [1.0, 5.0]
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert sorted({(c["label"], c["steps"]) for c in cells}) == [("student", 1), ("student", 2), ("student", 4), ("student", 8), ("teacher", 50)]
    assert sorted(c["guidance"] for c in cells if c.get("outside_guidance_range")) == [5.0] * 4  # the student's four
    assert (out / "sweep.png").is_file() and "| teacher | 50 | 5 |" in (out / "sweep.md").read_text()
