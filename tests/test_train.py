"""pipeline.train end to end on tiny latents: the loss falls, kill -9 + rerun is exact, non-finite
losses are skipped and counted, and the export samples. (The 2-process DeepSpeed ZeRO-2 job that
trains, saves and resumes is in tests/test_launch.py, launched through the SLURM script.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline import train
from pipeline.data.shards import iter_samples, write_tar_atomic
from tests.helpers import ROOT

TINY = [
    "deepspeed.enabled=false",
    "model.overrides={depth: 2}",
    "data.loader.batch_size=8",
    "optim.lr=2e-3",
    "optim.warmup_steps=2",
    "logging.every=1",
    "sampling.steps=2",
    "ema.decay=0.9",
]


def args(latents: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.latents={latents}", f"output_dir={out}", "run=t", *TINY, *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder))


def test_training_lowers_the_loss_and_exports_a_sampler(latent_shards, tmp_path):
    assert train.main(args(latent_shards, tmp_path, "steps=20", "checkpoint.every=10")) == 0
    run = tmp_path / "t"
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 20 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000010", "step-000020"]
    assert (run / "loss_by_t.png").exists() and (run / "samples/final.png").exists()
    grid = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "pipeline.sample", "--model", str(run / "model"), "--prompt", "a red circle", "--prompt", "a blue square"]
    result = subprocess.run([*cmd, "--steps", "3", "--output", str(grid)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert grid.exists() and "2 images" in result.stdout


def test_adaln_single_trains_and_its_export_loads_as_adaln_single(latent_shards, tmp_path, capsys):
    """``model.adaln=single`` (PixArt-α's shared modulation) reaches the model, trains, and the
    exported folder rebuilds it; a PixArt run refuses the DiT-only key in one line."""
    from pipeline.models.dit import DiT

    assert train.main(args(latent_shards, tmp_path, "steps=4", "checkpoint.every=4", "model.adaln=single", "sampling.every=0")) == 0
    model = DiT.from_pretrained(tmp_path / "t/model/transformer")
    assert model.config.adaln == "single" and model.adaln_single is not None
    assert all(not hasattr(block, "adaLN_modulation") for block in model.blocks)
    with pytest.raises(SystemExit) as stop:
        train.main(args(latent_shards, tmp_path / "p", "model.architecture=pixart", "model.name=PixArt-tiny", "model.adaln=single"))
    assert stop.value.code == 2 and "adaln is a DiT option" in capsys.readouterr().err


def run_cli(cli_args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *cli_args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(latent_shards, tmp_path):
    """Validating too (8 latents held out of 2 data workers' streams): the rerun logs the same values."""
    validation = ["validation.every=4", "validation.count=8", "validation.batch_size=8"]
    same = ["steps=16", "checkpoint.every=4", "checkpoint.keep=2", "data.loader.num_workers=2", *validation]
    killed, clean = args(latent_shards, tmp_path / "killed", *same), args(latent_shards, tmp_path / "clean", *same)
    proc = run_cli(killed)
    deadline = time.time() + 300
    while not (tmp_path / "killed/t/checkpoints/step-000008").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/t/model").exists(), "the run finished before it could be killed"
    assert train.main(killed) == 0
    assert train.main(clean) == 0
    for name in ("accelerate/model.safetensors", "ema.safetensors"):
        a, b = (weights(tmp_path / d / "t/checkpoints/step-000016" / name) for d in ("killed", "clean"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    killed_line, clean_line = metrics(tmp_path / "killed/t")[-1], metrics(tmp_path / "clean/t")[-1]
    assert killed_line["loss"] == clean_line["loss"]
    assert {k: v for k, v in killed_line.items() if k.startswith("val_")} == {k: v for k, v in clean_line.items() if k.startswith("val_")}
    assert len([k for k in clean_line if k.startswith("val_loss")]) == 6  # the mean and 5 bins


def poisoned(latents: Path, out: Path, shards: int) -> Path:
    """A copy of ``latents`` whose first ``shards`` shards hold NaN latents."""
    shutil.copytree(latents, out)
    for tar in sorted(out.glob("*.tar"))[:shards]:
        samples = []
        for s in iter_samples([tar]):
            members = {k: v for k, v in s.items() if not k.startswith("__")}
            members["latent.npy"] = nan_like(members["latent.npy"])
            samples.append((s["__key__"], members))
        write_tar_atomic(tar, samples)
    return out


def nan_like(npy: bytes) -> bytes:
    import io

    array = np.load(io.BytesIO(npy))
    buffer = io.BytesIO()
    np.save(buffer, np.full_like(array, np.nan))
    return buffer.getvalue()


def test_non_finite_losses_are_skipped_and_counted(latent_shards, tmp_path):
    bad = poisoned(latent_shards, tmp_path / "bad", shards=1)
    assert train.main(args(bad, tmp_path, "steps=8", "max_bad_steps=100")) == 0
    assert metrics(tmp_path / "t")[-1]["skipped_steps"] > 0


def test_too_many_non_finite_losses_stop_with_a_clear_message(latent_shards, tmp_path):
    bad = poisoned(latent_shards, tmp_path / "bad", shards=4)
    proc = run_cli(args(bad, tmp_path, "steps=8", "max_bad_steps=3"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    last = err.decode().strip().splitlines()[-1]
    assert "3 non-finite losses in a row at step 0" in last and "Traceback" not in err.decode()


def test_config_error_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.train", "optim.lrr=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown key 'optim.lrr'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_exported_model_moves_with_its_run_folder(teacher_dir, tmp_path, monkeypatch):
    """A model folder exported with ``encoders="reference"`` stores the encoders' local paths
    relative to itself: a run folder copied elsewhere samples with its own VAE and encoders,
    whatever the working directory."""
    from pipeline.data.model_folder import export_model
    from pipeline.inference.pipeline import load_pipeline
    from pipeline.data.paths import map_paths, resolved_from
    from pipeline.models.dit import DiT

    info = map_paths(json.loads((teacher_dir / "model_index.json").read_text())["info"], resolved_from(teacher_dir))
    run = tmp_path / "run"
    sources = {"vae": teacher_dir / "vae", "t5": teacher_dir / "text_encoder", "tokenizer": teacher_dir / "tokenizer",
               "clip": teacher_dir / "text_encoder_2"}
    for name, source in sources.items():
        shutil.copytree(source, run / name)
    t5 = {**info["text"]["t5"], "path": str(run / "t5"), "tokenizer": str(run / "tokenizer")}
    config = {"vae": {**info["vae"], "path": str(run / "vae"), "subfolder": None},
              "text": {"t5": t5, "clip": {**info["text"]["clip"], "path": str(run / "clip")}}}
    meta = {"config": config, "latent_shape": info["latent_shape"], "resolution": info["resolution"]}
    export_model(run / "model", DiT.from_pretrained(teacher_dir / "transformer"), meta, encoders="reference")
    stored = json.loads((run / "model/model_index.json").read_text())["info"]
    assert (stored["vae"]["path"], stored["text"]["clip"]["path"]) == (os.path.join("..", "vae"), os.path.join("..", "clip"))

    moved = tmp_path / "moved"
    shutil.move(run, moved)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_pipeline(Path("../moved/model"))
    assert Path(loaded.vae.cfg.path).resolve() == (moved / "vae").resolve()
    assert Path(loaded.text.cfg.t5.path).resolve() == (moved / "t5").resolve()
