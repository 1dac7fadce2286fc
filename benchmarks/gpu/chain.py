"""The real stages on this device: ``pipeline.train`` under DeepSpeed ZeRO-2 in bf16 (and fp16 on a
GPU) that checkpoints, resumes and exports; then teacher against student sampling time.

- Training: the synthetic set through the real chain (``data_tools.synth`` → ``shard`` →
  ``encode`` with a demo-sized VAE and the tiny text encoders, 32 px → 8×8×4 latents), then
  ``python -m pipeline.train`` as a user runs it (one process, DeepSpeed ZeRO-2): N steps with a
  checkpoint, a second command that resumes to 1.5 N, and the exported model loaded back.
- Sampling: DiT-XL/2 at 32×32×4 latents with T5-XXL-shaped text (random weights: speed does not
  depend on them), 50 Euler steps with classifier-free guidance (two evaluations per step, one
  batch) against the distillation student (``pipeline.models.student.student_from``) in 4 consistency
  steps, bf16 autocast; seconds per image after a device synchronisation. The sampler alone, and
  end to end: the same batch's captions through a T5-XXL encoder (120 tokens) and CLIP-L's text
  tower, then SD's f8 VAE decoder (the widths of ``configs/autoencoder_256.yaml``) to 256 px, all
  built from their configs with random weights (the machine has no network and speed does not
  depend on weights). On a GPU the frozen parts are a large share of the student's time, so the
  end-to-end speed-up is far below the sampler's: reported, not a goal.
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


def frozen_parts(device: str, cpu: bool, batch: int, tokens: int) -> dict:
    """``{"text": fn, "decode": fn}``: one batch through T5 + CLIP text, and a latent batch through the
    VAE decoder, at the shipped GPU configs' architectures (CPU: toy widths), random weights, bf16 on a GPU."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if cpu:
        t5 = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
        clip = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
        widths = (32, 64)
    else:  # T5-XXL (google/t5-v1_1-xxl), CLIP-L/14's text tower, SD's VAE
        t5 = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
        clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
        widths = (128, 256, 512, 512)
    dtype = torch.float32 if cpu else torch.bfloat16
    with torch.device(device):
        t5_model = T5EncoderModel._from_config(t5, dtype=dtype).eval()
        clip_model = CLIPTextModelWithProjection._from_config(clip, dtype=dtype).eval()
        vae = AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                            up_block_types=("UpDecoderBlock2D",) * len(widths), latent_channels=4, layers_per_block=2).eval()  # bf16 by autocast
    g = torch.Generator().manual_seed(0)
    t5_ids = torch.randint(0, t5.vocab_size, (batch, tokens), generator=g).to(device)
    clip_ids = torch.randint(0, clip.vocab_size, (batch, 77), generator=g).to(device)
    side = 2 ** (len(widths) - 1) * 4  # a 4x4 latent grid per downsampling step: 8 px (CPU), 32 (GPU: 256 px)
    latents = torch.randn(batch, 4, side, side, generator=g).to(device)

    def text() -> None:
        t5_model(input_ids=t5_ids)
        clip_model(input_ids=clip_ids)

    return {"text": text, "decode": lambda: vae.decode(latents)}


def sampling(device: str, cpu: bool) -> dict:
    """Teacher (50 Euler steps + CFG) against student (4 consistency steps): seconds per image, the
    sampler alone and end to end (text encoding + sampler + VAE decode)."""
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
            "student_4": lambda steps=4: consistency(student, noise, {**cond, "guidance": guidance}, steps),
            **frozen_parts(device, cpu, batch, shape.text_tokens)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    seconds = {}
    with torch.no_grad(), autocast:
        for key, fn in runs.items():
            if key in ("teacher_50", "student_4"):
                fn(2)  # warm-up: the kernels and the allocator, two steps
            else:
                fn()
            start = clock()
            fn()
            seconds[key] = (clock() - start) / batch
    frozen = seconds["text"] + seconds["decode"]
    return {"model": name, "batch": batch, **{f"{k}_seconds_per_image": v for k, v in seconds.items()},
            "speedup": seconds["teacher_50"] / seconds["student_4"],
            "end_to_end_speedup": (seconds["teacher_50"] + frozen) / (seconds["student_4"] + frozen)}
