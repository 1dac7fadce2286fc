"""``python -m pipeline.compare --student DIR [--teacher DIR] [--prompts 64] [--guidance G [G …]] --output DIR``

A distilled student against its teacher: the student at 1/2/4/8 steps, the teacher at 50 steps
and at the same few steps — wall time per image and prompt adherence — as ``report.json``,
``report.md`` and PNG grids. Generation goes through ``pipeline.evaluation.evaluate``'s
``generate_images`` (the one generation path), so these figures and ``pipeline.evaluate``'s agree.

Adherence comes from ``pipeline.evaluation.adherence`` (the deterministic analyser of the
synthetic set): prompts are synthetic captions with known attributes, drawn with a seed the
training set did not use, so the numbers measure generalisation to new combinations as well as
fidelity. The teacher defaults to the one the student's model folder names.

Several ``--guidance`` values compare at each (``--output``/g{guidance}/, each as above) and write
``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``--output``: teacher and student adherence
along guidance, side by side (``pipeline.evaluation.sweep``; ``pipeline.evaluate --guidance``
adds the diversity axes). A scale outside the student's exported ``guidance_range`` is warned about.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.data.model_folder import read_model_info
from pipeline.figures.sheets import write_sheet
from pipeline.evaluation import sweep
from pipeline.evaluation.adherence import evaluate
from pipeline.evaluation.evaluate import generate_images
from pipeline.evaluation.relative import versus
from pipeline.evaluation.synthetic import render_sample
from pipeline.inference.pipeline import TextToImage
from pipeline.models.student import load_teacher

PROG = "pipeline.compare"

STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_STEPS = 50
PROMPT_SEED = 12345  # not the demo dataset's seed: new attribute combinations


def eval_prompts(count: int, resolution: int) -> list[str]:
    """Synthetic captions (with their ground truth recoverable by ``parse_caption``)."""
    return [render_sample(i, resolution, PROMPT_SEED, 0.25)[1]["caption"] for i in range(count)]


def measure(pipe: TextToImage, prompts: list[str], steps: int, guidance: float, shift: float, grid: Path) -> dict:
    """Generate, time, score adherence and save a grid of the first 16."""
    images, timing = generate_images(pipe, prompts, steps, guidance, shift, seed=0, batch_size=64, desc=grid.stem)
    scores = evaluate(images, prompts)
    write_sheet(images[:16], prompts[:16], grid)
    return {
        "steps": steps,
        "evaluations": steps * (2 if pipe.sampler == "euler" and guidance != 1.0 else 1),  # CFG: two per step
        "seconds_per_image": timing["seconds_per_image"],
        "sampler_seconds_per_image": timing["sampler_seconds_per_image"],
        "adherence_all": scores["all_correct"],
        "adherence": scores["accuracy"],
        "grid": str(grid),
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


def load_pair(student_dir: Path, teacher_dir: Path | None) -> tuple[TextToImage, TextToImage, dict]:
    """The student, its teacher (sharing the student's VAE and text encoders) and the student's info."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = read_model_info(student_dir)
    student = TextToImage.from_folder(student_dir, device)
    teacher_model = load_teacher(teacher_dir or info["teacher"]).to(device)
    return TextToImage(teacher_model, student.vae, student.text, student.latent_shape), student, info


def write_report(student_dir: Path, teacher_dir: Path | None, prompts: int, guidance: float | list[float] | None,
                 shift: float | None, out: Path) -> dict:
    """Compare an exported student with its teacher; writes ``report.{json,md}`` and grids in ``out``
    (with several ``guidance`` values: in ``out/g{guidance}``, and the sweep in ``out``).
    ``guidance`` / ``shift`` default to the student's recorded sampling settings."""
    teacher, student, info = load_pair(student_dir, teacher_dir)
    sampling = info.get("sampling", {})
    scales = [sampling.get("guidance", 4.0)] if guidance is None else guidance if isinstance(guidance, list) else [guidance]
    shift = sampling.get("shift", 1.0) if shift is None else shift
    for g in scales:
        bounds = sweep.outside_range(info, g)
        if bounds:
            print(f"{PROG}: warning: guidance {g:g} is outside the guidance_range [{bounds[0]:g}, {bounds[1]:g}] "
                  f"the student '{student_dir}' was distilled for: its images there are extrapolation")
    eval_set = eval_prompts(prompts, info["resolution"])
    reports = {}
    for g in scales:
        folder = out if len(scales) == 1 else out / f"g{g:g}"
        folder.mkdir(parents=True, exist_ok=True)
        reports[g] = compare(teacher, student, eval_set, g, shift, folder)
        (folder / "report.json").write_text(json.dumps(reports[g], indent=2) + "\n")
        (folder / "report.md").write_text(markdown(reports[g]))
        print(f"{PROG}: report in {folder / 'report.md'}")
    if len(scales) > 1:
        sweep.write_sweep(out, sweep_cells(reports, student_dir, teacher_dir or Path(info["teacher"]), info))
        print(f"{PROG}: guidance sweep in {out / 'sweep.md'} and {out / 'sweep.png'}")
    return reports[scales[0]] if len(scales) == 1 else {"by_guidance": reports}


def sweep_cells(reports: dict[float, dict], student_dir: Path, teacher_dir: Path, info: dict) -> list[dict]:
    """``pipeline.evaluation.sweep`` rows: the student at each of its step counts, the teacher at 50."""
    cells = []
    for g, report in reports.items():
        rows = [("student", student_dir, m) for m in report["students"]] + [("teacher", teacher_dir, report["teacher"])]
        for label, model, m in rows:
            cell = {"label": label, "model": str(Path(model).resolve()), "steps": m["steps"], "guidance": g,
                    "output": m["grid"], "count": report["prompts"], "seconds_per_image": m["seconds_per_image"],
                    "adherence_all": m["adherence_all"]}
            if label == "student" and sweep.outside_range(info, g):
                cell["outside_guidance_range"] = sweep.outside_range(info, g)
            cells.append(cell)
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--student", type=Path, required=True, help="the student's exported model folder (runs/NAME/model)")
    p.add_argument("--teacher", type=Path, help="the teacher's model folder (default: the one the student's model folder names)")
    p.add_argument("--prompts", type=int, default=64, help="synthetic prompts to generate (default 64)")
    p.add_argument("--guidance", type=float, nargs="+", help="guidance scale g (default: the student's recorded one); "
                   "several: a sweep, one report each under OUTPUT/g{guidance}/ and sweep.{json,md,png} in OUTPUT")
    p.add_argument("--shift", type=float, help="time-grid shift (default: the student's recorded one)")
    p.add_argument("--output", type=Path, required=True, help="folder for report.json, report.md and the grids")
    args = p.parse_args(argv)
    if args.prompts < 1:
        p.error(f"--prompts must be >= 1 (got {args.prompts})")
    if args.guidance is not None and min(args.guidance) < 0:
        p.error(f"--guidance must be >= 0 (got {min(args.guidance):g})")
    try:
        write_report(args.student, args.teacher, args.prompts, args.guidance, args.shift, args.output)
    except (FileNotFoundError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
