"""Student against teacher sampling time, side by side in one run (issue: consistency distillation).

The teacher is DiT-tiny at the demo's latent size (8x8x4) sampled with 50 Euler steps and
classifier-free guidance 4 (two model evaluations per step, batched); the student is the
distillation stage's copy of it (``pipeline.models.student.student_from``) with 4 consistency steps.
Both go through ``pipeline.evaluate.generate_images`` with the demo-sized VAE and the tiny text
encoders, on the same synthetic prompts. Weights are random: speed does not depend on them.

- ``student4_vs_teacher50_sampler``: the sampling loop alone (what distillation changes).
- ``student4_vs_teacher50_end_to_end``: text encoding + sampling + VAE decoding per image.
Ratio = teacher seconds / student seconds; goal >= 20.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.fixtures import demo_vae
from data_tools import make_encoders
from pipeline.config import from_dict
from pipeline.models.student import student_from
from pipeline.evaluation.compare import eval_prompts
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.evaluation.evaluate import generate_images
from pipeline.models.dit import build_dit
from pipeline.inference.pipeline import TextToImage


def pipelines(folder: Path) -> tuple[TextToImage, TextToImage]:
    vae = FrozenVAE(from_dict(VAEConfig, {"path": str(demo_vae(folder / "vae"))}))
    make_encoders.main(["--output", str(folder / "encoders")])
    text = TextEncoders(from_dict(TextEncodersConfig, yaml.safe_load((folder / "encoders/encoders.yaml").read_text())))
    torch.manual_seed(0)
    teacher = build_dit("DiT-tiny", in_channels=4, sample_size=8, text_dim=text.t5.width, clip_dim=text.clip.width)
    student = student_from(teacher)
    shape = [4, 8, 8]
    return TextToImage(teacher, vae, text, shape), TextToImage(student, vae, text, shape, sampler="consistency")


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    prompts = eval_prompts(16 if quick else 64, 32)
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student = pipelines(Path(tmp))
        rounds = 1 if quick else 3
        best: dict[str, dict] = {}
        for _ in range(rounds):  # alternate, keep each side's fastest round (the least disturbed)
            for name, pipe, steps in (("teacher", teacher, 50), ("student", student, 4)):
                _, timing = generate_images(pipe, prompts, steps, 4.0, batch_size=64, desc=name)
                if name not in best or timing["seconds_per_image"] < best[name]["seconds_per_image"]:
                    best[name] = timing
    t, s = best["teacher"], best["student"]
    details = {"prompts": len(prompts), "teacher": {k: round(v, 5) for k, v in t.items()},
               "student": {k: round(v, 5) for k, v in s.items()}}
    return [
        {"name": "student4_vs_teacher50_sampler", "ratio": round(t["sampler_seconds_per_image"] / s["sampler_seconds_per_image"], 2),
         "goal": 20.0, "better": "higher", **details},
        {"name": "student4_vs_teacher50_end_to_end", "ratio": round(t["seconds_per_image"] / s["seconds_per_image"], 2),
         "goal": 20.0, "better": "higher"},
    ]


if __name__ == "__main__":
    print(run(quick=True))
