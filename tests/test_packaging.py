"""A non-editable install (``pip install .``) is complete: it trains with DeepSpeed from any
working directory, its DeepSpeed templates read from inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

RUN = "import sys, pipeline; print('pipeline from', pipeline.__file__); from pipeline.train import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_a_non_editable_install_trains_with_deepspeed(latent_shards, tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"  # a copy: setuptools builds in the source folder
    for folder in ("pipeline", "data_tools", "benchmarks"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(source)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (site / "pipeline/training/ds_templates").glob("*.json")) == ["zero2.json", "zero3.json"]
    info = next(site.glob("latent_diffusion_pipeline-*.dist-info"))  # an SPDX license, not the deprecated TOML table
    assert "License-Expression: Apache-2.0" in (info / "METADATA").read_text() and (info / "licenses/LICENSE").is_file()
    assert "deprecated" not in done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = [f"data.latents={latent_shards}", f"output_dir={elsewhere}", "run=t", "deepspeed.enabled=true", "mixed_precision=bf16", "steps=2",
            "model.overrides={depth: 2}", "data.loader.batch_size=4", "checkpoint.every=2", "sampling.steps=2"]
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", RUN, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pipeline from {site}" in done.stdout  # the installed copy, not the checkout
    assert (elsewhere / "t/checkpoints/step-000002/accelerate/pytorch_model").is_dir()  # a DeepSpeed checkpoint
    assert (elsewhere / "t/model/transformer/config.json").exists()
