"""LADD's adversarial term in consistency distillation (``distill.adversarial``,
``pipeline.training.ladd``): off at weight 0 (bit for bit), the hooked blocks, the discriminator
update, where the generator's gradient goes, the start-step gate, the D:G ratio, exact resume with
the heads' state, and the 2-process cells (DDP, ZeRO-2, ZeRO-3) with identical heads on every rank."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline import distill
from pipeline.diffusion.samplers import consistency_fn
from pipeline.models.student import load_teacher, student_from
from pipeline.training.ladd import AdversarialSection, Discriminator, block_features, default_blocks
from tests import jobs
from tests.test_distill import cond_for

ARGS = ["deepspeed.enabled=false", "data.loader.batch_size=8", "optim.lr=1e-3", "logging.every=1", "sampling.prompts=[]",
        "distill.intervals=8", "checkpoint.keep=5", "run=s"]
ADV = ["distill.adversarial.weight=0.5", "distill.adversarial.lr=1e-3"]


def run(teacher_dir, latents, out: Path, *extra: str) -> Path:
    """A short distillation run; its run folder (accelerate's state reset: runs differ in precision)."""
    jobs._reset_accelerate()
    assert distill.main([f"teacher={teacher_dir}", f"data.latents={latents}", f"output_dir={out}", *ARGS, *extra]) == 0
    return out / "s"


TRAINED = ("step", "loss", "lr", "g_loss", "d_loss", "d_real", "d_fake")  # the logged figures that are not timings


def lines(run_dir: Path) -> list[dict]:
    """The logged lines' training figures (timings left out)."""
    read = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k in TRAINED} for m in read]


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), name


def section(**kw) -> AdversarialSection:
    return AdversarialSection(**{"weight": 1.0, "lr": 1e-3, **kw})


def discriminator(teacher, **kw) -> Discriminator:
    return Discriminator(section(**kw), teacher, contextlib.nullcontext, torch.device("cpu"))


# ---------------------------------------------------------------------------- units


def test_default_blocks_spread_over_the_upper_depth():
    assert default_blocks(12) == [3, 6, 8, 11]
    assert default_blocks(28) == [7, 14, 20, 27]
    assert default_blocks(6) == [2, 3, 4, 5]
    assert default_blocks(2) == [0, 1]


@pytest.mark.parametrize("bad", [{"blocks": [-1]}, {"blocks": [1, 1]}, {"d_steps": 0}, {"weight": -1.0}, {"betas": (0.5, 1.0)}])
def test_the_section_checks_itself(bad):
    with pytest.raises(ValueError):
        AdversarialSection(**bad)


def test_heads_read_the_configured_blocks(teacher_dir):
    """One head per configured block, fed that block's output: the hooks' captures equal the block
    outputs of a plain forward, and they are gone after the context."""
    teacher = load_teacher(teacher_dir)
    x, t, cond = torch.randn(3, 4, 8, 8), torch.rand(3), cond_for(teacher, 3)
    seen = {}
    handles = [block.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, o)) for k, block in enumerate(teacher.blocks)]
    with torch.no_grad(), block_features(teacher, [1]) as features:
        teacher(x, t, cond)
    for handle in handles:
        handle.remove()
    assert len(features) == 1 and torch.equal(features[0], seen[1])
    assert all(not block._forward_hooks for block in teacher.blocks)
    assert len(discriminator(teacher, blocks=[1]).heads.heads) == 1
    assert len(discriminator(teacher).heads.heads) == 2  # depth 2: blocks [0, 1]


def test_a_bad_block_index_is_one_line(teacher_dir, latent_shards, tmp_path, capsys):
    args = [f"teacher={teacher_dir}", f"data.latents={latent_shards}", f"output_dir={tmp_path}", *ARGS, *ADV, "distill.adversarial.blocks=[0, 5]"]
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distill.adversarial.blocks: [5] not a block of the teacher (its blocks are 0..1)" in err


def test_fresh_heads_output_zero_and_the_d_update_lowers_the_hinge_loss(teacher_dir):
    """On a fixed batch (reals ~ N(0, 0.5²), fakes ~ N(1, 0.5²)), 20 head updates lower the hinge D
    loss, evaluated at the same re-noise draws, from its initial 1 (fresh heads output 0) by > 0.3."""
    from pipeline.training.gan_losses import hinge_d_loss

    teacher = load_teacher(teacher_dir)
    d = discriminator(teacher, blocks=[0, 1])
    g = torch.Generator().manual_seed(0)
    real, fake = 0.5 * torch.randn(8, 4, 8, 8, generator=g), 1 + 0.5 * torch.randn(8, 4, 8, 8, generator=g)
    cond = cond_for(teacher, 8)

    def loss() -> float:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return hinge_d_loss(d.logits(real, cond), d.logits(fake, cond)).item()

    before = loss()
    assert before == 1.0  # the heads' last layer starts at zero: D = 0
    for _ in range(20):
        d.remember(fake, real, cond, torch.ones(8))
        d.update()
    assert d.updates == 20
    assert loss() < before - 0.3


def test_the_generator_gradient_reaches_the_student_and_not_the_teacher(teacher_dir):
    teacher = load_teacher(teacher_dir)
    student = student_from(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = discriminator(teacher)
    x, cond = torch.randn(4, 4, 8, 8), cond_for(teacher, 4)
    d.remember(1 + x, x, cond, torch.ones(4))
    d.update()  # heads no longer zero: D has a gradient
    t = torch.full((4,), 0.7)
    prediction = consistency_fn(student, x, t, {**cond, "guidance": torch.full((4,), 4.0)})
    d.generator_loss(prediction, cond, torch.ones(4)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in d.heads.parameters())  # frozen during G
    assert all(p.requires_grad for p in d.heads.parameters())  # and trainable again after
    reached = [name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(reached) > 0.5 * len(list(student.parameters())), reached  # through the teacher's blocks into most of the student
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_rows_below_min_t_are_no_negatives():
    """The weighted hinge equals ``gan_losses.hinge_d_loss`` with every row a negative, and reads
    only the weighted fakes otherwise; a G loss with no negative is 0."""
    from pipeline.training import gan_losses
    from pipeline.training.ladd import hinge_d_loss, weighted_mean

    real, fake = torch.randn(6), torch.randn(6)
    assert torch.equal(hinge_d_loss(real, fake, torch.ones(6)), gan_losses.hinge_d_loss(real, fake))
    w = torch.tensor([1.0, 0, 1, 0, 0, 0])
    torch.testing.assert_close(hinge_d_loss(real, fake, w), gan_losses.hinge_d_loss(real, fake[[0, 2]]), rtol=0, atol=1e-7)
    assert weighted_mean(fake, torch.zeros(6)) == 0


# ---------------------------------------------------------------------------- runs


def test_weight_zero_is_plain_consistency_distillation(teacher_dir, latent_shards, tmp_path):
    """The section present with weight 0 (other keys set): the same losses and weights, bit for bit."""
    steps = ["steps=3", "checkpoint.every=3"]
    plain = run(teacher_dir, latent_shards, tmp_path / "plain", *steps)
    off = run(teacher_dir, latent_shards, tmp_path / "off", *steps, "distill.adversarial.weight=0", "distill.adversarial.d_steps=3",
              "distill.adversarial.blocks=[1]")
    assert [m["loss"] for m in lines(off)] == [m["loss"] for m in lines(plain)]
    same_files(plain / "checkpoints/step-000003", off / "checkpoints/step-000003", ("accelerate/model.safetensors", "target.safetensors"))
    assert not (off / "checkpoints/step-000003/ladd_heads.safetensors").exists()


def test_start_step_gates_the_generator_term_and_the_teacher_stays_frozen(teacher_dir, latent_shards, tmp_path):
    """start_step 2: steps 1-2 train exactly as plain CD (nothing drawn, nothing added); from step 3
    the line logs g_loss and the D figures and the weights part from plain CD; the teacher's weights
    never change and never get a gradient."""
    from pipeline.config import load_config
    from pipeline.training.distill import DistillConfig, Distiller

    steps = ["steps=4", "checkpoint.every=4"]
    plain = lines(run(teacher_dir, latent_shards, tmp_path / "plain", *steps))
    jobs._reset_accelerate()
    overrides = [f"teacher={teacher_dir}", f"data.latents={latent_shards}", f"output_dir={tmp_path / 'adv'}", *ARGS, *ADV, *steps,
                 "distill.adversarial.start_step=2"]
    trainer = Distiller(load_config(DistillConfig, None, overrides))
    trainer.fit()
    trainer.close()
    jobs._reset_accelerate()
    gated = lines(tmp_path / "adv/s")
    assert [m["loss"] for m in gated[:3]] == [m["loss"] for m in plain[:3]]  # step 3's loss is read before its G step
    assert gated[3]["loss"] != plain[3]["loss"]
    assert [("g_loss" in m, "d_loss" in m, "d_real" in m) for m in gated] == [(False,) * 3] * 2 + [(True,) * 3] * 2
    assert trainer.ladd.updates == 2
    fresh = load_teacher(teacher_dir).state_dict()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert all(torch.equal(v, fresh[k]) for k, v in trainer.teacher.state_dict().items())


def test_d_steps_counts_discriminator_updates_under_accumulation(teacher_dir, latent_shards, tmp_path):
    """d_steps 3, accumulation 2, heads from step 0 (d_warmup 1 before start_step 1): 3 updates per
    optimizer step, as the heads' AdamW counts them; G from step 2 on."""
    out = run(teacher_dir, latent_shards, tmp_path, *ADV, "steps=3", "checkpoint.every=3", "optim.grad_accum=2", "data.loader.batch_size=4",
              "distill.adversarial.d_steps=3", "distill.adversarial.start_step=1", "distill.adversarial.d_warmup=1")
    state = torch.load(out / "checkpoints/step-000003/ladd_optimizer.pt", weights_only=True)
    assert state["updates"] == 9
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {9}
    assert ["g_loss" in m for m in lines(out)] == [False, True, True]
    assert all("d_loss" in m for m in lines(out))


def test_resume_is_exact_with_the_heads_and_their_optimizer(teacher_dir, latent_shards, tmp_path):
    same = [*ADV, "distill.adversarial.start_step=1", "distill.adversarial.d_warmup=1", "distill.adversarial.d_steps=2",
            "checkpoint.every=2", "mixed_precision=bf16"]
    full = run(teacher_dir, latent_shards, tmp_path / "full", *same, "steps=4")
    run(teacher_dir, latent_shards, tmp_path / "part", *same, "steps=2")
    part = run(teacher_dir, latent_shards, tmp_path / "part", *same, "steps=4")
    assert lines(part) == lines(full)
    final = "checkpoints/step-000004"
    same_files(full / final, part / final, ("accelerate/model.safetensors", "target.safetensors", "ema.safetensors", "ladd_heads.safetensors"))
    a, b = (torch.load(r / final / "ladd_optimizer.pt", weights_only=True) for r in (full, part))
    assert a["updates"] == b["updates"] == 8
    for k, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in s.items())
    same_files(full / "model/transformer", part / "model/transformer", ("diffusion_pytorch_model.safetensors",))


def test_the_shipped_ladd_config_trains_shrunk(teacher_dir, latent_shards, tmp_path):
    """configs/distill_ladd_demo.yaml as the matrix shrinks it (``jobs.shipped_config_job``; no demo
    student here: from the teacher's copy), in this process: the heads train and are checkpointed."""
    path = jobs.ROOT_CONFIGS / "distill_ladd_demo.yaml"
    spec = jobs.shipped_config_job(path, {"latents": latent_shards, "teacher": teacher_dir}, tmp_path)
    result = jobs.run_job(spec)
    assert result["ok"], result["error"]
    assert (tmp_path / "distill_ladd_demo/checkpoints/step-000002/ladd_heads.safetensors").is_file()
    assert result["heads_checksum"]


# ---------------------------------------------------------------------------- the distributed cells


@pytest.fixture(scope="module")
def one_process_ladd(teacher_dir, latent_shards, tmp_path_factory) -> Path:
    """The one-process cell, run here; the 2-process cells are in the suite's one launch (``launched_jobs``)."""
    out = tmp_path_factory.mktemp("ladd")
    for spec in jobs.ladd_jobs(*jobs.LADD_CELLS[0], teacher_dir, latent_shards, out):
        (out / f"{spec['name']}.rank0.json").write_text(json.dumps(jobs.run_job(spec)))
    return out


@pytest.mark.xdist_group("launch")  # the worker that runs the suite's launch (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("cell", jobs.LADD_CELLS, ids=["ladd-" + jobs.cell_name(*c) for c in jobs.LADD_CELLS])
def test_adversarial_cell_trains_resumes_exactly_and_keeps_the_heads_identical(cell, request):
    from tests.test_matrix import check_export_is_the_ema, check_run_and_resume

    ladd_runs = request.getfixturevalue("one_process_ladd" if cell[0] == "one" else "launched_jobs")
    name, world = "ladd-" + jobs.cell_name(*cell), 1 if cell[0] == "one" else 2
    check_run_and_resume(ladd_runs, name, world, extra_states=("target.safetensors", "ladd_heads.safetensors"))
    check_export_is_the_ema(ladd_runs / name)
    for run_name in (name, f"{name}-resumed"):
        sums = [r["heads_checksum"] for r in jobs.results(ladd_runs, run_name, world)]
        assert all(s == sums[0] for s in sums), "the heads differ between ranks"
    saved = load_file(str(ladd_runs / name / f"checkpoints/step-{jobs.CELL_STEPS:06d}/ladd_heads.safetensors"))
    assert {k: float(v.astype(np.float64).sum()) for k, v in saved.items()} == pytest.approx(sums[0], rel=1e-9)
    assert all("g_loss" in m and "d_loss" in m for m in lines(ladd_runs / name)[jobs.LADD_START:])


def test_consistency_weight_zero_leaves_the_adversarial_term_alone(teacher_dir, latent_shards, tmp_path, capsys):
    """distill.consistency_weight 0 (LADD alone): before start_step the student gets no gradient at
    all (its weights stay the teacher's copy bit for bit, AdamW without weight decay), after it they
    move; the weight without the adversarial term is a one-line config error."""
    from safetensors.torch import load_file as load_torch

    out = run(teacher_dir, latent_shards, tmp_path / "a", *ADV, "steps=3", "checkpoint.every=1", "distill.consistency_weight=0",
              "distill.adversarial.start_step=2", "distill.adversarial.d_warmup=2")
    weights = [load_torch(str(out / f"checkpoints/step-{k:06d}/accelerate/model.safetensors")) for k in (1, 2, 3)]
    teacher = load_teacher(teacher_dir).state_dict()  # the student is its copy plus a guidance embedder (seeded by the run)
    assert all(torch.equal(weights[1][k], teacher[k]) for k in teacher)  # steps 1-2: 0 · consistency, no G yet
    assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0])
    assert any(not torch.equal(weights[2][k], weights[1][k]) for k in weights[2])  # step 3: the G term alone moves it
    jobs._reset_accelerate()
    capsys.readouterr()  # the run's progress bars
    with pytest.raises(SystemExit) as stop:
        distill.main([f"teacher={teacher_dir}", f"data.latents={latent_shards}", f"output_dir={tmp_path / 'b'}", *ARGS,
                      "distill.consistency_weight=0.5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.consistency_weight=0.5" in err[0]
