"""``python -m pipeline.evaluate_edits --teacher DIR [--student DIR] --count 256 --output DIR``

Editing without retraining, measured: inpainting (object boxes, and large masks: a quarter and
a half of the image), image-to-image (SDEdit, and FlowEdit for the same background change),
outpainting and 2× super-resolution (``pipeline.evaluation.edit_cases``) by the teacher (Euler, 50
steps) and the student (1/2/4 steps), scored by ``pipeline.evaluation.edit_eval``. Masked edits
paste the input's pixels back outside the feathered mask, as ``pipeline.edit`` does by default
(``--no-paste-back`` measures the decoder's own pixels). Writes ``edit_report.json``,
``edit_report.md``, ``per_case.jsonl`` and ``edit_sheet.png`` (input | mask | target | each model's
result). Each task also shows its VAE ceiling: the same score for the VAE round trip of the target.

The goals (issue #15): inpainting's new object right at least 0.8× as often as the teacher's
text-to-image single-object adherence (read from a ``pipeline.evaluate`` folder, ``--baseline``),
the unmasked region ≥ 30 dB PSNR, image-to-image's new background ≥ 0.9 and objects kept ≥ 0.9.

Inverse problems, on request (``--tasks colourise,sr4,edges,deblur``, issue #28): each task's
methods side by side (``pipeline.evaluation.inverse_report``): the source as is, ``--l2`` and
``--pix2pix`` generators, SDEdit by the teacher, the data-consistent solver
(``pipeline.inference.inverse``; ``--solver-steps/-update/-strength``), ``--conditioned``
models, and the VAE ceiling; objects kept, colour right, PSNR, LPIPS and the consistency error
‖A(x̂) − y‖ per method, and ``sheet_TASK.png`` (source | each method | target).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from pipeline.data.jsonl import read_jsonl
from pipeline.evaluation.adherence import parse_caption
from pipeline.evaluation.edit_cases import ALL_TASKS, INVERSE_TASKS, TASKS, EditCase, edit_cases
from pipeline.evaluation.edit_eval import (
    baseline_inputs,
    baseline_scores,
    evaluate_task,
    vae_ceiling,
)
from pipeline.evaluation.inverse_report import (
    INVERSE_STRENGTHS,
    InverseSettings,
    evaluate_inverse_task,
    inverse_goals,
    inverse_markdown,
    inverse_sheet,
    load_trained,
)
from pipeline.figures.sheets import table_sheet
from pipeline.inference.editing import ImageEditor, Sampling, outpaint_canvas
from pipeline.inference.inverse import UPDATES, SolverConfig
from pipeline.inference.pipeline import TextToImage
from pipeline.timing import clock

PROG = "pipeline.evaluate_edits"
CASE_SEED = 54321  # neither the demo's training (0) nor its evaluation (12345) seed
SHEET_CASES = 3  # per task
GOALS = {"inpaint_vs_t2i_single": 0.8, "inpaint_unmasked_psnr": 30.0, "img2img_background": 0.9, "img2img_objects_kept": 0.9}
UNMASKED_CEILING = "VAE round trip, no paste-back (dB)"
RESTORE = [("scene", "caption right"), ("unmasked_psnr", "unmasked PSNR (dB)"), ("vae_unmasked_psnr", UNMASKED_CEILING)]
COLUMNS = {
    "inpaint": [("new_object", "new object right"), ("new_object_single", "… 1-object scenes"), ("new_object_two", "… 2-object scenes"),
                ("scene", "whole caption right"), ("unmasked_psnr", "unmasked PSNR (dB)"),
                ("vae_unmasked_psnr", UNMASKED_CEILING)],
    "img2img": [("background", "new background"), ("objects_kept", "objects kept"), ("both", "both"),
                ("vae_objects_kept", "VAE ceiling: objects kept")],
    "flowedit": [("background", "new background"), ("objects_kept", "objects kept"), ("both", "both"),
                 ("vae_objects_kept", "VAE ceiling: objects kept")],
    "outpaint": [("scene", "caption right"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("vae_psnr", "VAE ceiling (dB)"),
                 ("baseline_scene", "edge-filled input: caption"), ("baseline_psnr", "… PSNR"), ("baseline_ssim", "… SSIM")],
    "superres": [("scene", "caption right"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("vae_psnr", "VAE ceiling (dB)"),
                 ("baseline_scene", "bicubic: caption"), ("baseline_psnr", "… PSNR"), ("baseline_ssim", "… SSIM")],
    "inpaint_quarter": RESTORE,
    "inpaint_half": RESTORE,
}


def single_object_adherence(eval_dir: Path) -> float | None:
    """The share of one-object prompts with every attribute right in a ``pipeline.evaluate`` folder."""
    path = Path(eval_dir) / "per_prompt.jsonl"
    if not path.is_file():
        return None
    rows = [row for _, row in read_jsonl(path)]
    single = [r["adherence"]["all"] for r in rows if "adherence" in r and len(parse_caption(r["prompt"])["objects"]) == 1]
    return sum(single) / len(single) if single else None


def run_model(pipe: TextToImage, label: str, steps: int, cases: dict[str, list[EditCase]], strengths: dict[str, float],
              sampling: Sampling, seed: int, batch_size: int, ceilings: dict) -> tuple[dict, dict[str, list], list[dict]]:
    """Every task's summary (plus seconds and the VAE ceiling) for one model at ``steps`` (the rest
    of ``sampling`` as given), its output images and per-case rows. ``ceilings`` memoises what does
    not depend on the model — the VAE ceiling and the inputs' own scores — per (VAE, task)."""
    editor, sampling = ImageEditor(pipe), replace(sampling, steps=steps)
    result, outputs, per_case = {"steps": steps, "sampler": pipe.sampler}, {}, []
    for task, task_cases in cases.items():
        start = clock()
        summary, rows, outputs[task] = evaluate_task(editor, task_cases, strengths[task], sampling, seed, batch_size,
                                                     desc=f"{label} {task}")
        seconds = (clock() - start) / len(task_cases)
        key = (pipe.vae.cfg.path, pipe.vae.cfg.subfolder, task)
        if key not in ceilings:
            ceilings[key] = vae_ceiling(editor, task_cases, batch_size)
            if task in ("outpaint", "superres"):
                ceilings[key] |= baseline_scores(task_cases)
        result[task] = {**summary, **ceilings[key], "seconds_per_case": seconds, "strength": strengths[task]}
        per_case += [{"run": label, "task": task, "index": c.index, "prompt": c.prompt, **row}
                     for c, row in zip(task_cases, rows)]
    return result, outputs, per_case


def goals(runs: dict, t2i_single: float | None) -> list[dict]:
    checks = []
    for label, run in runs.items():
        if "inpaint" in run:
            if t2i_single is not None:
                checks.append({"run": label, "goal": "inpaint new object ≥ 0.8 × teacher t2i single-object",
                               "value": run["inpaint"]["new_object"], "target": GOALS["inpaint_vs_t2i_single"] * t2i_single})
            checks.append({"run": label, "goal": "inpaint unmasked PSNR ≥ 30 dB", "value": run["inpaint"]["unmasked_psnr"],
                           "target": GOALS["inpaint_unmasked_psnr"]})
        if "img2img" in run:
            checks.append({"run": label, "goal": "img2img new background ≥ 0.9", "value": run["img2img"]["background"],
                           "target": GOALS["img2img_background"]})
            checks.append({"run": label, "goal": "img2img objects kept ≥ 0.9", "value": run["img2img"]["objects_kept"],
                           "target": GOALS["img2img_objects_kept"]})
    for check in checks:
        check["met"] = check["value"] >= check["target"]
    return checks


def markdown(report: dict) -> str:
    """The report as Markdown: today's tasks (when asked for), then the inverse problems."""
    lines = edit_markdown(report) if report["tasks"] else []
    if report.get("inverse"):
        lines += inverse_markdown(report["inverse"], report["inverse_goals"])
    return "\n".join(lines)


def edit_markdown(report: dict) -> list[str]:
    strengths = ", ".join(f"{t} {s}" for t, s in report["strengths"].items())
    feather = "auto" if report["feather"] is None else report["feather"]
    paste = (f"masked edits paste the input back outside the mask (feather {feather} px)"
             if report["paste_back"] else "no paste-back: the unmasked pixels are the decoder's")
    intro = (f"{report['count']} synthetic cases per task (seed {report['seed']}, {report['resolution']} px), guidance "
             f"{report['guidance']}; strengths {strengths}; {paste}. Rates are shares of cases; the analyser reads every "
             "result back from its pixels.")
    lines = ["# Editing without retraining", "", intro, ""]
    if report.get("t2i_single") is not None:
        baseline = (f"Teacher text-to-image, single-object prompts, all attributes right: **{report['t2i_single']:.3f}** "
                    f"(from `{report['baseline']}`).")
        lines += [baseline, ""]
    for task in report["tasks"]:
        keys = [(k, title) for k, title in COLUMNS[task] if any(k in run.get(task, {}) for run in report["runs"].values())]
        lines += [f"## {task}", "", "| model | " + " | ".join(t for _, t in keys) + " | s / case |",
                  "|---|" + "---:|" * (len(keys) + 1)]
        for label, run in report["runs"].items():
            row = run[task]
            lines.append(f"| {label} | " + " | ".join(f"{row[k]:.3f}" if k in row else "–" for k, _ in keys)
                         + f" | {row['seconds_per_case']:.4f} |")
        lines.append("")
    if report["goals"]:
        lines += ["## Goals", "", "| model | goal | value | target | met |", "|---|---|---:|---:|---|"]
        lines += [f"| {g['run']} | {g['goal']} | {g['value']:.3f} | {g['target']:.3f} | {'yes' if g['met'] else '**no**'} |"
                  for g in report["goals"]]
        lines.append("")
    lines += ["## Pictures", "", "![edits](edit_sheet.png)", ""]
    return lines


def sheet(cases: dict[str, list[EditCase]], outputs: dict[str, dict[str, list]], path: Path) -> Path:
    """Input (as the model gets it) | mask | target | each model's result, ``SHEET_CASES`` per task."""
    labels = list(outputs)
    cells, titles = [], []
    for task, task_cases in cases.items():
        shown = task_cases[:SHEET_CASES]
        inputs = baseline_inputs(shown) if task in ("outpaint", "superres") else [c.image for c in shown]
        for k, case in enumerate(shown):
            mask = case.mask if case.mask is not None else (_outpaint_mask(case) if task == "outpaint" else None)
            mask_image = None if mask is None else Image.fromarray((mask * 255).astype("uint8"))
            cells.append([inputs[k], mask_image, case.reference] + [outputs[label][task][k] for label in labels])
            titles.append(f"{task}: {case.prompt}")
    return table_sheet(cells, ["input", "mask", "target", *labels], titles, path)


def _outpaint_mask(case: EditCase):
    return outpaint_canvas(case.image, case.padding)[1]


def write_report(runs: list[tuple[str, Path, int]], args: argparse.Namespace, device: str) -> dict:
    """Evaluate each ``(label, model folder, steps)`` on today's tasks and the teacher (with the
    trained folders) on the inverse tasks; write the report files into ``args.output``."""
    edits = [t for t in args.tasks if t in TASKS]
    inverse_tasks = [t for t in args.tasks if t in INVERSE_TASKS]
    runs = runs if edits else []
    pipes: dict[Path, TextToImage] = {}
    for folder in [f for _, f, _ in runs] + ([args.teacher] if inverse_tasks else []):
        if folder not in pipes:
            pipes[folder] = TextToImage.from_folder(folder, device)
    first = next(iter(pipes.values()))
    resolution = first.latent_shape[-1] * first.vae.downsample
    cases = {task: edit_cases(task, args.count, resolution, args.seed) for task in edits}
    strengths = {"inpaint": args.inpaint_strength, "img2img": args.img2img_strength, "flowedit": args.flowedit_strength,
                 "outpaint": 1.0, "superres": args.superres_strength, "inpaint_quarter": args.inpaint_strength,
                 "inpaint_half": args.inpaint_strength}
    sampling = Sampling(guidance=args.guidance, paste_back=args.paste_back, feather=args.feather)
    results, outputs, per_case, ceilings = {}, {}, [], {}
    for label, folder, steps in runs:
        results[label], outputs[label], rows = run_model(pipes[folder], label, steps, cases, strengths, sampling,
                                                         args.seed, args.batch_size, ceilings)
        per_case += rows
    t2i_single = single_object_adherence(args.baseline) if args.baseline else None
    report = {"count": args.count, "seed": args.seed, "resolution": resolution, "guidance": args.guidance,
              "paste_back": args.paste_back, "feather": args.feather, "tasks": edits,
              "strengths": {t: strengths[t] for t in edits},
              "baseline": str(args.baseline) if args.baseline else None, "t2i_single": t2i_single,
              "runs": results, "goals": goals(results, t2i_single)}
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    if inverse_tasks:
        per_case += run_inverse(pipes[args.teacher], inverse_tasks, resolution, args, device, report)
    (out / "edit_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "per_case.jsonl").write_text("".join(json.dumps(row) + "\n" for row in per_case), encoding="utf-8")
    if edits:
        sheet(cases, outputs, out / "edit_sheet.png")
    (out / "edit_report.md").write_text(markdown(report), encoding="utf-8")
    return report


def run_inverse(teacher: TextToImage, tasks: list[str], resolution: int, args: argparse.Namespace, device: str,
                report: dict) -> list[dict]:
    """The inverse tasks into ``report["inverse"]`` and ``report["inverse_goals"]``, a sheet per
    task into ``args.output``; returns the per-case rows."""
    trained = [load_trained(kind, folder, device) for kind in ("l2", "pix2pix", "conditioned")
               for folder in getattr(args, kind)]
    steps = args.teacher_steps[0]
    settings = InverseSettings(
        sampling=Sampling(steps=steps, guidance=args.guidance),
        solver=SolverConfig(steps=args.solver_steps or steps, guidance=args.guidance, update=args.solver_update,
                            strength=args.solver_strength),
        image_guidance=args.image_guidance, strengths={**INVERSE_STRENGTHS, **args.inverse_strength},
        seed=args.seed, batch_size=args.batch_size)
    report["inverse"], per_case = {}, []
    for task in tasks:
        cases = edit_cases(task, args.count, resolution, args.seed)
        report["inverse"][task], outputs, rows = evaluate_inverse_task(task, cases, teacher, trained, settings)
        inverse_sheet(cases, outputs, args.output / f"sheet_{task}.png")
        per_case += rows
    report["solver"] = {"steps": settings.solver.steps, "update": settings.solver.update,
                        "strength": settings.solver.strength, "polish": settings.solver.polish}
    report["inverse_goals"] = inverse_goals(report["inverse"])
    return per_case


def task_strength(text: str) -> tuple[str, float]:
    """``TASK=S`` (an inverse task's SDEdit strength) -> (task, S)."""
    task, _, value = text.partition("=")
    if task not in INVERSE_TASKS:
        raise argparse.ArgumentTypeError(f"'{text}': TASK must be one of {', '.join(INVERSE_TASKS)}")
    try:
        strength = float(value)
    except ValueError:
        strength = float("nan")
    if not 0 < strength <= 1:
        raise argparse.ArgumentTypeError(f"'{text}': the strength must be in (0, 1]")
    return task, strength


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--teacher", type=Path, help="exported teacher folder (Euler, guided)")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[50])
    p.add_argument("--student", type=Path, help="exported student folder (consistency steps)")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--count", type=int, default=256, help="cases per task")
    p.add_argument("--tasks", type=_tasks, nargs="+", default=[list(TASKS)],
                   help=f"space- or comma-separated; default: {','.join(TASKS)}; on request: {','.join(INVERSE_TASKS)}")
    p.add_argument("--seed", type=int, default=CASE_SEED, help="case k: scene and noise from seed + k")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--inpaint-strength", type=float, default=1.0, help="inpainting, large masks included")
    p.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=True,
                   help="masked edits: the input's pixels back outside the feathered mask (default, as pipeline.edit)")
    p.add_argument("--feather", type=int, help="paste-back feather in pixels (default: pipeline.edit's)")
    p.add_argument("--img2img-strength", type=float, default=0.6)
    p.add_argument("--flowedit-strength", type=float, default=0.7)
    p.add_argument("--superres-strength", type=float, default=0.4)
    p.add_argument("--baseline", type=Path, help="a pipeline.evaluate folder of the teacher (its single-object adherence)")
    p.add_argument("--l2", type=Path, nargs="+", default=[], help="L2-regression generator folders (inverse tasks)")
    p.add_argument("--pix2pix", type=Path, nargs="+", default=[], help="pix2pix generator folders (inverse tasks)")
    p.add_argument("--conditioned", type=Path, nargs="+", default=[], help="image-conditioned model folders (inverse tasks)")
    p.add_argument("--image-guidance", type=float, default=1.5, help="the conditioned models' image guidance")
    p.add_argument("--inverse-strength", type=task_strength, nargs="+", default=[], metavar="TASK=S",
                   help="SDEdit's strength on an inverse task (defaults: "
                   + ", ".join(f"{t}={s}" for t, s in INVERSE_STRENGTHS.items()) + ")")
    p.add_argument("--solver-steps", type=int, help="the data-consistent solver's steps (default: the first --teacher-steps)")
    p.add_argument("--solver-update", choices=UPDATES, default=UPDATES[0], help="pipeline.inference.inverse's update")
    p.add_argument("--solver-strength", type=float, default=1.0, help="1: from noise; below 1: from the noised source")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", type=Path, required=True)
    return p


def _tasks(text: str) -> list[str]:
    tasks = [t for t in text.replace(",", " ").split() if t]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'} (known: {', '.join(ALL_TASKS)})")
    return tasks


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.inverse_strength = dict(args.inverse_strength)
    args.tasks = list(dict.fromkeys(t for group in args.tasks for t in group))
    if args.teacher is None and args.student is None:
        p.error("give --teacher DIR and/or --student DIR")
    if args.teacher is None and any(t in INVERSE_TASKS for t in args.tasks):
        p.error(f"the inverse tasks ({', '.join(INVERSE_TASKS)}) need --teacher DIR")
    if args.solver_steps is not None and args.solver_steps < 1:
        p.error(f"--solver-steps must be >= 1 (got {args.solver_steps})")
    if not 0 < args.solver_strength <= 1:
        p.error(f"--solver-strength must be in (0, 1] (got {args.solver_strength})")
    if args.feather is not None and args.feather < 0:
        p.error(f"--feather must be >= 0 (got {args.feather})")
    for name in ("count", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ("inpaint_strength", "img2img_strength", "flowedit_strength", "superres_strength"):
        if not 0 < getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1] (got {getattr(args, name)})")
    runs = [(f"teacher_{s}", args.teacher, s) for s in (args.teacher_steps if args.teacher else [])]
    runs += [(f"student_{s}", args.student, s) for s in (args.student_steps if args.student else [])]
    if any(steps < 1 for _, _, steps in runs):
        p.error("steps must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        report = write_report(runs, args, device)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    checks = report["goals"] + report.get("inverse_goals", [])
    missed = [g for g in checks if not g["met"]]
    print(f"{PROG}: {len(runs)} runs × {len(args.tasks)} tasks × {args.count} cases; goals met "
          f"{len(checks) - len(missed)}/{len(checks)}; report in {args.output / 'edit_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
