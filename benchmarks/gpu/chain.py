"""The real stages on this device: ``pipeline.train`` under DeepSpeed ZeRO-2 in bf16 (and fp16 on a
GPU) that checkpoints, resumes and exports; then teacher against student sampling time.

- Training: the synthetic set through the real chain (``data_tools.synth`` → ``shard`` →
  ``encode`` with a demo-sized VAE and the tiny text encoders, 32 px → 8×8×4 latents), then
  ``python -m pipeline.train`` as a user runs it (one process, DeepSpeed ZeRO-2): N steps with a
  checkpoint, a second command that resumes to 1.5 N, and the exported model loaded back.
- Sampling: DiT-XL/2 at 32×32×4 latents with T5-XXL-shaped text (random weights: speed does not
  depend on them), 50 Euler steps with classifier-free guidance (two evaluations per step, one
  batch) against the distillation student (``pipeline.models.student.student_from``) in 4 consistency
  steps, sampler only, bf16 autocast; seconds per image after a device synchronisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.timing import clock

ROOT = Path(__file__).resolve().parents[2]


def train_run(folder: Path, cpu: bool) -> dict:
    """Train, resume, export with DeepSpeed ZeRO-2 (bf16; also fp16 on a GPU)."""
    from benchmarks.latent_cache import build

    _, latents, _ = build(folder / "data", 128 if cpu else 1024)
    steps = 2 if cpu else 40
    out = {}
    for precision in ("bf16",) if cpu else ("bf16", "fp16"):
        run = folder / f"run-{precision}"
        model = ["model.name=DiT-tiny", "model.overrides={depth: 2}"] if cpu else ["model.name=DiT-B/2"]
        args = [f"data.latents={latents}", f"output_dir={run}", "run=t", "deepspeed.enabled=true", "deepspeed.zero_stage=2",
                f"mixed_precision={precision}", *model, "data.loader.batch_size=16", f"checkpoint.every={steps}",
                "logging.every=1", "sampling.steps=4", "optim.warmup_steps=2"]
        first = _train([*args, f"steps={steps}"])
        second = _train([*args, f"steps={steps + steps // 2}"])
        metrics = [json.loads(line) for line in (run / "t/metrics.jsonl").read_text().splitlines()]
        from pipeline.models.dit import DiT

        exported = DiT.from_pretrained(run / "t/model/transformer")
        out[precision] = {
            "ok": first["ok"] and second["ok"] and "resumed from" in second["stdout"],
            "steps": [m["step"] for m in metrics][-1] if metrics else 0,
            "final_loss": metrics[-1]["loss"] if metrics else None,
            "samples_per_s": metrics[-1].get("samples_per_s") if metrics else None,
            "exported_params": sum(p.numel() for p in exported.parameters()),
            "seconds": first["seconds"] + second["seconds"],
            "errors": [r["stderr"][-2000:] for r in (first, second) if not r["ok"]],
        }
    return out


def _train(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = clock()
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        return {"ok": False, "stdout": str(err.stdout), "stderr": f"timed out after 300 s\n{err.stderr}", "seconds": clock() - start}
    return {"ok": done.returncode == 0, "stdout": done.stdout, "stderr": done.stderr, "seconds": clock() - start}


def sampling(device: str, cpu: bool) -> dict:
    """Teacher (50 Euler steps + CFG) against student (4 consistency steps): sampler seconds per image."""
    from benchmarks.gpu.steps import CPU_SHAPE, GPU_SHAPE, batch_for, ours
    from pipeline.models.student import student_from
    from pipeline.diffusion.samplers import consistency, euler

    shape, name, batch = (CPU_SHAPE, "DiT-B/2", 4) if cpu else (GPU_SHAPE, "DiT-XL/2", 16)
    torch.manual_seed(0)
    teacher = ours(name, shape, depth=2 if cpu else None)
    student = student_from(teacher)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    data = batch_for("ours", batch, shape, device)
    cond = {"t5": data["text"], "t5_mask": data["mask"], "clip": data["clip"]}
    noise = torch.randn(batch, *shape.latent, device=device)
    guidance = torch.full((batch,), 4.0, device=device)
    runs = {"teacher_50": lambda steps=50: euler(teacher, noise, cond, steps, 4.0),
            "student_4": lambda steps=4: consistency(student, noise, {**cond, "guidance": guidance}, steps)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    seconds = {}
    with torch.no_grad(), autocast:
        for key, fn in runs.items():
            fn(2)  # warm-up: the kernels and the allocator, two steps
            start = clock()
            fn()
            seconds[key] = (clock() - start) / batch
    return {"model": name, "batch": batch, **{f"{k}_seconds_per_image": v for k, v in seconds.items()},
            "speedup": seconds["teacher_50"] / seconds["student_4"]}
