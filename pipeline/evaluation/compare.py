"""The distillation report: the student at 1/2/4/8 steps against the teacher at 50 steps and at
the same few steps — wall time per image and prompt adherence — as JSON, Markdown and PNG grids.

Adherence comes from ``pipeline.adherence`` (the deterministic analyser of the synthetic set):
prompts are synthetic captions with known attributes, drawn with a seed the training set did not
use, so the numbers measure generalisation to new combinations as well as fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.sample import TextToImage
from pipeline.data.sheets import write_grid

STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_STEPS = 50
PROMPT_SEED = 12345  # not the demo dataset's seed: new attribute combinations


def eval_prompts(count: int, resolution: int) -> list[str]:
    """Synthetic captions (with their ground truth recoverable by ``parse_caption``)."""
    from pipeline.evaluation.synthetic import render_sample

    return [render_sample(i, resolution, PROMPT_SEED, 0.25)[1]["caption"] for i in range(count)]


def measure(pipe: TextToImage, prompts: list[str], steps: int, guidance: float, shift: float, grid: Path) -> dict:
    """Generate, time, score adherence and save a grid of the first 16."""
    from pipeline.evaluation.adherence import evaluate
    from pipeline.evaluate import generate_images

    images, timing = generate_images(pipe, prompts, steps, guidance, shift, seed=0, batch_size=64, desc=grid.stem)
    scores = evaluate(images, prompts)
    write_grid(images[:16], prompts[:16], grid)
    return {
        "steps": steps,
        "evaluations": steps * (2 if pipe.sampler == "euler" and guidance != 1.0 else 1),  # CFG: two per step
        "seconds_per_image": timing["seconds_per_image"],
        "sampler_seconds_per_image": timing["sampler_seconds_per_image"],
        "adherence_all": scores["all_correct"],
        "adherence": scores["accuracy"],
        "grid": str(grid),
    }


def versus(entry: dict, teacher: dict) -> dict:
    """``entry``'s adherence and speed relative to the reference ``teacher`` (each an evaluation
    with ``adherence_all``, ``seconds_per_image`` and ``sampler_seconds_per_image``)."""
    return {
        "adherence_vs_teacher": entry["adherence_all"] / max(teacher["adherence_all"], 1e-9),
        "speedup_vs_teacher": teacher["seconds_per_image"] / max(entry["seconds_per_image"], 1e-12),
        "sampler_speedup_vs_teacher": teacher["sampler_seconds_per_image"] / max(entry["sampler_seconds_per_image"], 1e-12),
    }


def compare(teacher: TextToImage, student: TextToImage, prompts: list[str], guidance: float, shift: float, out: Path) -> dict:
    teacher_full = measure(teacher, prompts, TEACHER_STEPS, guidance, shift, out / f"teacher_{TEACHER_STEPS}.png")
    students, teacher_few = [], []
    for steps in STUDENT_STEPS:
        students.append(measure(student, prompts, steps, guidance, shift, out / f"student_{steps}.png"))
        teacher_few.append(measure(teacher, prompts, steps, guidance, shift, out / f"teacher_{steps}.png"))
    for entry in students + teacher_few:
        entry |= versus(entry, teacher_full)
    return {"teacher": teacher_full, "teacher_few_steps": teacher_few, "students": students, "prompts": len(prompts), "guidance": guidance}


def markdown(report: dict) -> str:
    t = report["teacher"]
    lines = [
        "# Distillation report",
        "",
        f"{report['prompts']} synthetic prompts, guidance {report['guidance']}; adherence = all attributes correct.",
        "",
        "s / image is end to end (text encoders + sampler + VAE decode); the sampler speed-up counts "
        "the sampling loop alone, the part distillation changes. Evaluations are DiT forward passes per "
        "image: the guided teacher makes two a step, the student one.",
        "",
        "| model | steps | evaluations | adherence (all) | × teacher-50 | s / image | speed-up | sampler speed-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (Euler, CFG) | {t['steps']} | {t['evaluations']} | {t['adherence_all']:.3f} | 1.00 | {t['seconds_per_image']:.4f} | 1.0 | 1.0 |",
    ]
    for pair in zip(report["students"], report["teacher_few_steps"]):
        for name, m in zip(("student", "teacher (Euler, CFG)"), pair):
            lines.append(f"| {name} | {m['steps']} | {m['evaluations']} | {m['adherence_all']:.3f} | {m['adherence_vs_teacher']:.2f} | "
                         f"{m['seconds_per_image']:.4f} | {m['speedup_vs_teacher']:.1f} | {m['sampler_speedup_vs_teacher']:.1f} |")
    lines += ["", "## Grids", ""] + [f"![{Path(e['grid']).stem}]({Path(e['grid']).name})" for e in [t, *report["students"]]]
    return "\n".join(lines) + "\n"


def write_report(cfg, meta: dict, prompts: int = 64) -> dict:
    """Compare the exported student with its teacher; writes ``report.{json,md}`` in the run folder."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = TextToImage.from_folder(cfg.run_dir / "model", device)
    from pipeline.models.student import load_teacher

    teacher = TextToImage(load_teacher(cfg.teacher).to(device), student.vae, student.text, student.latent_shape)
    out = cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = compare(teacher, student, eval_prompts(prompts, meta["resolution"]), cfg.sampling.guidance, cfg.sampling.shift, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(f"pipeline.distill: report in {out / 'report.md'}")
    return report
