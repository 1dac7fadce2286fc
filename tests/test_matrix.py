"""The training paths users launch, each run for real on CPU: {one process, 2-process DDP, 2-process
DeepSpeed ZeRO-2, ZeRO-3} × {fp32, bf16} × gradient accumulation {1, 2}, and distillation under
ZeRO-3 in bf16 (fp16 needs a CUDA GPU: those cells are skipped here, with the reason).

Each cell trains 4 optimizer steps with a warmup + cosine schedule, checkpointing at steps 2 and 4,
then a copy of its run folder as it stood at step 2 resumes to step 4. Checked per cell: the loss
is finite; the LR each optimizer step used equals ``lr · lr_factor(step)`` (one schedule step per
optimizer step, whatever the world size and accumulation); the resumed run logs the same losses
and ends with the same EMA as the uninterrupted one (bit for bit); the exported model loads in
this plain process and holds the EMA; under DDP, gradient buckets are all-reduced only on the last
micro-batch of each accumulation window. The multi-process cells share one launch
(``launched_jobs`` in conftest); the one-process cells run here.

Also: accumulated gradients equal the large batch's; sample grids during training leave the
weights bit-identical; fp16 without a GPU is one clear line; an optimizer step that overflows
(fp16's loss scaler, on the CPU through ``jobs.loss_scaler``; DeepSpeed's own check) advances
nothing but its counter, on one process, under DDP and under ZeRO-2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.training.optim import OptimConfig, lr_factor
from tests import jobs

FP16_SKIP = ("fp16 needs a CUDA GPU: accelerate has no fp16 autocast on the CPU (it would train in fp32) and DeepSpeed "
             "refuses fp16 on a CPU without AVX512-FP16; the refusal itself is tested below")
CELLS = [(m, p, a) for m in jobs.MODES for p in jobs.PRECISIONS for a in jobs.ACCUMULATION]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_lrs(steps: int) -> list[float]:
    cfg = OptimConfig(lr=2e-3, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    return [cfg.lr * lr_factor(step, cfg, steps) for step in range(steps)]


@pytest.fixture(scope="module")
def one_process_runs(latent_shards, tmp_path_factory) -> Path:
    """The one-process cells, run in this process."""
    out = tmp_path_factory.mktemp("one")
    for precision in ("no", "bf16"):
        for accum in jobs.ACCUMULATION:
            for spec in jobs.cell_jobs("one", precision, accum, latent_shards, out):
                (out / f"{spec['name']}.rank0.json").write_text(json.dumps(jobs.run_job(spec)))
    return out


def check_run_and_resume(out: Path, name: str, world: int, extra_states: tuple[str, ...] = ()) -> dict:
    """The checks every cell shares; returns its figures for the summary table."""
    for result in [*jobs.results(out, name, world), *jobs.results(out, f"{name}-resumed", world)]:
        assert result["ok"], result["error"]
        assert result["world"] == world
    full, resumed = metrics(out / name), metrics(out / f"{name}-resumed")
    steps = jobs.CELL_STEPS
    assert [m["step"] for m in full] == [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in full)
    assert [m["lr"] for m in full] == pytest.approx(expected_lrs(steps), rel=1e-12, abs=0)
    assert [m["lr"] for m in resumed] == pytest.approx(expected_lrs(steps), rel=1e-12, abs=0)
    later = [m["loss"] for m in full if m["step"] > jobs.CELL_RESUME_AT]
    assert [m["loss"] for m in resumed if m["step"] > jobs.CELL_RESUME_AT] == later, "the resumed run drifted"
    final = f"checkpoints/step-{steps:06d}"
    for state in ("ema.safetensors", *extra_states):
        a, b = (load_file(str(out / run / final / state)) for run in (name, f"{name}-resumed"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), state
    return {"steps": steps, "final_loss": full[-1]["loss"], "resume": "exact"}


def check_export_is_the_ema(run: Path) -> None:
    from pipeline.models.dit import DiT

    exported = DiT.from_pretrained(run / "model/transformer")  # a plain process: no DeepSpeed, no accelerate
    ema = load_file(str(run / f"checkpoints/step-{jobs.CELL_STEPS:06d}/ema.safetensors"))
    state = exported.state_dict()
    assert set(state) == set(ema) and all(np.array_equal(state[k].numpy(), ema[k]) for k in ema)


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("mode, precision, accum", CELLS, ids=[jobs.cell_name(*c) for c in CELLS])
def test_cell_trains_resumes_exactly_and_exports(mode, precision, accum, request):
    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip(FP16_SKIP)
    out = request.getfixturevalue("one_process_runs" if mode == "one" else "launched_jobs")
    name, world = jobs.cell_name(mode, precision, accum), 1 if mode == "one" else 2
    check_run_and_resume(out, name, world)
    check_export_is_the_ema(out / name)
    assert (out / name / "samples/final.png").is_file() == jobs.draws_grid(precision, accum)  # no prompts: no grid
    if mode == "ddp":  # no all-reduce before the last micro-batch of a window
        for result in jobs.results(out, name, world):
            assert result["allreduce_micro"] and set(result["allreduce_micro"]) == {accum - 1}, result["allreduce_micro"]


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_zero3_ema_reads_the_whole_weights(launched_jobs):
    """With decay 0 the EMA is a copy of the weights: under ZeRO-3 it must equal, bit for bit, the
    fp32 weights DeepSpeed's own tool consolidates from the partitions (gathering by block works)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for result in jobs.results(launched_jobs, "zero3-ema-decay0"):
        assert result["ok"], result["error"]
    ckpt = launched_jobs / "zero3-ema-decay0/checkpoints/step-000002"
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "accelerate"), tag="pytorch_model")
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert set(weights) == set(ema) and all(np.array_equal(weights[k].detach().numpy(), ema[k]) for k in ema)


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_joint_blocks_and_the_refiner_train_under_zero3_and_resume_exactly(launched_jobs):
    """The text options users launch at scale: joint (MMDiT) blocks after a text refiner, ZeRO-3
    in bf16 with accumulation 2 and the EMA warmup; the export is a joint model holding the EMA."""
    name = "text-" + jobs.cell_name(*jobs.TEXT_CELL)
    check_run_and_resume(launched_jobs, name, 2)
    config = json.loads((launched_jobs / name / "model/transformer/config.json").read_text())
    assert (config["text_attention"], config["text_refiner_depth"]) == ("joint", 1)


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_distillation_under_zero3_in_bf16_resumes_exactly(launched_jobs):
    name = "distill-zero3-bf16-accum2"
    check_run_and_resume(launched_jobs, name, 2, extra_states=("target.safetensors",))
    info = json.loads((launched_jobs / name / "model/model_index.json").read_text())["info"]
    assert info["kind"] == "consistency_student"
    check_export_is_the_ema(launched_jobs / name)


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_autoencoder_under_ddp_in_bf16_with_accumulation(launched_jobs):
    """Both GAN updates: one LR schedule step per optimizer step, DDP all-reduces only at the window's
    last micro-batch (the discriminator's buckets too), and the resumed run ends bit-identical."""
    name = "autoencoder-ddp-bf16-accum2"
    for result in [*jobs.results(launched_jobs, name), *jobs.results(launched_jobs, f"{name}-resumed")]:
        assert result["ok"], result["error"]
        assert result["allreduce_micro"] and set(result["allreduce_micro"]) == {1}
    full, resumed = metrics(launched_jobs / name), metrics(launched_jobs / f"{name}-resumed")
    assert [m["lr"] for m in full] == pytest.approx(expected_lrs(jobs.CELL_STEPS), rel=1e-12, abs=0)
    assert [m["l1_rec"] for m in resumed] == [m["l1_rec"] for m in full]
    final = f"checkpoints/step-{jobs.CELL_STEPS:06d}"
    for state in ("accelerate/model.safetensors", "accelerate/model_1.safetensors"):  # the VAE, the discriminator
        a, b = (load_file(str(launched_jobs / run / final / state)) for run in (name, f"{name}-resumed"))
        assert all(np.array_equal(a[k], b[k]) for k in a), state


# ---------------------------------------------------------------------------- overflowing optimizer steps


def check_overflow_skipped(out: Path, name: str, world: int) -> None:
    """The optimizer step that would have been step ``OVERFLOW_AT`` saw inf gradients (rank 0's): that
    window advanced nothing (step, LR schedule, weights, EMA and its warm-up, log line, checkpoint)
    but ``overflow_steps``; the next window trained as step ``OVERFLOW_AT``."""
    from pipeline.training.dit_config import EMAConfig

    at, steps = jobs.OVERFLOW_AT, jobs.OVERFLOW_STEPS
    ema = EMAConfig(**jobs.OVERFLOW_EMA)
    for result in jobs.results(out, name, world):
        assert result["ok"], result["error"]
        windows = result["windows"]  # the state at each window's start, then at the end
        assert len(windows) == steps + 2, windows  # one window more than steps: the skipped one
        hit, after, following = windows[at - 1], windows[at], windows[at + 1]
        frozen = ("step", "lr_steps", "weights", "ema")
        assert {k: after[k] for k in frozen} == {k: hit[k] for k in frozen}, "the skipped step advanced something"
        assert (hit["overflow_steps"], after["overflow_steps"]) == (0, 1)
        if hit["scale"] is not None:  # the loss scaler really skipped (and backed off)
            assert after["scale"] == hit["scale"] / 2
        assert (following["step"], following["lr_steps"]) == (at, at)
        assert following["weights"] != after["weights"] and following["ema"] != after["ema"], "the next window did not train"
        assert (windows[-1]["step"], windows[-1]["lr_steps"], windows[-1]["overflow_steps"]) == (steps, steps, 1)
        expected = [[w, ema.decay_at(w + (w < at))] for w in range(steps + 1) if w != at - 1]  # window, decay
        assert result["ema_updates"] == expected, "the EMA was updated on the skipped window or its warm-up advanced"
    lines = metrics(out / name)
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert [m["lr"] for m in lines] == pytest.approx(expected_lrs(steps), rel=1e-12, abs=0)
    assert [m["overflow_steps"] for m in lines] == [int(s >= at) for s in range(1, steps + 1)]
    assert all(m["skipped_steps"] == 0 and math.isfinite(m["loss"]) for m in lines)
    assert [p.name for p in (out / name / "checkpoints").iterdir()] == [f"step-{steps:06d}"]
    state = json.loads((out / name / f"checkpoints/step-{steps:06d}/train_state.json").read_text())
    assert (state["step"], state["overflow_steps"]) == (steps, 1)


def test_an_overflowing_fp16_step_advances_nothing_but_its_counter(latent_shards, tmp_path):
    """One process, fp16 with torch's loss scaler (``jobs.loss_scaler``, on the CPU too),
    accumulation 2: the overflowing step is skipped and counted; the checkpoint holds the backed-off
    loss scale, and a resumed run keeps the count."""
    spec = jobs.overflow_job("one", "fp16", latent_shards, tmp_path)
    (tmp_path / f"{spec['name']}.rank0.json").write_text(json.dumps(jobs.run_job(spec)))
    check_overflow_skipped(tmp_path, spec["name"], 1)
    scaler = torch.load(tmp_path / spec["name"] / f"checkpoints/step-{jobs.OVERFLOW_STEPS:06d}/accelerate/scaler.pt", weights_only=True)
    assert scaler["scale"] == jobs.LOSS_SCALE / 2
    more = {**spec, "overrides": [*spec["overrides"], f"steps={jobs.OVERFLOW_STEPS + 1}"], "overflow_at": None}
    assert jobs.run_job(more)["ok"]
    last = metrics(tmp_path / spec["name"])[-1]
    assert (last["step"], last["overflow_steps"]) == (jobs.OVERFLOW_STEPS + 1, 1)


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("mode, precision", jobs.OVERFLOW_CELLS, ids=[f"{m}-{p}" for m, p in jobs.OVERFLOW_CELLS])
def test_an_overflowing_step_is_skipped_on_every_rank(mode, precision, launched_jobs):
    """Two processes: inf gradients on rank 0 alone reach rank 1 through the all-reduce (DDP: the
    loss scaler's check; ZeRO-2 bf16: DeepSpeed's own overflow check, read through accelerate), and
    both ranks skip the step alike."""
    check_overflow_skipped(launched_jobs, "overflow-" + jobs.cell_name(mode, precision, 2), 2)


def test_fp16_without_a_gpu_is_one_line(latent_shards, tmp_path, capsys):
    from pipeline import train

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 runs")
    code = train.main([f"data.latents={latent_shards}", f"output_dir={tmp_path}", "mixed_precision=fp16", "deepspeed.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "mixed_precision=fp16 needs a CUDA GPU" in err


def test_bf16_without_bf16_kernels_is_one_warning_line_and_trains_as_asked(monkeypatch, capsys):
    """On a CPU without bf16 matrix kernels (AVX2 only) bf16 matmuls run ~14x slower than fp32:
    one warning line names that and the fix; bf16 is still what runs. None where the kernels
    exist, and none for fp32."""
    from pipeline.training import distributed

    if not torch.cuda.is_available():  # the probe native_bf16 reads exists in this torch (else it answers yes)
        assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)
    for native, precision, lines in ((False, "bf16", 1), (True, "bf16", 0), (False, "no", 0)):
        monkeypatch.setattr(distributed, "native_bf16", lambda native=native: native)
        distributed.check_precision(precision)
        err = capsys.readouterr().err
        assert err.count("\n") == lines and ("mixed_precision=no trains in fp32" in err) == bool(lines), (native, precision, err)
    assert distributed.compute_dtype("bf16") == torch.bfloat16


# ---------------------------------------------------------------------------- accumulation and sampling


def test_two_micro_batches_of_half_give_the_large_batch_gradients(latent_shards, tmp_path):
    """Accumulation 2 × B/2 against 1 × B, the same samples, times and noise: the gradients reaching
    the optimizer agree to 1e-6 of their scale (fp32; float summation order differs)."""
    from pipeline.config import load_config
    from pipeline.diffusion.flow import flow_loss
    from pipeline.training.dit import Trainer, condition
    from pipeline.training.dit_config import TrainConfig

    class FixedDraws(Trainer):
        def loss(self, batch):
            device = self.accelerator.device
            return flow_loss(self.model, batch["latent"].to(device), condition(batch, 0.0, device), batch["t"], batch["noise"]), batch["t"]

        def optimizer_step(self):
            self.grads = {n: p.grad.detach().clone() for n, p in self.accelerator.unwrap_model(self.model).named_parameters()}
            super().optimizer_step()

    def trainer(batch: int, accum: int) -> FixedDraws:
        jobs._reset_accelerate()
        overrides = [f"data.latents={latent_shards}", f"output_dir={tmp_path}", "deepspeed.enabled=false", "model.overrides={depth: 2}",
                     f"data.loader.batch_size={batch}", f"optim.grad_accum={accum}", "p_uncond=0"]
        return FixedDraws(load_config(TrainConfig, None, overrides))

    large = trainer(8, 1)
    batch = next(iter(large.loader))
    g = torch.Generator().manual_seed(0)
    batch["t"], batch["noise"] = torch.rand(8, generator=g), torch.randn(batch["latent"].shape, generator=g)
    large.micro_step(batch)
    small = trainer(4, 2)
    halves = [{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4)]
    small.micro_step(halves[0])
    assert not hasattr(small, "grads"), "the optimizer stepped before the window's last micro-batch"
    small.micro = 1
    small.micro_step(halves[1])
    for name, grad in large.grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (small.grads[name] - grad).abs().max().item() <= 1e-6 * scale, name
    jobs._reset_accelerate()


def test_sample_grids_during_training_leave_the_weights_bit_identical(latent_shards, tmp_path):
    runs = {}
    for every in (0, 1):
        spec = jobs.job(f"grid{every}", "train", [f"data.latents={latent_shards}", f"output_dir={tmp_path}", f"run=grid{every}",
                        "deepspeed.enabled=false", "model.overrides={depth: 2}", "data.loader.batch_size=4", "steps=3",
                        "checkpoint.every=3", f"sampling.every={every}", "sampling.steps=2", "ema.decay=0.9"])
        result = jobs.run_job(spec)
        assert result["ok"], result["error"]
        runs[every] = tmp_path / f"grid{every}/checkpoints/step-000003"
    assert len(list((tmp_path / "grid1/samples").glob("step-*.png"))) == 3
    for state in ("accelerate/model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(runs[every] / state)) for every in (0, 1))
        assert all(np.array_equal(a[k], b[k]) for k in a), state


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_and_keep_their_names(latent_shards, tmp_path):
    """``model.compile=true`` (per-block torch.compile): the same losses as eager up to the compiler's
    float reordering, the same checkpoint keys, and an export that loads."""
    losses = {}
    for compiled in (False, True):
        name = f"compile-{compiled}"
        spec = jobs.job(name, "train", [f"data.latents={latent_shards}", f"output_dir={tmp_path}", f"run={name}", "deepspeed.enabled=false",
                        "model.overrides={depth: 2}", "data.loader.batch_size=4", "steps=2", "checkpoint.every=2",
                        "logging.every=1", "sampling.steps=2", f"model.compile={str(compiled).lower()}"])
        result = jobs.run_job(spec)
        assert result["ok"], result["error"]
        losses[compiled] = [m["loss"] for m in metrics(tmp_path / name)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    keys = [set(load_file(str(tmp_path / f"compile-{c}/checkpoints/step-000002/accelerate/model.safetensors"))) for c in (False, True)]
    assert keys[0] == keys[1]
    from pipeline.models.dit import DiT

    assert DiT.from_pretrained(tmp_path / "compile-True/model/transformer").config.depth == 2


# ---------------------------------------------------------------------------- image-conditioned cells


LAUNCHED_COND_CELLS = [cell for cell in jobs.COND_CELLS if cell[0] != "one"]  # the one-process cell: tests/test_image_condition.py


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("cell", LAUNCHED_COND_CELLS, ids=["cond-" + jobs.cell_name(*c) for c in LAUNCHED_COND_CELLS])
def test_image_conditioned_cell_trains_resumes_exactly_and_exports(cell, launched_jobs):
    """An image-conditioned run on paired latents (``jobs.cond_jobs``: the teacher widened under DDP,
    read as a sequence-conditioned model under ZeRO-2; bf16, accumulation 2, three-way dropout):
    exact resume, the export is the EMA and records its mode; DDP all-reduces at the window's end."""
    name = "cond-" + jobs.cell_name(*cell)
    check_run_and_resume(launched_jobs, name, 2)
    check_export_is_the_ema(launched_jobs / name)
    config = json.loads((launched_jobs / name / "model/transformer/config.json").read_text())
    info = json.loads((launched_jobs / name / "model/model_index.json").read_text())["info"]
    assert config["image_condition"] == info["image_condition"]["mode"] == jobs.COND_CELLS[cell]
    if cell[0] == "ddp":
        for result in jobs.results(launched_jobs, name):
            assert result["allreduce_micro"] and set(result["allreduce_micro"]) == {cell[2] - 1}, result["allreduce_micro"]
