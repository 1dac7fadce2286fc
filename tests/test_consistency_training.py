"""pipeline.distill distill.mode=ct: the iCT and ECT curricula, a teacher-free run that lowers its
loss and exports a model that samples, the start from an RF checkpoint, exact resume with an EMA
target, and one-line config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from pipeline import distill
from pipeline.config import parse_cli
from pipeline.diffusion.samplers import consistency_fn
from pipeline.models.dit import DiT
from pipeline.training.consistency import CTSection, to_sigma
from pipeline.training.consistency_training import ConsistencyTrainer
from pipeline.training.distill import PROG, DistillConfig
from tests import jobs


@pytest.mark.parametrize(("start", "end", "total", "expected"), [
    (10, 1280, 800, {0: 11, 99: 11, 100: 21, 250: 41, 699: 641, 700: 1281, 799: 1281}),  # K' = 800 // (7 + 1) = 100
    (10, 100, 800, {0: 11, 199: 11, 200: 21, 400: 41, 600: 81, 799: 81}),  # ⌊log2 10⌋ = 3: K' = 200; capped at 100 + 1
    (2, 8, 7, {0: 3, 1: 3, 2: 5, 4: 9, 6: 9}),  # K' = 7 // 3 = 2
])
def test_ict_doubles_the_grid(start, end, total, expected):
    ct = CTSection(curriculum="ict", start_intervals=start, end_intervals=end)
    assert {k: ct.ict_intervals(k, total) + 1 for k in expected} == expected  # N(k) = intervals + 1 grid points


def test_ect_mapping_shrinks_the_gap_by_q_per_stage():
    ct = CTSection(curriculum="ect", q=2.0, k=8.0, b=1.0, stage_steps=10)
    t = torch.linspace(0.0, 1.0, 401)[1:]  # (400,), up to t = 1 exactly (σ clamped)
    gaps = []
    for stage in range(8):
        r = ct.ect_r(t, stage * 10)
        assert (r >= 0).all() and (r < t).all()
        gaps.append(to_sigma(t) - to_sigma(r))
    for stage in range(3, 7):  # where neither stage clamps r at 0 the σ-gap halves exactly (fp32 round trips
        both = (ct.ect_r(t, stage * 10) > 0) & (t < 0.99)  # through t: 1e-3 up to σ = 99)
        torch.testing.assert_close(gaps[stage][both] / gaps[stage + 1][both], torch.full((int(both.sum()),), 2.0), rtol=1e-3, atol=0)
    assert (t - ct.ect_r(t, 70)).max() < 0.02  # r → t
    # by hand, t = 0.5 (σ = 1): stage 0: 1 − (1 + 8·sigmoid(−1))/2 < 0, r = 0; stage 2: σ_r = 1 − 3.151529/8 = 0.606059
    r = ct.ect_r(torch.tensor([0.5, 0.5]), 0), ct.ect_r(torch.tensor([0.5]), 20)
    assert r[0].tolist() == [0.0, 0.0]
    assert r[1].item() == pytest.approx(0.606059 / 1.606059, abs=1e-5)


def test_inverse_gap_weight_keeps_its_scale_across_stages():
    ct = CTSection(curriculum="ect", weighting="inverse_gap", stage_steps=10)
    t = torch.tensor([0.3, 0.6, 0.9])
    w = [ct.weight(t, ct.ect_r(t, s * 10), s * 10, 100) for s in (4, 5)]
    torch.testing.assert_close(w[0], w[1], rtol=1e-3, atol=0)  # 1/(σ_t − σ_r) · q^−(stage+1): the same at both
    assert (w[0][:-1] > w[0][1:]).all()  # larger weights at smaller σ (ECT)


ARGS = ["distill.mode=ct", "deepspeed.enabled=false", "data.loader.batch_size=8", "optim.lr=1e-3", "logging.every=1",
        "sampling.steps=2", "model.overrides={depth: 2}"]


def run_args(latents, out, *extra):
    return [f"data.latents={latents}", f"output_dir={out}", "run=c", *ARGS, *extra]


def no_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("distill.mode=ct loaded a teacher")

    monkeypatch.setattr("pipeline.models.student.load_teacher", refuse)
    monkeypatch.setattr("pipeline.training.distill.load_teacher", refuse)


def test_teacher_free_run_learns_and_exports_a_sampler(latent_shards, tmp_path, monkeypatch):
    """From scratch, ECT held at stage 0 (a fixed objective): the loss falls over 30 steps and the
    exported folder samples at 1 and 2 steps with classifier-free guidance."""
    from pipeline.inference.pipeline import TextToImage

    no_teacher(monkeypatch)
    args = run_args(latent_shards, tmp_path, "steps=30", "checkpoint.every=30", "ct.stage_steps=1000", "optim.warmup_steps=0")
    assert distill.main(args) == 0
    config = yaml.safe_load((tmp_path / "c/config.yaml").read_text())
    assert config["teacher"] is None and config["distill"]["mode"] == "ct"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "c/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    info = json.loads((tmp_path / "c/model/model_index.json").read_text())["info"]
    assert info["kind"] == "consistency_training" and info["sampler"] == "consistency"
    assert info["consistency_training"]["curriculum"] == "ect"
    pipe = TextToImage.from_folder(tmp_path / "c/model")
    assert not pipe.transformer.config.guidance_embed  # guided by CFG on its velocity
    for steps in (1, 2):
        images, _ = pipe.generate(["a red circle", "a blue square"], steps=steps, guidance=3.0)
        assert len(images) == 2 and images[0].size == (32, 32)
        guided, plain = (pipe.latents(["a red circle"], steps, g, seed=[0]) for g in (3.0, 1.0))
        assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)  # classifier-free guidance is applied


def test_start_from_an_rf_checkpoint_is_its_x0_prediction(teacher_dir, latent_shards, tmp_path, monkeypatch):
    """ECT's start: with ``model.init`` the consistency function at step 0 is the RF model's
    ``x − t·v`` (1e-6)."""
    no_teacher(monkeypatch)
    cfg = parse_cli(DistillConfig, run_args(latent_shards, tmp_path, f"model.init={teacher_dir}", "steps=1"), PROG)
    trainer = ConsistencyTrainer(cfg)
    try:
        rf = DiT.from_pretrained(teacher_dir / "transformer").eval()
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.2, 0.6, 1.0])
        cond = {"t5": torch.randn(3, 5, rf.config.text_dim, generator=g), "t5_mask": torch.ones(3, 5, dtype=torch.bool)}
        if rf.config.clip_dim:
            cond["clip"] = torch.randn(3, rf.config.clip_dim, generator=g)
        with torch.no_grad():
            f = consistency_fn(trainer.accelerator.unwrap_model(trainer.model).eval(), x, t, cond)
            torch.testing.assert_close(f, x - t.view(-1, 1, 1, 1) * rf(x, t, cond), atol=1e-6, rtol=0)
    finally:
        trainer.close()


VALIDATION = ["validation.every=6", "validation.count=8", "validation.batch_size=20"]


@pytest.mark.parametrize("curriculum", [
    ["ct.curriculum=ect", "ct.stage_steps=4"],  # stages 0, 1, 2 (the gap halves at steps 4 and 8)
    ["ct.curriculum=ict", "ct.start_intervals=4", "ct.end_intervals=4", "ct.index=uniform"],  # N(k) depends on steps: kept fixed
])
def test_resume_with_an_ema_target_is_exact(curriculum, latent_shards, tmp_path):
    """With an EMA target, 12 steps equal 6 + resume + 6: checkpoints bit for bit, the export to
    1e-6, the validation losses."""
    same = [*curriculum, "ct.target=ema", "checkpoint.every=6", "checkpoint.keep=5", "steps=12", *VALIDATION]
    assert distill.main(run_args(latent_shards, tmp_path / "full", *same)) == 0
    assert distill.main([*run_args(latent_shards, tmp_path / "part", *same), "steps=6"]) == 0
    assert distill.main(run_args(latent_shards, tmp_path / "part", *same)) == 0
    for name in ("accelerate/model.safetensors", "target.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / d / "c/checkpoints/step-000012" / name)) for d in ("full", "part"))
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    a, b = (load_file(str(tmp_path / d / "c/model/transformer/diffusion_pytorch_model.safetensors")) for d in ("full", "part"))
    assert all(np.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    val = [{m["step"]: m["val_loss"] for m in map(json.loads, (tmp_path / d / "c/metrics.jsonl").read_text().splitlines())
            if "val_loss" in m} for d in ("full", "part")]
    assert list(val[0]) == [6, 12] and val[0] == val[1]


@pytest.mark.parametrize(("extra", "named"), [
    (["ct.curriculum=foo"], "ct.curriculum"),
    (["ct.q=1"], "q > 1"),
    (["teacher=runs/demo/teacher/model"], "teacher="),
])
def test_bad_settings_are_one_line_errors(extra, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        distill.main(run_args(tmp_path, tmp_path, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


@pytest.mark.xdist_group("launch")  # the suite's one 2-process launch (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("cell", jobs.CT_CELLS, ids=["ct-" + jobs.cell_name(*c[:3]) + "-" + c[3] for c in jobs.CT_CELLS])
def test_teacher_free_cell_trains_and_resumes_exactly(cell, launched_jobs):
    """DDP with an EMA target (checkpointed) and ZeRO-3 in bf16 with accumulation 2 and the stop-gradient
    target (a second, gradient-free forward of the partitioned model): run, resume exactly, export the EMA."""
    from tests.test_matrix import check_export_is_the_ema, check_run_and_resume

    name = f"ct-{jobs.cell_name(*cell[:3])}-{cell[3]}"
    check_run_and_resume(launched_jobs, name, 2, extra_states=("target.safetensors",) if cell[3] == "ema" else ())
    check_export_is_the_ema(launched_jobs / name)
    info = json.loads((launched_jobs / name / "model/model_index.json").read_text())["info"]
    assert info["sampler"] == "consistency" and "teacher" not in json.dumps(info)
