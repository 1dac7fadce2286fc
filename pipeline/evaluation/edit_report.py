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
from pipeline.evaluation.edit_cases import TASKS, EditCase, edit_cases
from pipeline.evaluation.edit_eval import (
    baseline_inputs,
    baseline_scores,
    evaluate_task,
    vae_ceiling,
)
from pipeline.figures.sheets import table_sheet
from pipeline.inference.editing import ImageEditor, Sampling, outpaint_canvas
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
    return "\n".join(lines)


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
    """Evaluate each ``(label, model folder, steps)``; write the report files into ``args.output``."""
    pipes: dict[Path, TextToImage] = {}
    for _, folder, _ in runs:
        if folder not in pipes:
            pipes[folder] = TextToImage.from_folder(folder, device)
    first = next(iter(pipes.values()))
    resolution = first.latent_shape[-1] * first.vae.downsample
    cases = {task: edit_cases(task, args.count, resolution, args.seed) for task in args.tasks}
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
              "paste_back": args.paste_back, "feather": args.feather, "tasks": list(args.tasks),
              "strengths": {t: strengths[t] for t in args.tasks},
              "baseline": str(args.baseline) if args.baseline else None, "t2i_single": t2i_single,
              "runs": results, "goals": goals(results, t2i_single)}
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "per_case.jsonl").write_text("".join(json.dumps(row) + "\n" for row in per_case), encoding="utf-8")
    sheet(cases, outputs, out / "edit_sheet.png")
    (out / "edit_report.md").write_text(markdown(report), encoding="utf-8")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--teacher", type=Path, help="exported teacher folder (Euler, guided)")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[50])
    p.add_argument("--student", type=Path, help="exported student folder (consistency steps)")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--count", type=int, default=256, help="cases per task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
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
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.teacher is None and args.student is None:
        p.error("give --teacher DIR and/or --student DIR")
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
    missed = [g for g in report["goals"] if not g["met"]]
    print(f"{PROG}: {len(runs)} runs × {len(args.tasks)} tasks × {args.count} cases; goals met "
          f"{len(report['goals']) - len(missed)}/{len(report['goals'])}; report in {args.output / 'edit_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
