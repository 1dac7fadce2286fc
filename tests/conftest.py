"""Shared pytest fixtures: tiny frozen encoders saved in their native formats.

Nothing can be downloaded here (DESIGN.md §7), so these fixtures build small models from
configs with a fixed seed, save them the way real checkpoints are saved, and hand out the
folder; tests load them back through ``pipeline.encoders`` only. Session-scoped: built once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.shard_server import serving

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),  # downsampling factor 2 ** (3 - 1) = 4
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.5,
    shift_factor=0.1,
)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """After each test, forget the accelerate state a run in this process left (its precision, its
    DeepSpeed plugin): the next test's ``Accelerator`` takes its own settings, whichever test ran
    before it on this worker (the process group stays, as ``tests.jobs`` does between jobs)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state()
        GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers ``AutoencoderKL`` folder (4 latent channels, /4, scale 0.5, shift 0.1)."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny_vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_text_encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data_tools.make_encoders`` output: ``t5/``, ``clip/`` and ``encoders.yaml`` (seed 0)."""
    from data_tools import make_encoders

    folder = tmp_path_factory.mktemp("tiny_text_encoders")
    assert make_encoders.main(["--output", str(folder), "--seed", "0"]) == 0
    return folder


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 synthetic 32 px images (``data_tools.synth``) in 4 PNG image shards."""
    from data_tools import shard, synth

    root = tmp_path_factory.mktemp("images")
    synth.generate(root / "synth", count=48, resolution=32, seed=0)
    args = ["--input", str(root / "synth"), "--output", str(root / "shards"), "--resolution", "32"]
    assert shard.main([*args, "--format", "png", "--samples-per-shard", "12"]) == 0
    return root / "shards"


@pytest.fixture(scope="session")
def latent_shards(tmp_path_factory, image_shards: Path, tiny_vae_dir: Path, tiny_text_encoders_dir: Path) -> Path:
    """``image_shards`` encoded by ``data_tools.encode`` with the tiny VAE, T5 and CLIP."""
    return encoded(image_shards, tmp_path_factory.mktemp("latents"), tiny_vae_dir, tiny_text_encoders_dir)


def encoded(shards: Path, root: Path, vae: Path, text_encoders: Path) -> Path:
    """``root/latents``: ``shards`` through ``data_tools.encode`` with the tiny VAE, T5 and CLIP."""
    import yaml

    from data_tools import encode

    text = yaml.safe_load((text_encoders / "encoders.yaml").read_text())
    (root / "encode.yaml").write_text(yaml.safe_dump({"vae": {"path": str(vae)}, "text": text, "batch_size": 12}))
    args = ["--input", str(shards), "--output", str(root / "latents"), "--config", str(root / "encode.yaml")]
    assert encode.main(args) == 0
    return root / "latents"


@pytest.fixture(scope="session")
def paired_image_shards(tmp_path_factory, image_shards: Path) -> Path:
    """``image_shards`` made into paired shards (``data_tools.pairs``): each of the 48 samples a
    grayscale or a ×4-downsampled source (drawn from its key), 12 per shard, PNG."""
    from data_tools import pairs

    root = tmp_path_factory.mktemp("paired")
    args = ["--input", str(image_shards), "--output", str(root / "pairs"), "--degradation", "grayscale,down4"]
    assert pairs.main([*args, "--samples-per-shard", "12"]) == 0
    return root / "pairs"


@pytest.fixture(scope="session")
def paired_latents(tmp_path_factory, paired_image_shards: Path, tiny_vae_dir: Path, tiny_text_encoders_dir: Path) -> Path:
    """``paired_image_shards`` encoded by ``data_tools.encode`` (tiny VAE, T5, CLIP): each sample
    also holds ``KEY.src_latent.npy``; dataset.json names the degradations under ``image_condition``."""
    return encoded(paired_image_shards, tmp_path_factory.mktemp("paired_latents"), tiny_vae_dir, tiny_text_encoders_dir)


@pytest.fixture(scope="session")
def bucketed_latents(tmp_path_factory, tiny_vae_dir, tiny_text_encoders_dir) -> Path:
    """36 non-square synthetic scenes (aspects 0.5, 1, 2) -> image shards kept at their size ->
    latents in buckets of about 32² px (``data_tools.encode buckets=32``)."""
    import yaml

    from data_tools import encode, shard, synth

    root = tmp_path_factory.mktemp("bucketed")
    synth.generate(root / "synth", count=36, resolution=32, seed=0, aspects=(0.5, 1.0, 2.0))
    assert shard.main(["--input", str(root / "synth"), "--output", str(root / "shards"), "--resize", "none",
                       "--format", "png", "--samples-per-shard", "9"]) == 0
    text = yaml.safe_load((tiny_text_encoders_dir / "encoders.yaml").read_text())
    (root / "encode.yaml").write_text(yaml.safe_dump({"vae": {"path": str(tiny_vae_dir)}, "text": text, "batch_size": 4}))
    args = ["--input", str(root / "shards"), "--output", str(root / "latents"), "--config", str(root / "encode.yaml"), "--buckets", "32"]
    assert encode.main(args) == 0
    return root / "latents"


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, latent_shards: Path) -> Path:
    """A tiny DiT teacher trained for a few steps on ``latent_shards`` and exported."""
    from pipeline import train

    root = tmp_path_factory.mktemp("teacher")
    args = [f"data.latents={latent_shards}", f"output_dir={root}", "run=teacher", "steps=6", "deepspeed.enabled=false"]
    args += ["model.overrides={depth: 2}", "data.loader.batch_size=8", "optim.lr=2e-3", "sampling.steps=2", "checkpoint.every=6"]
    assert train.main(args) == 0
    return root / "teacher/model"


@pytest.fixture(scope="session")
def launched_jobs(tmp_path_factory, latent_shards, image_shards, tiny_vae_dir, tiny_text_encoders_dir, teacher_dir,
                  bucketed_latents, paired_latents, paired_image_shards) -> Path:
    """Every multi-process training job of the suite in one 2-process gloo launch (``tests.jobs``):
    the DDP / ZeRO-2 / ZeRO-3 × fp32 / bf16 × accumulation 1 / 2 cells (each run and resumed),
    distillation under ZeRO-3 in bf16, the autoencoder under DDP in bf16 with accumulation, an
    overflowing optimizer step under DDP fp16 (``jobs.loss_scaler``) and ZeRO-2 bf16, the image-conditioned
    DDP / ZeRO-2 cells on ``paired_latents``, adversarial distillation (LADD) under DDP / ZeRO-2 / ZeRO-3,
    teacher-free consistency training under DDP and ZeRO-3, and every config in ``configs/``, shrunk. Returns the
    folder of their runs and ``NAME.rank{r}.json`` results; ``launch.log`` holds the output."""
    import json

    import yaml

    from tests import jobs

    out = tmp_path_factory.mktemp("jobs")
    specs = [spec for mode in ("ddp", "zero2", "zero3") for precision in ("no", "bf16") for accum in jobs.ACCUMULATION
             for spec in jobs.cell_jobs(mode, precision, accum, latent_shards, out)]
    specs += jobs.distill_jobs(teacher_dir, latent_shards, out) + jobs.autoencoder_jobs(image_shards, out)
    specs.append(jobs.ema_copy_job(latent_shards, out))
    specs += [jobs.overflow_job(mode, precision, latent_shards, out) for mode, precision in jobs.OVERFLOW_CELLS]
    specs += jobs.bucket_jobs(bucketed_latents, out) + jobs.text_jobs(latent_shards, out)
    specs += jobs.pixart_jobs(latent_shards, out)
    specs += [spec for cell in jobs.LORA_CELLS for spec in jobs.lora_jobs(*cell, latent_shards, teacher_dir, out)]
    specs += [spec for cell in jobs.COND_CELLS if cell[0] != "one" for spec in jobs.cond_jobs(*cell, paired_latents, teacher_dir, out)]
    specs += [spec for cell in jobs.LADD_CELLS if cell[0] != "one" for spec in jobs.ladd_jobs(*cell, teacher_dir, latent_shards, out)]
    specs += [spec for cell in jobs.CT_CELLS for spec in jobs.ct_jobs(*cell, teacher_dir, latent_shards, out)]
    inputs = {"latents": latent_shards, "paired_latents": paired_latents, "paired_images": paired_image_shards, "images": image_shards,
              "teacher": teacher_dir, "vae": tiny_vae_dir,
              "text": yaml.safe_load((tiny_text_encoders_dir / "encoders.yaml").read_text())}
    specs += [jobs.shipped_config_job(path, inputs, out / "configs") for path in jobs.SHIPPED_CONFIGS]
    with serving(unsized_copy(latent_shards, out / "served")) as server:  # for the http-sizes job
        specs.append(jobs.http_sizes_job(server.url + "latents/", inputs["text"], tiny_vae_dir, out))
        jobs.launch(specs, out, timeout=900)
    (out / "http_requests.json").write_text(json.dumps(server.requests))
    return out


def unsized_copy(latents: Path, root: Path) -> Path:
    """``root/latents``: a copy of a latent folder with no recorded size (no stats files, no
    ``shard_samples``), as img2dataset-style or hand-made folders come."""
    import json
    import shutil

    shutil.copytree(latents, root / "latents", ignore=shutil.ignore_patterns("*_stats.json"))
    meta = json.loads((root / "latents/dataset.json").read_text())
    meta.pop("shard_samples")
    (root / "latents/dataset.json").write_text(json.dumps(meta))
    return root


_BACKGROUND: list = []  # setups started at collection, waited for at the end of the session


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` that works under pytest 9 (``tests/xdist_groups.py``)."""
    if config.getvalue("dist") == "loadgroup":
        from tests.xdist_groups import GroupScheduling

        return GroupScheduling(config, log)
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """After collection: (1) freeze what the test modules imported (torch, transformers, DeepSpeed…)
    out of the garbage collector's full collections, which otherwise rescan those millions of
    objects every time (~0.3 s each); (2) when img2dataset's tests are selected, start installing
    its venv in the background (mostly download and unpacking: it overlaps the CPU-bound tests; the
    fixture then finds it ready, or waits on the script's lock)."""
    import gc
    import os
    import subprocess

    from tests.helpers import ROOT

    gc.freeze()
    wanted = any(item.path.name == "test_img2dataset.py" for item in session.items)
    if wanted and os.environ.get("LDP_SKIP_IMG2DATASET") != "1":
        _BACKGROUND.append(subprocess.Popen(["bash", str(ROOT / "launch/setup_img2dataset.sh")], cwd=ROOT,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for process in _BACKGROUND:
        process.wait()
