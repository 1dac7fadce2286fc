"""``python -m benchmarks.gpu --cpu``: the GPU check's code at toy sizes on the CPU (what runs on a
GPU is the same code with other sizes, compile and fp16 added)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_safe_parts(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(s["model"], s["checkpointing"], s["compile"]) for s in report["steps"]}
    assert rows == {("ours", False, False), ("ours", True, False), ("ours_single", False, False), ("pixart", False, False), ("dit", False, False)}
    assert all(s["images_per_s"] > 0 and s["batch"] == 4 for s in report["steps"])
    ours = [s for s in report["steps"] if s["model"].startswith("ours")]
    assert all(s["tflops"] > 0 for s in ours)  # FLOPs are counted for our model
    params = {s["model"]: s["params"] for s in report["steps"] if not s["checkpointing"]}
    assert params["ours_single"] < params["ours"]  # adaLN-single: one shared modulation MLP
    train = report["train"]["bf16"]
    assert train["ok"] and train["steps"] == 3 and train["errors"] == []  # trained 2, resumed to 3, exported
    sampling = report["sampling"]
    assert sampling["student_4_seconds_per_image"] < sampling["teacher_50_seconds_per_image"]
    frozen = sampling["text_seconds_per_image"] + sampling["decode_seconds_per_image"]  # text encoders + VAE decode, measured
    assert sampling["end_to_end_speedup"] == pytest.approx((sampling["teacher_50_seconds_per_image"] + frozen)
                                                           / (sampling["student_4_seconds_per_image"] + frozen))
    assert 1 < sampling["end_to_end_speedup"] < sampling["speedup"]  # the frozen parts cost both sides the same
    loader = report["loader"]
    assert set(loader["supply"]) == {"1"} and loader["supply"]["1"]["samples_per_s"] > 0
    need = loader["need"]["DiT-B/2"]  # the best of our measured B/2 variants
    assert need["from"] == "measured" and need["images_per_s"] == max(s["images_per_s"] for s in ours)
    assert loader["ratios"]["DiT-B/2"]["1"] == pytest.approx(loader["supply"]["1"]["samples_per_s"] / need["images_per_s"])
    table = out.with_suffix(".md").read_text()
    assert "| DiT-B/2 ours_single ≥ 1.15× PixArt (eager) |" in table and "pipeline.train, DeepSpeed ZeRO-2" in table
    assert "| loader supply vs need |" in table


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from benchmarks.gpu.__main__ import main

    assert main([]) == 2
