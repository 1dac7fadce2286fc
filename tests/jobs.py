"""Real training runs, several to one launch: the precision × parallelism × accumulation matrix,
every shipped config, distillation under ZeRO-3. Each job is a real trainer (``Trainer``,
``Distiller``, ``AutoencoderTrainer``) or ``data_tools.encode`` built from a config file and
overrides; the launch's processes run the jobs one after another, resetting accelerate's state
in between, so one 2-process gloo launch (one interpreter start-up per rank, one DeepSpeed op
build) serves them all. One-process cells call :func:`run_job` in the pytest process.

    python -m accelerate.commands.launch --config_file launch/accelerate/cpu2.yaml -m tests.jobs JOBS.json OUT

Each rank writes ``OUT/NAME.rank{r}.json``: ``{"ok", "error", "world", "allreduce_micro"}``, where
``allreduce_micro`` lists, for each gradient bucket DDP all-reduced, the index of the micro-batch
in its accumulation window (DDP runs only); a job with ``overflow_at`` adds ``windows`` and
``ema_updates`` (:func:`probe_overflow`). A job that fails on every rank is recorded and the next
one runs; a failure on one rank alone leaves the other waiting, and the launch's timeout ends it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def job(name: str, stage: str, overrides: list[str], config: str | None = None, resume_from: dict | None = None,
        count_allreduce: bool = False, loss_scaler: bool = False, overflow_at: int | None = None) -> dict:
    """A job description (JSON-ready). ``resume_from={"run": DIR, "step": N}``: before training,
    copy that run folder with its checkpoints after step N, its export and its metrics after N
    removed, so this run resumes from step N of that one. ``loss_scaler``: fp16's loss scaler in
    fp32 compute, on the CPU too (:func:`loss_scaler`); ``overflow_at``: the optimizer step that would be step N
    overflows (:func:`probe_overflow`, a DiT stage)."""
    return {"name": name, "stage": stage, "config": config, "overrides": overrides, "resume_from": resume_from,
            "count_allreduce": count_allreduce, "loss_scaler": loss_scaler, "overflow_at": overflow_at}


def copy_run(src: Path, dst: Path, step: int) -> None:
    """``src`` as it stood when its step-``step`` checkpoint was the newest."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model", "samples", "vae"))
    for ckpt in (dst / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _import_stages() -> None:
    """Every module the jobs use, imported once up front (so :func:`gc.freeze` covers them)."""
    import data_tools.encode  # noqa: F401
    import pipeline.training.autoencoder  # noqa: F401
    import pipeline.training.distill  # noqa: F401
    import pipeline.training.dit  # noqa: F401
    import pipeline.training.pix2pix  # noqa: F401


def _reset_accelerate() -> None:
    """A fresh ``Accelerator`` may take other settings (precision, DeepSpeed); the process group stays
    (accelerate builds its state on the one already initialised)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


def _build(stage: str, config: str | None, overrides: list[str]):
    from pipeline.config import load_config

    if stage == "train":
        from pipeline.training.dit import Trainer
        from pipeline.training.dit_config import TrainConfig

        return Trainer(load_config(TrainConfig, config, overrides))
    if stage == "distill":
        from pipeline.distill import recipe
        from pipeline.training.distill import DistillConfig

        cfg = load_config(DistillConfig, config, overrides)
        return recipe(cfg)[0](cfg)
    if stage == "autoencoder":
        from pipeline.training.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer

        return AutoencoderTrainer(load_config(AutoencoderTrainConfig, config, overrides))
    if stage == "pix2pix":
        from pipeline.training.pix2pix import Pix2PixTrainConfig, Pix2PixTrainer

        return Pix2PixTrainer(load_config(Pix2PixTrainConfig, config, overrides))
    raise ValueError(f"unknown stage {stage!r}")


def _count_allreduce(trainer, calls: list[int]) -> None:
    """Record the micro-batch index of every bucket DDP all-reduces (then all-reduce it as usual)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(trainer.micro)
        return allreduce_hook(state, bucket)

    for model in (trainer.model, getattr(trainer, "disc", None)):  # the autoencoder's discriminator is a DDP module too
        if model is not None:
            model.register_comm_hook(state=None, hook=hook)


LOSS_SCALE = 2.0**10  # the test scaler's first scale: not 1, so an unscaling too many or too few shows


@contextmanager
def loss_scaler(enabled: bool = True) -> Iterator[None]:
    """fp16's loss scaling in fp32 compute, through accelerate's own code, on the CPU too. Without a
    GPU accelerate builds no ``GradScaler`` and ``check_precision`` refuses fp16; inside this context
    a recipe's ``mixed_precision=fp16`` accelerator is let through and gets torch's ``GradScaler``
    for its device (first scale ``LOSS_SCALE``) before ``prepare``, so ``backward`` scales the loss,
    ``unscale_gradients`` / ``clip_grad_norm_`` unscale, and each prepared optimizer steps through
    ``scaler.step`` (inf/nan check, skipped step, ``step_was_skipped``) and ``scaler.update``. The
    forward stays fp32 (accelerate's autocast is off: ``AutocastKwargs(enabled=False)``), so
    gradients compare at fp32 tolerance, on any device."""
    if not enabled:
        yield
        return
    from unittest import mock

    import torch
    from accelerate.utils import AutocastKwargs, DistributedType

    from pipeline.training import autoencoder, distributed, dit

    real = distributed.create_accelerator

    def create(**kwargs):
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), AutocastKwargs(enabled=False)]
        accelerator = real(**kwargs)
        if accelerator.mixed_precision == "fp16" and accelerator.distributed_type != DistributedType.DEEPSPEED:
            accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=LOSS_SCALE)
            accelerator.native_amp = True
        return accelerator

    with (mock.patch.object(distributed, "check_precision", lambda mixed_precision: None),
          mock.patch.object(dit, "create_accelerator", create), mock.patch.object(autoencoder, "create_accelerator", create)):
        yield


def probe_overflow(trainer, at: int, rank: int, record: dict) -> None:
    """Make the optimizer step that would be step ``at`` overflow, once: rank 0 turns every gradient
    of that window's first micro-batch into inf (other ranks get it through the all-reduce). Records
    in ``record["windows"]`` the state at each window's start (:func:`window_state`) and in
    ``record["ema_updates"]`` ``[window, decay]`` of each EMA update."""
    import torch

    def poison(grad: torch.Tensor) -> torch.Tensor:
        hit = rank == 0 and trainer.micro == 0 and trainer.step == at - 1 and trainer.overflow_steps == 0
        return torch.full_like(grad, float("inf")) if hit else grad

    for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
        if p.requires_grad:
            p.register_hook(poison)
    windows, updates = record.setdefault("windows", []), record.setdefault("ema_updates", [])
    micro_step, ema_update = trainer.micro_step, trainer.ema.update

    def recorded_micro_step(batch: dict):
        if trainer.micro == 0:
            windows.append(window_state(trainer))
        return micro_step(batch)

    def recorded_update(group, decay=None):
        updates.append([len(windows) - 1, decay])
        return ema_update(group, decay)

    trainer.micro_step, trainer.ema.update = recorded_micro_step, recorded_update


def window_state(trainer) -> dict:
    """What a skipped optimizer step must leave alone, with the counter and the loss scale."""
    scaler = trainer.accelerator.scaler
    return {"step": trainer.step, "overflow_steps": trainer.overflow_steps, "lr_steps": trainer.schedules["scheduler"].last_epoch,
            "ema": sum(float(p.double().sum()) for p in trainer.ema.module.parameters()),
            "weights": sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
            "scale": scaler.get_scale() if scaler is not None else None}


def run_job(spec: dict, rank: int = 0) -> dict:
    """Run one job in this process; what happened, as a dict."""
    result = {"name": spec["name"], "ok": False, "error": None, "world": None, "allreduce_micro": []}
    _reset_accelerate()  # whatever ran in this process before
    environ = dict(os.environ)  # accelerate records a DeepSpeed run in the environment (ACCELERATE_USE_DEEPSPEED)
    try:
        if spec.get("resume_from") and rank == 0:
            src = Path(spec["resume_from"]["run"])
            copy_run(src, _run_dir(spec), spec["resume_from"]["step"])
        _barrier()
        if spec["stage"] == "encode":
            result["world"] = _encode(spec)
        else:
            with loss_scaler(spec.get("loss_scaler", False)):
                trainer = _build(spec["stage"], spec["config"], spec["overrides"])
            result["world"] = trainer.accelerator.num_processes
            if spec.get("count_allreduce"):
                _count_allreduce(trainer, result["allreduce_micro"])
            if spec.get("overflow_at"):
                probe_overflow(trainer, spec["overflow_at"], rank, result)
            trainer.fit()
            if getattr(trainer, "ladd", None) is not None:  # LADD's replicated heads: the same on every rank?
                result["heads_checksum"] = {n: float(p.detach().double().sum()) for n, p in trainer.ladd.heads.named_parameters()}
            if spec.get("overflow_at"):
                result["windows"].append(window_state(trainer))  # the end
            trainer.accelerator.wait_for_everyone()
        result["ok"] = True
    except BaseException as err:  # recorded; the next job runs
        result["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"
    finally:
        _reset_accelerate()
        os.environ.clear()
        os.environ.update(environ)
    return result


def _run_dir(spec: dict) -> Path:
    values = dict(o.split("=", 1) for o in spec["overrides"])
    return Path(values["output_dir"]) / values["run"]


def _encode(spec: dict) -> int:
    from data_tools.encode import EncodeConfig, encode
    from pipeline.config import load_config
    from pipeline.training.distributed import create_accelerator

    accelerator = create_accelerator()
    encode(load_config(EncodeConfig, spec["config"], spec["overrides"]), accelerator)
    accelerator.wait_for_everyone()
    return accelerator.num_processes


def main(argv: list[str]) -> int:
    from pipeline.training.distributed import dist_env

    jobs, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    rank = dist_env().rank
    _import_stages()
    gc.freeze()  # what the imports made lives on: the collections between jobs scan only what the jobs made
    for spec in jobs:
        start = time.perf_counter()
        result = run_job(spec, rank)
        result["seconds"] = round(time.perf_counter() - start, 2)
        (out / f"{spec['name']}.rank{rank}.json").write_text(json.dumps(result))
        print(f"tests.jobs: rank {rank} {spec['name']}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ---------------------------------------------------------------------------- the jobs the tests launch

MODES = {  # parallelism: the overrides that select it (one process and DDP differ by the launch)
    "one": ["deepspeed.enabled=false"],
    "ddp": ["deepspeed.enabled=false"],
    "zero2": ["deepspeed.enabled=true", "deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.enabled=true", "deepspeed.zero_stage=3"],
}
PRECISIONS = ("no", "bf16", "fp16")
ACCUMULATION = (1, 2)
CELL_STEPS, CELL_RESUME_AT = 4, 2
CELL_LR = ["optim.lr=2e-3", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]


def cell_name(mode: str, precision: str, accum: int) -> str:
    return f"{mode}-{precision}-accum{accum}"


def draws_grid(precision: str, accum: int) -> bool:
    """Whether a cell draws its final sample grid: the bf16 cells with accumulation, one per
    parallelism; the others set no prompts (no grid), which saves the grid's encoders each run."""
    return precision == "bf16" and accum == 2


VALIDATION = ("validation.every=2", "validation.count=8", "validation.bins=3", "validation.batch_size=8")  # 3 batches of 8 units


def validates(precision: str, accum: int) -> bool:
    """Whether a cell runs the validation loss (``VALIDATION``, held out from its latents): the fp32
    cells without accumulation, one per parallelism; under 2 ranks the 3 batches split 2 + 1, so
    ZeRO-3's rank 1 runs a spare forward (``tests/test_validation.py`` checks the values)."""
    return precision == "no" and accum == 1


def cell_jobs(mode: str, precision: str, accum: int, latents: Path, out: Path, prefix: str = "", extra: tuple[str, ...] = ()) -> list[dict]:
    """A 4-step run that checkpoints at 2 and 4, and a copy of it resumed from step 2."""
    name = prefix + cell_name(mode, precision, accum)
    grid = ["sampling.steps=2"] if draws_grid(precision, accum) else ["sampling.prompts=[]"]
    if validates(precision, accum) and not prefix:
        extra = (*VALIDATION, *extra)
    common = [f"data.latents={latents}", f"output_dir={out}", "model.overrides={depth: 2}", "data.loader.batch_size=4", *extra,
              f"optim.grad_accum={accum}", f"mixed_precision={precision}", *CELL_LR, *MODES[mode], f"steps={CELL_STEPS}",
              f"checkpoint.every={CELL_RESUME_AT}", "checkpoint.keep=5", "logging.every=1", *grid, "ema.decay=0.9"]
    ddp = mode == "ddp"
    full = job(name, "train", [*common, f"run={name}"], count_allreduce=ddp)
    resumed = job(f"{name}-resumed", "train", [*common, f"run={name}-resumed"],
                  resume_from={"run": str(out / name), "step": CELL_RESUME_AT}, count_allreduce=ddp)
    return [full, resumed]


BUCKET_CELL = ("zero2", "bf16", 2)


def bucket_jobs(latents: Path, out: Path) -> list[dict]:
    """A cell on aspect-ratio buckets (``buckets-zero2-bf16-accum2``): ranks step together on
    batches of different shapes, 2 data workers each, a small shuffle buffer, shift auto."""
    extra = ("data.loader.num_workers=2", "data.loader.shuffle_buffer=4", "timesteps.shift=auto", "timesteps.shift_base_tokens=16")
    return cell_jobs(*BUCKET_CELL, latents, out, prefix="buckets-", extra=extra)


TEXT_CELL = ("zero3", "bf16", 2)


def text_jobs(latents: Path, out: Path) -> list[dict]:
    """A cell with the text options (``text-zero3-bf16-accum2``): joint (MMDiT) blocks after a text
    refiner, under ZeRO-3 (two-stream blocks partitioned, the EMA gathers them whole) with the EMA
    warmup schedule."""
    extra = ("model.text_attention=joint", "model.text_refiner_depth=1", "ema.warmup_power=0.75")
    return cell_jobs(*TEXT_CELL, latents, out, prefix="text-", extra=extra)


LORA = ("lora.rank=4", "lora.alpha=8", "lora.targets=attention_mlp")
LORA_CELLS = (  # in the 2-process launch: every parallelism × precision; accumulation 1 and 2 under DDP (~25 s in all)
    *((mode, precision, accum) for mode in ("ddp",) for precision in ("no", "bf16") for accum in ACCUMULATION),
    ("zero2", "no", 1), ("zero2", "bf16", 2), ("zero3", "no", 1), ("zero3", "bf16", 2),
)
LORA_EXTRA = {("ddp", "bf16"): ("lora.base_dtype=bf16",)}  # DeepSpeed bf16 casts the whole module itself


def lora_jobs(mode: str, precision: str, accum: int, latents: Path, base: Path, out: Path, extra: tuple[str, ...] = (),
              grid: bool = False) -> list[dict]:
    """A LoRA cell (``lora-MODE-PRECISION-accumN``): rank-4 adapters on the attention and MLP
    linears of the frozen model folder ``base`` (``model.init``; a trained one: a fresh DiT outputs
    zero, so its adapters would get no gradient), run 4 steps and resumed from step 2; a final
    sample grid only with ``grid`` (the matrix's cells draw theirs)."""
    extra = (*LORA, f"model.init={base}", *LORA_EXTRA.get((mode, precision), ()), *extra)
    specs = cell_jobs(mode, precision, accum, latents, out, prefix="lora-", extra=extra)
    no_grid = [] if grid else ["sampling.prompts=[]"]
    return [{**spec, "overrides": [*spec["overrides"], *no_grid]} for spec in specs]


COND = ("p_uncond=0.1", "p_drop_image=0.1", "p_drop_both=0.1")  # three-way dropout (InstructPix2Pix: 0.05 each)
COND_CELLS = {  # (mode, precision, accum): image_condition; DDP and ZeRO-2 in the 2-process launch, one process in tests/test_image_condition.py
    ("one", "bf16", 2): "concat", ("ddp", "bf16", 2): "concat", ("zero2", "bf16", 2): "sequence",
}


def cond_jobs(mode: str, precision: str, accum: int, latents: Path, base: Path, out: Path, grid: bool = False,
              extra: tuple[str, ...] = ()) -> list[dict]:
    """An image-conditioned cell (``cond-MODE-PRECISION-accumN``) on paired latents: the text-to-image
    model folder ``base`` (``model.init``) widened (``concat``) or read as is (``sequence``,
    ``COND_CELLS``), three-way dropout; run 4 steps and resumed from step 2; a final grid (source |
    output, dual guidance; ``sampling.sources``) only with ``grid``."""
    mode_extra = (f"model.init={base}", f"model.image_condition={COND_CELLS[(mode, precision, accum)]}", *COND, *extra)
    specs = cell_jobs(mode, precision, accum, latents, out, prefix="cond-", extra=mode_extra)
    no_grid = [] if grid else ["sampling.sources=0"]
    return [{**spec, "overrides": [*spec["overrides"], *no_grid]} for spec in specs]


def ema_copy_job(latents: Path, out: Path) -> dict:
    """ZeRO-3 with ``ema.decay=0``: the EMA must then be the weights themselves, read whole."""
    return job("zero3-ema-decay0", "train", [f"data.latents={latents}", f"output_dir={out}", "run=zero3-ema-decay0", *MODES["zero3"],
                                              "model.overrides={depth: 2}", "data.loader.batch_size=4", "ema.decay=0", "steps=2",
                                              "checkpoint.every=2", "sampling.steps=2"])


SHRUNK_LOADER = ["data.loader.batch_size=4", "data.loader.num_workers=0", "data.loader.shards_per_group=1"]
SHRUNK_RUN = ["steps=2", "checkpoint.every=2", "logging.logger=none", "logging.every=1"]


def shipped_config_job(path: Path, inputs: dict, out: Path) -> dict:
    """A job that trains ``configs/NAME.yaml`` shrunk: tiny model, small batch, 2 optimizer steps,
    local data and encoders; its precision, parallelism, accumulation, schedule and timesteps kept."""
    name, where = path.stem, [f"output_dir={out}", f"run={path.stem}"]
    if name.startswith(("dit_", "distill_", "pixart_", "ct_")):
        held_out = ["validation.count=8", "validation.batch_size=8"]  # when the config validates: 8 of the 48 latents
        shrunk = [f"data.latents={inputs['latents']}", *where, *SHRUNK_LOADER, *SHRUNK_RUN, "sampling.steps=2", *held_out]
        if name.startswith("distill_"):
            return job(name, "distill", [*shrunk, f"teacher={inputs['teacher']}", "distill.student_init=null"], str(path))  # no demo student here
        if name.startswith("ct_"):  # teacher-free consistency training (distill.mode=ct): the tiny teacher is its model.init
            return job(name, "distill", [*shrunk, f"model.init={inputs['teacher']}"], str(path))
        if "_lora_" in name:  # a fine-tune: the tiny teacher is its model.init
            return job(name, "train", [*shrunk, f"model.init={inputs['teacher']}"], str(path))
        if "_cond_" in name:  # image-conditioned: the tiny teacher widened, on the paired latents
            paired = [f"data.latents={inputs['paired_latents']}" if o.startswith("data.latents=") else o for o in shrunk]
            return job(name, "train", [*paired, f"model.init={inputs['teacher']}"], str(path))
        tiny = "PixArt-tiny" if name.startswith("pixart_") else "DiT-tiny"
        return job(name, "train", [*shrunk, f"model.name={tiny}", "model.overrides={depth: 2}"], str(path))
    if name.startswith("autoencoder_"):
        shrunk = [f"data.shards={inputs['images']}", *where, *SHRUNK_LOADER, *SHRUNK_RUN, "data.resolution=32",
                  "data.held_out=8", "factor_samples=16", "model.block_out_channels=[32, 32]", "model.sample_size=32",
                  "loss.disc_start=1"]  # the discriminator's update runs too
        return job(name, "autoencoder", shrunk, str(path))
    if name.startswith("pix2pix_"):  # the baselines (cgan, l2) on the paired image shards, tiny U-Net and PatchGAN
        shrunk = [f"data.shards={inputs['paired_images']}", *where, *SHRUNK_LOADER, *SHRUNK_RUN, "data.resolution=32",
                  "data.held_out=8", "model.base_channels=8", "model.depth=3", "loss.disc_channels=8"]
        return job(name, "pix2pix", shrunk, str(path))
    if name.startswith("encode_"):
        text = inputs["text"]  # the tiny encoders' TextEncodersConfig as a dict
        shrunk = [f"input={inputs['images']}", f"output={out / name}", f"vae.path={inputs['vae']}",
                  f"text.t5.path={text['t5']['path']}", f"text.clip.path={text['clip']['path']}"]
        return job(name, "encode", shrunk, str(path))
    raise AssertionError(f"{path.name}: no stage known for this config name; teach tests/jobs.py to shrink it")


ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_CONFIGS = sorted(ROOT_CONFIGS.glob("*.yaml"))


def distill_jobs(teacher: Path, latents: Path, out: Path, mode: str = "zero3", precision: str = "bf16", accum: int = 2) -> list[dict]:
    """Consistency distillation (student, export EMA, target EMA, frozen teacher): a 4-step run and its
    resumed copy, validating (``VALIDATION``: the student partitioned, a spare forward on rank 1)."""
    name = f"distill-{mode}-{precision}-accum{accum}"
    common = [f"teacher={teacher}", f"data.latents={latents}", f"output_dir={out}", *MODES[mode], f"mixed_precision={precision}",
              f"optim.grad_accum={accum}", "data.loader.batch_size=4", *CELL_LR, "distill.intervals=8", *VALIDATION,
              f"steps={CELL_STEPS}", f"checkpoint.every={CELL_RESUME_AT}", "checkpoint.keep=5", "logging.every=1", "sampling.steps=2"]
    return [job(name, "distill", [*common, f"run={name}"]),
            job(f"{name}-resumed", "distill", [*common, f"run={name}-resumed"], resume_from={"run": str(out / name), "step": CELL_RESUME_AT})]


LADD_CELLS = (("one", "no", 1), ("ddp", "bf16", 2), ("zero2", "no", 1), ("zero3", "bf16", 2))  # the first runs in pytest
LADD_START = 1  # the generator term from this optimizer step; the heads from step 0 (d_warmup 1)


def ladd_jobs(mode: str, precision: str, accum: int, teacher: Path, latents: Path, out: Path) -> list[dict]:
    """Consistency distillation with LADD's adversarial term (``ladd-MODE-PRECISION-accumN``): the
    heads train from step 0 with 2 updates per student step, the generator term from step 1; a
    4-step run and its copy resumed from step 2 (heads and their optimizer from the checkpoint)."""
    name = "ladd-" + cell_name(mode, precision, accum)
    adversarial = ["distill.adversarial.weight=0.5", f"distill.adversarial.start_step={LADD_START}", "distill.adversarial.d_warmup=1",
                   "distill.adversarial.d_steps=2", "distill.adversarial.lr=1e-3", "distill.adversarial.grad_clip=1.0",
                   "distill.adversarial.min_t=0.3", "distill.adversarial.s_mean=-1"]
    common = [f"teacher={teacher}", f"data.latents={latents}", f"output_dir={out}", *MODES[mode], f"mixed_precision={precision}",
              f"optim.grad_accum={accum}", "data.loader.batch_size=4", *CELL_LR, "distill.intervals=8", *adversarial,
              f"steps={CELL_STEPS}", f"checkpoint.every={CELL_RESUME_AT}", "checkpoint.keep=5", "logging.every=1", "sampling.prompts=[]"]
    return [job(name, "distill", [*common, f"run={name}"]),
            job(f"{name}-resumed", "distill", [*common, f"run={name}-resumed"], resume_from={"run": str(out / name), "step": CELL_RESUME_AT})]


CT_CELLS = (("ddp", "no", 1, "ema"), ("zero3", "bf16", 2, "stopgrad"))  # mode, precision, accumulation, ct.target


def ct_jobs(mode: str, precision: str, accum: int, target: str, teacher: Path, latents: Path, out: Path) -> list[dict]:
    """Teacher-free consistency training (``distill.mode=ct``, ECT from the tiny teacher's weights by
    ``model.init``; no teacher loaded) with a ``target`` network (``ema``: checkpointed; ``stopgrad``:
    a second, gradient-free forward of the prepared model): a 4-step run and its resumed copy."""
    name = f"ct-{cell_name(mode, precision, accum)}-{target}"
    common = [f"model.init={teacher}", f"data.latents={latents}", f"output_dir={out}", *MODES[mode], f"mixed_precision={precision}",
              f"optim.grad_accum={accum}", "data.loader.batch_size=4", *CELL_LR, "distill.mode=ct", f"ct.target={target}",
              "ct.stage_steps=2", f"steps={CELL_STEPS}", f"checkpoint.every={CELL_RESUME_AT}", "checkpoint.keep=5", "logging.every=1",
              "sampling.steps=2", "sampling.guidance=1.5"]
    return [job(name, "distill", [*common, f"run={name}"]),
            job(f"{name}-resumed", "distill", [*common, f"run={name}-resumed"], resume_from={"run": str(out / name), "step": CELL_RESUME_AT})]


def launch(specs: list[dict], out: Path, timeout: int = 720) -> None:
    """Run ``specs`` in one 2-process gloo launch (``launch/accelerate/cpu2.yaml``); its output in ``out/launch.log``."""
    import subprocess

    from tests.helpers import ROOT, free_port

    (out / "jobs.json").write_text(json.dumps(specs, default=str))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/accelerate/cpu2.yaml"),
           "--main_process_port", str(free_port()), "-m", "tests.jobs", str(out / "jobs.json"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        log = f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    except subprocess.TimeoutExpired as err:
        log = f"timed out after {err.timeout} s\n{err.stdout}\n{err.stderr}"
    (out / "launch.log").write_text(log)


def results(out: Path, name: str, world: int = 2) -> list[dict]:
    """Every rank's record of job ``name``; a missing one fails with the launch's log."""
    found = []
    for rank in range(world):
        path = out / f"{name}.rank{rank}.json"
        if not path.exists():
            log = (out / "launch.log").read_text() if (out / "launch.log").exists() else "(no launch log)"
            raise AssertionError(f"{name}: rank {rank} left no result; the launch said:\n{log[-6000:]}")
        found.append(json.loads(path.read_text()))
    return found


def autoencoder_jobs(images: Path, out: Path, mode: str = "ddp", precision: str = "bf16", accum: int = 2) -> list[dict]:
    """The VAE + patch-GAN stage (both updates from step 1): a 4-step run and its resumed copy,
    validating on the held-out images at steps 2 and 4 (``eval_every``)."""
    name = f"autoencoder-{mode}-{precision}-accum{accum}"
    common = [f"data.shards={images}", f"output_dir={out}", "model.block_out_channels=[32, 32]", "data.held_out=8",
              "factor_samples=16", "data.loader.batch_size=4", f"optim.grad_accum={accum}", f"mixed_precision={precision}",
              *CELL_LR, "loss.disc_start=1", "eval_every=2", f"steps={CELL_STEPS}", f"checkpoint.every={CELL_RESUME_AT}",
              "checkpoint.keep=5", "logging.every=1"]
    ddp = mode == "ddp"
    return [job(name, "autoencoder", [*common, f"run={name}"], count_allreduce=ddp),
            job(f"{name}-resumed", "autoencoder", [*common, f"run={name}-resumed"],
                resume_from={"run": str(out / name), "step": CELL_RESUME_AT}, count_allreduce=ddp)]


OVERFLOW_AT, OVERFLOW_STEPS = 2, 3
def http_sizes_job(url: str, text: dict, vae: Path, out: Path) -> dict:
    """One DDP step on latents served over loopback HTTP with no size anywhere (no stats files, no
    shard_samples) and their encoders elsewhere (``encoders.*``): the main rank alone counts the
    shards (``pipeline.data.sizes.sizes_once``); the server's log shows how often each was read (one
    plain GET per shard read: ``http_connections=1``, no read-ahead of the schedule's next shard)."""
    encoders = [f"encoders.vae={vae}", f"encoders.t5={text['t5']['path']}", f"encoders.clip={text['clip']['path']}"]
    return job("http-sizes", "train", [f"data.latents={url}", f"output_dir={out}", "run=http-sizes", *MODES["ddp"], *encoders,
                                       "model.overrides={depth: 1}", "data.loader.batch_size=4", "data.loader.http_connections=1", "steps=1", "checkpoint.every=1",
                                       "sampling.steps=1"])


OVERFLOW_CELLS = (("ddp", "fp16"), ("zero2", "bf16"))  # in the 2-process launch; the one-process cell runs in pytest
OVERFLOW_EMA = {"decay": 0.9, "warmup_power": 0.75}  # the decay ramps with the step


def overflow_job(mode: str, precision: str, latents: Path, out: Path, accum: int = 2) -> dict:
    """A 3-step DiT run whose optimizer step that would be step 2 overflows (inf gradients from rank
    0): under fp16 through the loss scaler (:func:`loss_scaler`, on the CPU too), under DeepSpeed
    bf16 through its own overflow check."""
    name = f"overflow-{cell_name(mode, precision, accum)}"
    overrides = [f"data.latents={latents}", f"output_dir={out}", f"run={name}", "model.overrides={depth: 2}", "data.loader.batch_size=4",
                 f"optim.grad_accum={accum}", f"mixed_precision={precision}", *CELL_LR, *MODES[mode], f"steps={OVERFLOW_STEPS}",
                 f"checkpoint.every={OVERFLOW_STEPS}", "logging.every=1", "sampling.steps=2", *(f"ema.{k}={v}" for k, v in OVERFLOW_EMA.items())]
    return job(name, "train", overrides, loss_scaler=precision == "fp16", overflow_at=OVERFLOW_AT)


# ---------------------------------------------------------------------------- PixArt-Σ (pipeline.models.pixart)

PIXART = ("model.architecture=pixart", "model.name=PixArt-tiny")  # diffusers' PixArtTransformer2DModel through our trainer
PIXART_CELL = ("zero3", "bf16", 2)


def pixart_jobs(latents: Path, out: Path) -> list[dict]:
    """A cell of the PixArt-Σ profile (``pixart-zero3-bf16-accum2``): the diffusers transformer
    partitioned by ZeRO-3 in bf16 with accumulation, its null text (the T5 encoding of "") encoded
    by rank 0 and broadcast, gradient checkpointing on; run and resumed."""
    return cell_jobs(*PIXART_CELL, latents, out, prefix="pixart-", extra=(*PIXART, "model.gradient_checkpointing=true"))
