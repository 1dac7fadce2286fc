"""Student against teacher sampling time, side by side in one run (issue: consistency distillation).

The teacher is DiT-tiny at the demo's latent size (8x8x4) sampled with 50 Euler steps and
classifier-free guidance 4 (two model evaluations per step, batched); the student is the
distillation stage's copy of it (``pipeline.models.student.student_from``) with 4 consistency steps.
Both go through ``pipeline.evaluate.generate_images`` with the demo-sized VAE and the tiny text
encoders, on the same synthetic prompts. Weights are random: speed does not depend on them.

- ``student4_vs_teacher50_sampler``: the sampling loop alone (what distillation changes); goal >= 20.
- ``student4_vs_teacher50_end_to_end_preview``: text encoding + sampling + decoding per image, both
  decoding with the tiny preview decoder (``decoder="tiny"``: ``pipeline.models.tiny_decoder``'s
  default ``AutoencoderTiny``, Bohan 2023 "TAESD"); goal >= 20. This is the few-step path's end
  to end: previews are what a 4-step student is for, and with the decoder at ~10 ms per 64 images
  the sampler dominates both sides.
- ``student4_vs_teacher50_end_to_end``: the same with the full VAE decoder on both sides. Its
  decode (~0.2 s per 64 images at the demo size, as much as the student's whole sampler) bounds the
  ratio near (teacher sampler + 0.2 s) / (student sampler + 0.2 s) ≈ 11-13 whatever the sampler
  does, so 20 cannot be its goal; the goal there, 10, is "no regression" (it was 10.2 before the
  issue-30 work).
Ratio = teacher seconds / student seconds. Variants alternate in rounds; each keeps its fastest round.
A student round samples its prompts ``STUDENT_REPEAT`` times over (the seeds go on; per-image
time over all) so that it lasts about as long as a teacher round (~2 s against ~5 s): a 0.25 s
round took whatever the machine did in that quarter second (the preview ratio read 22.6 and then
16.5 in two runs of the same code, the student's sampler 3.0 then 4.3 ms an image).
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
from pipeline.encoders.vae import FrozenTinyDecoder, FrozenVAE, VAEConfig
from pipeline.evaluation.evaluate import generate_images
from pipeline.models.dit import build_dit
from pipeline.models.tiny_decoder import TinyDecoderConfig, build_tiny_decoder
from pipeline.inference.pipeline import TextToImage


STUDENT_REPEAT = 8  # a student round samples the prompts this many times (about a teacher round's length)


def pipelines(folder: Path, preview: bool = False) -> tuple[TextToImage, TextToImage]:
    """(teacher, student) sharing the demo VAE and text encoders; ``preview``: both decode with a
    default tiny decoder (random weights, saved and loaded as a model folder's ``tiny_vae/``)."""
    vae = FrozenVAE(from_dict(VAEConfig, {"path": str(demo_vae(folder / "vae"))}))
    make_encoders.main(["--output", str(folder / "encoders")])
    text = TextEncoders(from_dict(TextEncodersConfig, yaml.safe_load((folder / "encoders/encoders.yaml").read_text())))
    torch.manual_seed(0)
    teacher = build_dit("DiT-tiny", in_channels=4, sample_size=8, text_dim=text.t5.width, clip_dim=text.clip.width)
    student = student_from(teacher)
    shape = [4, 8, 8]
    tiny = None
    if preview:
        build_tiny_decoder(TinyDecoderConfig(), vae.latent_channels, vae.downsample).save_pretrained(folder / "tiny_vae")
        tiny = FrozenTinyDecoder(str(folder / "tiny_vae"))
    return (TextToImage(teacher, vae, text, shape, preview=tiny),
            TextToImage(student, vae, text, shape, sampler="consistency", preview=tiny))


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    prompts = eval_prompts(16 if quick else 64, 32)
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student = pipelines(Path(tmp))
        preview = pipelines(Path(tmp) / "preview", preview=True)
        variants = (("teacher", teacher, 50, 1), ("student", student, 4, STUDENT_REPEAT), ("teacher_preview", preview[0], 50, 1),
                    ("student_preview", preview[1], 4, STUDENT_REPEAT))
        rounds = 1 if quick else 3
        best: dict[str, dict] = {}
        for _ in range(rounds):  # alternate, keep each variant's fastest round (the least disturbed)
            for name, pipe, steps, repeat in variants:
                _, timing = generate_images(pipe, prompts * repeat, steps, 4.0, batch_size=64, desc=name)
                if name not in best or timing["seconds_per_image"] < best[name]["seconds_per_image"]:
                    best[name] = timing
    t, s = best["teacher"], best["student"]
    details = {"prompts": len(prompts), "student_repeat": STUDENT_REPEAT, **{name: {k: round(v, 5) for k, v in timing.items()} for name, timing in best.items()}}
    end_to_end = {name: best[f"teacher{name}"]["seconds_per_image"] / best[f"student{name}"]["seconds_per_image"]
                  for name in ("", "_preview")}
    return [
        {"name": "student4_vs_teacher50_sampler", "ratio": round(t["sampler_seconds_per_image"] / s["sampler_seconds_per_image"], 2),
         "goal": 20.0, "better": "higher", **details},
        {"name": "student4_vs_teacher50_end_to_end", "ratio": round(end_to_end[""], 2), "goal": 10.0, "better": "higher"},
        {"name": "student4_vs_teacher50_end_to_end_preview", "ratio": round(end_to_end["_preview"], 2), "goal": 20.0,
         "better": "higher"},
    ]


if __name__ == "__main__":
    print(run(quick=True))
