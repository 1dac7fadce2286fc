"""pipeline.distill: the boundary condition, the student starting as the teacher, a short run
that lowers the consistency loss and resumes exactly, and the sampler's evaluation count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline import distill
from pipeline.models.student import load_teacher, student_from
from pipeline.diffusion.samplers import consistency, consistency_fn


def cond_for(model, rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    cond = {"t5": torch.randn(rows, 5, cfg.text_dim, generator=g), "t5_mask": torch.ones(rows, 5, dtype=torch.bool)}
    if cfg.clip_dim:
        cond["clip"] = torch.randn(rows, cfg.clip_dim, generator=g)
    return cond


def test_boundary_condition_is_exact(teacher_dir):
    student = student_from(load_teacher(teacher_dir))
    x = torch.randn(3, 4, 8, 8)
    cond = {**cond_for(student, 3), "guidance": torch.full((3,), 4.0)}
    assert torch.equal(consistency_fn(student, x, torch.zeros(3), cond), x)


def test_fresh_student_is_the_teachers_x0_prediction(teacher_dir):
    teacher = load_teacher(teacher_dir)
    student = student_from(teacher)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.6, 1.0])
    cond = cond_for(teacher, 3)
    with torch.no_grad():
        f = consistency_fn(student, x, t, {**cond, "guidance": torch.tensor([1.0, 3.0, 7.0])})
        x0_teacher = x - t.view(-1, 1, 1, 1) * teacher(x, t, cond)
    torch.testing.assert_close(f, x0_teacher, atol=1e-6, rtol=0)


class Counting(torch.nn.Module):
    calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_consistency_sampler_makes_exactly_the_requested_evaluations(steps):
    model = Counting()
    consistency(model, torch.randn(2, 4, 8, 8), {}, steps=steps)
    assert model.calls == steps


ARGS = ["deepspeed.enabled=false", "data.loader.batch_size=8", "optim.lr=1e-3", "logging.every=1", "sampling.steps=2"]


def run_args(teacher_dir, latents, out, *extra):
    return [f"teacher={teacher_dir}", f"data.latents={latents}", f"output_dir={out}", "run=s", "distill.intervals=8", *ARGS, *extra]


VALIDATION = ["validation.every=12", "validation.count=8", "validation.batch_size=20"]


def validated(path) -> dict[int, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("val_")} for m in lines if "val_loss" in m}


def test_short_distillation_lowers_the_loss_and_resumes_exactly(teacher_dir, latent_shards, tmp_path):
    same = ["checkpoint.every=6", "checkpoint.keep=5", "steps=24", *VALIDATION]
    assert distill.main(run_args(teacher_dir, latent_shards, tmp_path / "full", *same)) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full/s/metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    part = run_args(teacher_dir, latent_shards, tmp_path / "part", "checkpoint.every=6", "checkpoint.keep=5", *VALIDATION)
    assert distill.main([*part, "steps=12"]) == 0
    assert distill.main([*part, "steps=24"]) == 0
    for name in ("accelerate/model.safetensors", "target.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / d / "s/checkpoints/step-000024" / name)) for d in ("full", "part"))
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    full, resumed = (validated(tmp_path / d / "s/metrics.jsonl") for d in ("full", "part"))
    assert list(full) == [12, 24] and resumed == full  # the consistency loss on 8 held-out latents at 5 fixed t
    assert full[24]["val_loss"] < full[12]["val_loss"]
    info = json.loads((tmp_path / "full/s/model/model_index.json").read_text())["info"]
    assert info["kind"] == "consistency_student" and info["sampler"] == "consistency"


def test_compare_reports_the_student_against_its_teacher(teacher_dir, latent_shards, tmp_path):
    """``python -m pipeline.compare`` (the evaluation layer): the student at 1/2/4/8 steps, the
    guided teacher at 50 and at the same few steps, with their network evaluations."""
    from pipeline.evaluation.compare import main as compare

    assert distill.main(run_args(teacher_dir, latent_shards, tmp_path, "steps=2", "checkpoint.every=2")) == 0
    assert compare(["--student", str(tmp_path / "s/model"), "--prompts", "4", "--output", str(tmp_path / "report")]) == 0
    distilled = json.loads((tmp_path / "report/report.json").read_text())
    assert [(s["steps"], s["evaluations"]) for s in distilled["students"]] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [t["evaluations"] for t in distilled["teacher_few_steps"]] == [2, 4, 8, 16]  # guided: two per step
    assert (tmp_path / "report/report.md").exists() and (tmp_path / "report/student_4.png").exists()


# ---------------------------------------------------------------------------- the denoising term


@pytest.mark.parametrize("target", ["data", "teacher"])
def test_the_denoising_term_adds_its_weighted_distance_to_the_training_loss_only(teacher_dir, latent_shards, tmp_path, target):
    """``distill.denoise_weight`` (CTM's term): the training loss is the consistency loss plus the
    weight times ``d(f_student(x_t), x̂0)``, ``x̂0`` the batch's latents (``data``) or the teacher's
    guided one-step x0-prediction at ``(x_t, t, g)`` (``teacher``); the validation loss is the
    consistency loss alone."""
    from pipeline.config import parse_cli
    from pipeline.diffusion.guidance import guided_velocity
    from pipeline.training.consistency import distance
    from pipeline.training.distill import DistillConfig, Distiller

    args = run_args(teacher_dir, latent_shards, tmp_path, "distill.denoise_weight=0.5", f"distill.denoise_target={target}")
    trainer = Distiller(parse_cli(DistillConfig, args, "test"))
    try:
        torch.manual_seed(0)
        x0, cond, noise, n, g = trainer.draws(next(iter(trainer.loader)))
        with torch.no_grad():
            for p in trainer.model.parameters():  # a student that is not its teacher's copy (the tiny teacher ignores text)
                p.add_(0.02 * torch.randn_like(p))
            total, t, prediction = trainer.consistency_terms(trainer.model, x0, cond, noise, n, g)
            alone, _ = trainer.consistency_loss(trainer.model, x0, cond, noise, n, g)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            aim = x0 if target == "data" else x_t - t.view(-1, 1, 1, 1) * guided_velocity(trainer.teacher, x_t, t, cond, g)
        term = distance(prediction, aim, "pseudo_huber", None)
        assert term.min() > 1e-3  # the student's x0 is not yet its target: the check below can fail
        torch.testing.assert_close(total, alone + 0.5 * term, rtol=1e-5, atol=1e-6)
    finally:
        trainer.close()


def test_the_data_term_pulls_the_student_to_the_data(teacher_dir, latent_shards, tmp_path):
    """The same 16-step run with ``denoise_weight`` 4 ends with its x0-predictions of training
    latents (fixed noise at t = 0.3 / 0.6 / 0.9, guidance 4) nearer the latents than without."""
    from pipeline.data.latents import collate_latents, decode_latent_sample, shard_list
    from pipeline.data.stream import read_first
    from pipeline.models.dit import DiT
    from pipeline.training.dit import condition

    def x0_error(folder) -> float:
        student = DiT.from_pretrained(folder / "s/model/transformer")
        batch = collate_latents(read_first(shard_list(latent_shards), 16, decode_latent_sample))
        x0, cond = batch["latent"].float(), condition(batch, 0.0, torch.device("cpu"))
        errors = []
        for i, t in enumerate((0.3, 0.6, 0.9)):
            x = (1 - t) * x0 + t * torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                f = consistency_fn(student, x, torch.full((16,), t), {**cond, "guidance": torch.full((16,), 4.0)})
            errors.append(((f - x0) ** 2).mean().item())
        return float(np.mean(errors))

    steps = ["steps=16", "checkpoint.every=16", "ema.decay=0"]  # the export: the trained weights themselves
    assert distill.main(run_args(teacher_dir, latent_shards, tmp_path / "plain", *steps)) == 0
    assert distill.main(run_args(teacher_dir, latent_shards, tmp_path / "pulled", *steps, "distill.denoise_weight=4")) == 0
    before, after = x0_error(tmp_path / "plain"), x0_error(tmp_path / "pulled")
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("bad, says", [(["distill.denoise_weight=-1"], "denoise_weight must be >= 0"),
                                       (["distill.denoise_target=ema"], "denoise_target"),
                                       (["distill.mode=ct", "teacher=null", "distill.denoise_weight=1"], "mode=ct has the term")])
def test_the_denoising_terms_keys_check_themselves(teacher_dir, latent_shards, tmp_path, capsys, bad, says):
    with pytest.raises(SystemExit) as stop:
        distill.main(run_args(teacher_dir, latent_shards, tmp_path, *bad))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
