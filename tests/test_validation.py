"""The validation loss during training (``pipeline.training.validation``): held-out latents at fixed
times with fixed noise, logged every N steps, computed once over all ranks.

Pinned here: the config's one-line errors; the units' fixed order and their share per rank (each
batch counted once, ZeRO-3's spare forwards not counted); the held-out samples never reach the
training stream, on any rank, and a resumed stream stays exact; a run that validates trains
exactly as one that does not (training's RNG streams untouched); the value logged by 2 processes
under DDP, ZeRO-2 and ZeRO-3 (ZeRO-3: every rank runs as many forwards) equals the one-process value
for the same weights, and a resumed run logs the same values; the student (ZeRO-3, bf16) and the
autoencoder (DDP) validate under 2 processes too. The 2-process runs are cells of the one shared
launch (``launched_jobs``, ``tests.jobs.VALIDATION``).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.config import ConfigError, load_config
from pipeline.training.dit_config import TrainConfig
from pipeline.training.validation import ValidationConfig, rank_share, unit_batches
from tests import jobs


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def validated(run: Path) -> dict[int, dict]:
    """The validation values a run logged, by step."""
    return {m["step"]: {k: v for k, v in m.items() if k.startswith(("val_", "psnr_"))} for m in metrics(run) if "val_loss" in m}


@pytest.mark.parametrize("override, words", [
    ("validation.bins=[0.5, 1.5]", "'validation': bins must be distinct times in [0, 1]"),
    ("validation.bins=0", "'validation': bins must be >= 1"),
    ("validation.every=1.5", "'validation.every' expects int"),
    ("validation.weights=last", "'validation.weights' expects one of 'model', 'ema'"),
    ("validation.count=0", "count and batch_size must be >= 1"),
])
def test_a_wrong_validation_key_is_one_line(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_units_come_in_one_order_and_each_is_counted_on_one_rank():
    assert ValidationConfig(bins=5).times == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert ValidationConfig(bins=[0.25, 0.75]).times == [0.25, 0.75]
    shapes = [(4, 8, 8)] * 3 + [(4, 6, 12)] * 2  # two buckets: a batch holds one
    batches = unit_batches(shapes, bins=2, batch_size=4)
    assert batches == [[(0, 0), (1, 0), (2, 0), (0, 1)], [(1, 1), (2, 1)], [(3, 0), (4, 0), (3, 1), (4, 1)]]
    for world, even in itertools.product((1, 2, 4), (False, True)):
        shares = [rank_share(batches, rank, world, even) for rank in range(world)]
        counted = sorted(unit for share in shares for units, c in share if c for unit in units)
        assert counted == sorted(unit for batch in batches for unit in batch), (world, even)
        if even:  # ZeRO-3: as many forwards on every rank, the spare ones uncounted
            assert len({len(share) for share in shares}) == 1
    assert rank_share(batches, 3, 4, even=True) == [(batches[0], False)]


def test_held_out_latents_never_reach_the_training_stream(latent_shards):
    from pipeline.data.latents import decode_latent_sample, latent_loader, shard_list
    from pipeline.data.sizes import shard_sizes
    from pipeline.data.stream import LoaderConfig, held_out_split, read_held_out

    shards = shard_list(latent_shards)
    sizes = shard_sizes(shards)
    split = held_out_split(sizes, 16)
    assert split == [0, 0, 4, 12]  # the last shard's samples, then the first of the one before it
    held = {s["key"] for s in read_held_out(shards, split, decode_latent_sample)}
    everything = {s["key"] for s in read_held_out(shards, sizes, decode_latent_sample)}
    assert len(held) == 16 and len(everything) == 48
    cfg = LoaderConfig(batch_size=4, seed=3)
    seen = {key for rank in range(2) for batch in itertools.islice(latent_loader(shards, cfg, rank, 2, sizes, split), 12)
            for key in batch["key"]}  # more than an epoch on each rank
    assert seen == everything - held
    loader = latent_loader(shards, cfg, 0, 2, sizes, split)
    stream = iter(loader)
    [next(stream) for _ in range(3)]
    state, after = loader.state_dict(), [next(stream)["key"] for _ in range(3)]
    assert state["held_out"] == 16
    resumed = latent_loader(shards, cfg, 0, 2, sizes, split)
    resumed.load_state_dict(state)
    assert [b["key"] for b in itertools.islice(resumed, 3)] == after
    with pytest.raises(ValueError, match="held_out=0, this run has 16"):  # a position saved without validation
        resumed.load_state_dict({k: v for k, v in state.items() if k != "held_out"})


def test_validating_leaves_training_exactly_as_it_was(latent_shards, tmp_path, capsys):
    """The same run with validation at every step (on a separate set: the training stream is the
    same) logs the same losses and ends with the same weights and EMA, bit for bit. Resuming with
    samples newly held out of the training stream is refused, in one line."""
    from pipeline import train

    common = [f"data.latents={latent_shards}", f"output_dir={tmp_path}", "deepspeed.enabled=false", "model.overrides={depth: 2}",
              "data.loader.batch_size=8", "optim.lr=2e-3", "steps=4", "checkpoint.every=4", "logging.every=1", "sampling.prompts=[]",
              "ema.decay=0.9"]
    on = ["validation.every=1", f"validation.latents={latent_shards}", "validation.count=8", "validation.bins=[0.2, 0.9]",
          "validation.batch_size=8", "validation.weights=ema"]
    assert train.main([*common, "run=off"]) == 0
    assert train.main([*common, "run=on", *on]) == 0
    off_lines, on_lines = metrics(tmp_path / "off"), metrics(tmp_path / "on")
    assert [m["loss"] for m in on_lines] == [m["loss"] for m in off_lines]
    for state in ("accelerate/model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / run / "checkpoints/step-000004" / state)) for run in ("off", "on"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), state
    values = validated(tmp_path / "on")
    assert list(values) == [1, 2, 3, 4] and not validated(tmp_path / "off")
    for line in values.values():
        assert set(line) == {"val_loss", "val_loss/t=0.2", "val_loss/t=0.9"} and all(math.isfinite(v) for v in line.values())
        assert line["val_loss"] == pytest.approx((line["val_loss/t=0.2"] + line["val_loss/t=0.9"]) / 2, rel=1e-12)
    assert values[4]["val_loss"] < values[1]["val_loss"]  # the EMA learns
    assert (tmp_path / "on/val_loss.png").is_file() and not (tmp_path / "off/val_loss.png").exists()
    capsys.readouterr()
    assert train.main([*common, "run=off", "steps=6", "validation.every=2", "validation.count=8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holding out 0 sample(s)" in err and "holds out 8" in err and "validation.latents" in err and "\n" not in err


def one_process_validation(mode: str, latents: Path, out: Path, weights: dict[str, np.ndarray]) -> dict:
    """The validation line a one-process trainer with the cell's settings computes on ``weights``."""
    from pipeline.training.dit import Trainer

    overrides = jobs.cell_jobs(mode, "no", 1, latents, out)[0]["overrides"]
    overrides = [o for o in overrides if not o.startswith(("deepspeed.", "output_dir="))]
    jobs._reset_accelerate()
    try:
        trainer = Trainer(load_config(TrainConfig, None, [*overrides, "deepspeed.enabled=false", f"output_dir={out}"]))
        trainer.accelerator.unwrap_model(trainer.model).load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
        return trainer.validate()
    finally:
        jobs._reset_accelerate()


def step_weights(run: Path, mode: str, step: int) -> dict[str, np.ndarray]:
    """The trained network's fp32 weights at a checkpoint (ZeRO: consolidated from the partitions)."""
    ckpt = run / f"checkpoints/step-{step:06d}/accelerate"
    if mode == "ddp":
        return load_file(str(ckpt / "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.detach().numpy() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model").items()}


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_two_processes_log_the_one_process_value(mode, launched_jobs, latent_shards, tmp_path):
    name = jobs.cell_name(mode, "no", 1)
    for result in [*jobs.results(launched_jobs, name), *jobs.results(launched_jobs, f"{name}-resumed")]:
        assert result["ok"], result["error"]
    full, resumed = validated(launched_jobs / name), validated(launched_jobs / f"{name}-resumed")
    assert list(full) == list(resumed) == [2, 4] and resumed[4] == full[4], "the resumed run validated otherwise"
    assert set(full[4]) == {"val_loss", "val_loss/t=0.1667", "val_loss/t=0.5", "val_loss/t=0.8333"}
    assert full[4]["val_loss"] < full[2]["val_loss"]  # trained weights: a value that depends on them
    alone = one_process_validation(mode, latent_shards, tmp_path, step_weights(launched_jobs / name, mode, 4))
    assert alone == pytest.approx(full[4], rel=2e-6, abs=0)
    assert (launched_jobs / name / "val_loss.png").is_file()


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_the_student_and_the_autoencoder_validate_under_two_processes(launched_jobs):
    """Distillation under ZeRO-3 in bf16 (the student partitioned: a spare forward on rank 1) and
    the autoencoder under DDP: the held-out values at steps 2 and 4, the same after a resume; the
    autoencoder's PSNR at the last step is the one the main process alone measures at the export
    (all 8 held-out images, the same weights)."""
    for name in ("distill-zero3-bf16-accum2", "autoencoder-ddp-bf16-accum2"):
        full, resumed = validated(launched_jobs / name), validated(launched_jobs / f"{name}-resumed")
        assert list(full) == list(resumed) == [2, 4] and resumed[4] == full[4], name
        assert all(math.isfinite(v) for v in full[4].values()) and (launched_jobs / name / "val_loss.png").is_file()
    assert len(full[4]) == 2  # the autoencoder: val_loss and psnr_held_out_64, no bins
    report = json.loads((launched_jobs / "autoencoder-ddp-bf16-accum2/eval.json").read_text())
    assert full[4]["psnr_held_out_64"] == pytest.approx(report["psnr_held_out"], abs=1e-4)


def test_the_plot_takes_each_step_once(tmp_path):
    from pipeline.figures.plots import plot_validation_loss

    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "val_loss": 2.0, "val_loss/t=0.1": 1.0, "val_loss/t=0.9": 3.0},
             {"step": 2, "val_loss": 2.5, "val_loss/t=0.1": 1.5, "val_loss/t=0.9": 3.5}]  # a resumed run logs step 2 again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert plot_validation_loss(tmp_path / "metrics.jsonl", tmp_path / "val.png") == tmp_path / "val.png"
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert plot_validation_loss(tmp_path / "metrics.jsonl", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
