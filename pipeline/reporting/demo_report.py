"""``python -m pipeline.demo_report --run runs/demo``: the end-to-end demo's report.

Collects what the demo's stages wrote into one ``report.md`` + ``report.json`` in the run folder:
the autoencoder's held-out PSNR, the evaluation of the teacher (50 steps, guidance) and of the
student at 1/2/4 steps (``pipeline.evaluate`` outputs under ``eval/``), seconds per image, loss
curves with each training stage's skipped work, the LoRA stage (a colour the teacher never saw, before
and after, and what the adapters cost the old prompts), the editing evaluation
(``pipeline.evaluate_edits`` under ``edits/``), the stage timings of ``launch/demo.sh`` and the goals
of the issues, met or not.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from pipeline.evaluation.relative import versus
from pipeline.evaluation.sweep import headline_diversity
from pipeline.figures.plots import plot_loss_curves

PROG = "pipeline.demo_report"
GOALS = {
    "autoencoder_psnr": 30.0,  # dB, held-out
    "autoencoder_adherence_ceiling": 0.85,  # its reconstructions of the evaluation renders: bounds every later model
    "teacher_adherence_all": 0.75,  # 50 steps, 512 unseen prompts
    "teacher_adherence_1_object": 0.90,
    "teacher_adherence_2_objects": 0.50,
    "student_4_vs_teacher": 1.03,  # adherence ratios to the 50-step teacher (issue 29: beyond the teacher at 4 steps,
    "student_1_vs_teacher": 1.00,  # at least tied at 1)
    "student_4_sampler_speedup": 20.0,  # the sampling loop; end-to-end s/image is reported beside it
    "student_coverage_vs_teacher": 0.95,  # pixel-space coverage and recall, ratios to the 50-step teacher's
    "student_recall_vs_teacher": 0.95,
    "teacher_one_to_many_tv_excess": 0.10,  # unnamed attributes: TV beyond a perfect sampler's at the same K (at most)
    "lora_concept_adherence": 0.80,  # all attributes right on prompts whose objects are all the new colour
    "lora_old_prompts_vs_teacher": -0.02,  # adherence points the adapters may cost the 512 old prompts
}
LORA_EVALS = {"before": "concept_teacher_50", "after": "concept_lora_50", "old": "lora_50"}  # under eval/
AT_MOST = {"teacher_one_to_many_tv_excess"}  # goals met at or below their target
BEAT_MARGIN = 0.05  # adherence points by which the student must beat the teacher at the same steps


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing stage output: '{path}' (run launch/demo.sh first)")
    return json.loads(path.read_text())


def _evaluated(folder: Path, teacher: dict | None = None) -> dict:
    """One ``pipeline.evaluate`` output; with ``teacher`` (the 50-step reference), its ratios to it."""
    s = _json(folder / "summary.json")
    row = {"steps": s["steps"], "guidance": s["guidance"], "prompts": s["count"], "adherence_all": s["adherence_all"],
           "adherence": s["adherence"], "adherence_by_objects": s.get("adherence_by_objects", {}),
           "adherence_vae_ceiling": s.get("adherence_vae_ceiling"), "seconds_per_image": s["seconds_per_image"],
           "sampler_seconds_per_image": s["sampler_seconds_per_image"], "grid": str(folder / "grid.png")}
    row |= {k: v for k, v in headline_diversity(s).items() if k != "features"}
    row |= {k: s[f"one_to_many_{k}"] for k in ("tv", "tv_perfect", "tv_excess", "entropy_ratio") if f"one_to_many_{k}" in s}
    if "one_to_many" in s:
        row["one_to_many_k"] = s["one_to_many"]["k"]
    return row if teacher is None else row | versus(row, teacher)


def _by_steps(run: Path, prefix: str) -> list[Path]:
    return sorted((run / "eval").glob(f"{prefix}_*"), key=lambda p: int(p.name.split("_")[1]))


def collect(run: Path) -> dict:
    """``report.json``'s content from the stage outputs under ``run``."""
    ae = _json(run / "autoencoder/eval.json")
    teacher = _evaluated(run / "eval/teacher_50")
    teacher |= versus(teacher, teacher)  # 1.0 each: the row the others are measured against
    ae_paths = {"reconstructions": str(run / "autoencoder/reconstructions.png"),
                "latents_decoded": str(run / "latents_decoded.png")}
    report = {
        "autoencoder": {"psnr": ae["psnr_held_out"], "held_out": ae["held_out"], "steps": ae["steps"], **ae_paths},
        "teacher": teacher,
        # the baseline the student must beat: the same teacher with as few Euler steps (two evaluations each)
        "teacher_few_steps": [_evaluated(f, teacher) for f in _by_steps(run, "teacher") if f.name != "teacher_50"],
        "students": [_evaluated(f, teacher) for f in _by_steps(run, "student")],
        "stages": read_stages(run / "stages.tsv"),
    }
    if all((run / "eval" / name / "summary.json").is_file() for name in LORA_EVALS.values()):
        report["lora"] = lora_stage(run, teacher)
    if (run / "sweep/sweep.png").is_file():
        report["sweep"] = str(run / "sweep/sweep.png")
        report["teacher_unguided"] = unguided_teacher(run / "sweep/sweep.json", teacher["steps"])
    report["goals"] = goals(report)
    edits = run / "edits/edit_report.json"
    if edits.is_file():
        report["edits"] = json.loads(edits.read_text()) | {"sheet": str(run / "edits/edit_sheet.png")}
        report["goals"] += [{**g, "goal": f"edit {g['run']}: {g['goal']}"} for g in report["edits"]["goals"]]
    inverse = run / "inverse/edit_report.json"
    if inverse.is_file():
        found = json.loads(inverse.read_text())
        report["inverse"] = {"count": found["count"], "guidance": found["guidance"], "tasks": found["inverse"],
                             "sheets": {task: str(run / f"inverse/sheet_{task}.png") for task in found["inverse"]}}
        report["goals"] += [{**g, "goal": f"{g['run']}: {g['goal']}"} for g in found["inverse_goals"]]
    return report


def unguided_teacher(sweep_json: Path, steps: int) -> dict:
    """The sweep's teacher cell at guidance 1 and the reference's steps: the model's own distribution
    (guidance sharpens it on purpose), where its one-to-many spread is compared with the data's."""
    for row in json.loads(sweep_json.read_text())["cells"]:
        if row["label"] == "teacher" and row["guidance"] == 1 and row["steps"] == steps:
            return {"guidance": 1.0, **{k.removeprefix("one_to_many_"): v for k, v in row.items() if k.startswith("one_to_many_")},
                    "adherence_all": row.get("adherence_all")}
    return {}


def diversity_section(report: dict) -> list[str]:
    """Coverage / recall / Vendi (pixel space) and the one-to-many scores of each model, and the sweep's curves."""
    t = report["teacher"]
    models = [("teacher", t), *[(f"student, {s['steps']} step(s)", s) for s in report["students"]]]
    if "coverage" not in t and "tv" not in t:
        return []
    k = t.get("one_to_many_k", "K")
    cell = lambda m, key: f"{m[key]:.3f}" if key in m else "–"  # noqa: E731
    lines = ["", "Diversity, against the evaluation renders in 16×16-pixel space (k-NN precision/recall k = 3, "
             "density/coverage k = 5; Vendi with the cosine kernel), and one-to-many: the attribute an "
             f"under-specified prompt leaves out, over {k} seeds per prompt, against the training grammar "
             "(total variation; a perfect sampler's TV at this K in brackets; entropy ratio 1 = as varied as the data).", "",
             "| model | coverage | recall | precision | density | Vendi | unnamed-attribute TV (perfect) | TV excess | entropy ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in models:
        tv = f"{m['tv']:.3f} ({m['tv_perfect']:.3f})" if "tv" in m else "–"
        lines.append(f"| {name} | {cell(m, 'coverage')} | {cell(m, 'recall')} | {cell(m, 'precision')} | {cell(m, 'density')} | "
                     f"{cell(m, 'vendi')} | {tv} | {cell(m, 'tv_excess')} | {cell(m, 'entropy_ratio')} |")
    unguided = report.get("teacher_unguided") or {}
    if "tv_excess" in unguided:
        lines += ["", f"Guidance {t['guidance']:g} sharpens the teacher on purpose; without it (g = 1, the sweep's cell) its "
                  f"unnamed-attribute TV excess is {unguided['tv_excess']:.3f} and its entropy ratio {unguided['entropy_ratio']:.3f}: "
                  "the goal line `teacher_one_to_many_tv_excess` reads that cell. With one image per prompt and captions that "
                  "name every attribute, the set metrics say little here (each generated image has its reference twin); "
                  "within-prompt diversity is what one-to-many measures."]
    return lines


def lora_stage(run: Path, teacher: dict) -> dict:
    """The LoRA stage's evaluations (``LORA_EVALS``), its adapter file's size and the run's LoRA settings."""
    out = {key: _evaluated(run / "eval" / name) for key, name in LORA_EVALS.items()}
    config = run / "lora_concept/config.yaml"
    ran = yaml.safe_load(config.read_text()) if config.is_file() else {}
    out["settings"] = {"rank": ran.get("lora", {}).get("rank"), "targets": ran.get("lora", {}).get("targets"),
                       "steps": ran.get("steps")}
    out["old_vs_teacher"] = out["old"]["adherence_all"] - teacher["adherence_all"]
    weights = run / "lora_concept/lora/pytorch_lora_weights.safetensors"
    out["adapter_bytes"] = weights.stat().st_size if weights.is_file() else None
    return out


def lora_section(lora: dict, teacher: dict, rel) -> list[str]:
    """The LoRA stage: the new colour before and after, and the old prompts with the adapters."""
    b, a, old = lora["before"], lora["after"], lora["old"]
    size = f" The adapter file holds {lora['adapter_bytes'] / 1024:.0f} KiB." if lora["adapter_bytes"] else ""
    lines = ["## LoRA: a colour the teacher never saw", "",
             f"Rank-{lora['settings']['rank']} adapters on `{lora['settings']['targets']}` (configs/dit_lora_demo.yaml, "
             f"{lora['settings']['steps']} steps) on the frozen teacher, trained on scenes with half of the objects in "
             f"\"mint\".{size} Adherence at {a['steps']} steps, guidance {a['guidance']}:", "",
             "| prompts | model | adherence (all) | colour | autoencoder ceiling |", "|---|---|---:|---:|---:|"]
    rows = [(f"{b['prompts']} mint", "teacher (before)", b), (f"{a['prompts']} mint", "teacher + LoRA", a),
            (f"{teacher['prompts']} old", "teacher", teacher), (f"{old['prompts']} old", "teacher + LoRA", old)]
    for prompts, model, m in rows:
        ceiling = (m.get("adherence_vae_ceiling") or {}).get("all")
        lines.append(f"| {prompts} | {model} | {m['adherence_all']:.3f} | {m['adherence']['colour']:.3f} | "
                     + (f"{ceiling:.3f} |" if ceiling is not None else "– |"))
    return lines + ["", f"Mint prompts before: ![before]({rel(b['grid'])})", "",
                    f"Mint prompts after: ![after]({rel(a['grid'])})", ""]


EDIT_COLUMNS = (("inpaint", "new_object", "inpaint: new object"), ("inpaint", "unmasked_psnr", "inpaint: unmasked PSNR"),
                ("img2img", "background", "img2img: background"), ("img2img", "objects_kept", "img2img: objects kept"),
                ("outpaint", "scene", "outpaint: caption"), ("outpaint", "psnr", "outpaint: PSNR"),
                ("superres", "scene", "2× SR: caption"), ("superres", "psnr", "2× SR: PSNR"))


def edit_section(edits: dict, rel) -> list[str]:
    """The editing evaluation's headline table (``edits/edit_report.md`` has the rest)."""
    columns = [c for c in EDIT_COLUMNS if c[0] in edits["tasks"]]
    lines = ["## Editing without retraining", "",
             f"{edits['count']} synthetic cases per task; details in `edits/edit_report.md`.", "",
             "| model | " + " | ".join(title for _, _, title in columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, run in edits["runs"].items():
        lines.append(f"| {label} | " + " | ".join(f"{run[task][key]:.3f}" for task, key, _ in columns) + " |")
    return lines + ["", f"Input | mask | target | results: ![edits]({rel(edits['sheet'])})", ""]


INVERSE_COLUMNS = (("objects_kept", "objects kept"), ("colour_right", "colour right"), ("psnr", "PSNR (dB)"),
                   ("consistency", "‖A(x̂) − y‖"))


def inverse_section(inverse: dict, rel) -> list[str]:
    """Issue 28's comparison: every method on the same colourisation / 4× SR cases."""
    lines = ["## Image-conditioned models and inverse problems", "",
             f"{inverse['count']} synthetic cases per task, guidance {inverse['guidance']}; `inverse/edit_report.md` has the "
             "rest. `source` is the degraded input as is (bicubic for SR); `l2` and `pix2pix` are pixel-space U-Nets trained "
             "on the pairs; `sdedit` and `solver` are the teacher without retraining (the solver keeps A(x̂) = y); "
             "`conditioned` is the teacher widened to read the source and fine-tuned on the pairs; `vae` is the target's "
             "round trip, the ceiling of every latent method. ‖A(x̂) − y‖ is the RMS consistency error in [0, 1] pixels.", ""]
    for task, result in inverse["tasks"].items():
        lines += [f"**{task}** ({result['degradation']}):", "",
                  "| method | " + " | ".join(title for _, title in INVERSE_COLUMNS) + " | s / case |",
                  "|---|" + "---:|" * (len(INVERSE_COLUMNS) + 1)]
        for label, row in result["methods"].items():
            lines.append(f"| {label} | " + " | ".join(f"{row[key]:.3f}" if key != "consistency" else f"{row[key]:.4f}"
                                                      for key, _ in INVERSE_COLUMNS) + f" | {row['seconds_per_case']:.3f} |")
        lines += ["", f"Source | each method | target: ![{task}]({rel(inverse['sheets'][task])})", ""]
    return lines


def read_stages(path: Path) -> list[dict]:
    """``launch/demo.sh``'s ``name<TAB>start seconds`` lines."""
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if "\t" in line]
    return [{"stage": name, "start_s": int(start)} for name, start in rows]


def goals(report: dict) -> list[dict]:
    by_steps = {s["steps"]: s for s in report["students"]}
    few = {t["steps"]: t for t in report.get("teacher_few_steps", [])}
    checks = [("autoencoder_psnr", report["autoencoder"]["psnr"]),
              ("teacher_adherence_all", report["teacher"]["adherence_all"])]
    ceiling = (report["teacher"].get("adherence_vae_ceiling") or {}).get("all")
    if ceiling is not None:  # PSNR can pass while the analyser's ceiling misses (GAN draws: 0.80-0.89 at ~31 dB)
        checks.append(("autoencoder_adherence_ceiling", ceiling))
    split = report["teacher"].get("adherence_by_objects", {})
    checks += [(f"teacher_adherence_{n}", split[key]) for key, n in (("1", "1_object"), ("2", "2_objects")) if key in split]
    if 4 in by_steps:
        checks += [("student_4_vs_teacher", by_steps[4]["adherence_vs_teacher"]),
                   ("student_4_sampler_speedup", by_steps[4]["sampler_speedup_vs_teacher"])]
    if 1 in by_steps:
        checks.append(("student_1_vs_teacher", by_steps[1]["adherence_vs_teacher"]))
    if "lora" in report:
        checks += [("lora_concept_adherence", report["lora"]["after"]["adherence_all"]),
                   ("lora_old_prompts_vs_teacher", report["lora"]["old_vs_teacher"])]
    for steps, student in sorted(by_steps.items()):  # diversity at equal guidance (the issue: >= 0.95x the teacher's)
        for key in ("coverage", "recall"):
            if key in student and report["teacher"].get(key):
                checks.append((f"student_{steps}_{key}_vs_teacher", student[key] / report["teacher"][key]))
    unguided = report.get("teacher_unguided") or {}
    if "tv_excess" in unguided or "tv_excess" in report["teacher"]:  # the teacher's own distribution: guidance 1 when swept
        checks.append(("teacher_one_to_many_tv_excess", unguided.get("tv_excess", report["teacher"].get("tv_excess"))))
    for steps in sorted(set(by_steps) & set(few)):  # "clearly beats the teacher with as few Euler steps"
        checks.append((f"student_{steps}_beats_teacher_{steps}", by_steps[steps]["adherence_all"] - few[steps]["adherence_all"]))
    return [{"goal": name, "value": value, "target": _target(name),
             "met": value <= _target(name) if name in AT_MOST else value >= _target(name)} for name, value in checks]


def _target(goal: str) -> float:
    if "_beats_" in goal:
        return BEAT_MARGIN
    return GOALS[re.sub(r"^student_\d+_(coverage|recall)_vs_teacher$", r"student_\1_vs_teacher", goal)]


def plot_curves(run: Path) -> dict[str, str]:
    """Loss-curve PNGs of the autoencoder, teacher and student (whichever logged metrics)."""
    out = {}
    for name, key in (("autoencoder", "l1_rec"), ("teacher", "loss"), ("student", "loss")):
        metrics = run / name / "metrics.jsonl"
        if metrics.is_file():
            out[name] = str(plot_loss_curves({name: metrics}, run / f"loss_{name}.png", key))
    return out


SKIP_COUNTERS = (("skipped_steps", "non-finite micro-batches dropped"), ("overflow_steps", "fp16 overflow steps skipped"),
                 ("disc_overflow_steps", "discriminator overflow steps skipped"))


def training_counters(run: Path) -> dict[str, dict]:
    """Each training stage's steps and skipped work, from the last line of its ``metrics.jsonl``
    (the counters it logs: ``SKIP_COUNTERS``)."""
    out = {}
    for name in ("autoencoder", "teacher", "student", "lora_concept", "cond", "pix2pix", "pix2pix_l2"):
        path = run / name / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines:
            last = json.loads(lines[-1])
            out[name] = {"steps": last["step"], **{key: last[key] for key, _ in SKIP_COUNTERS if key in last}}
    return out


def training_line(counters: dict[str, dict]) -> str:
    """One line: ``teacher 2000 steps (0 non-finite micro-batches dropped, 0 fp16 overflow steps skipped); …``."""
    parts = []
    for name, c in counters.items():
        skipped = ", ".join(f"{c[key]} {what}" for key, what in SKIP_COUNTERS if key in c)
        parts.append(f"{name} {c['steps']} steps" + (f" ({skipped})" if skipped else ""))
    return "Trained: " + "; ".join(parts) + "."


def _number(value: float) -> str:
    """Three decimals, or two significant digits below 0.01 (consistency errors)."""
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def _row(name: str, m: dict, evaluations: int) -> str:
    return (f"| {name} | {m['steps']} | {evaluations} | {m['adherence_all']:.3f} | {m['adherence_vs_teacher']:.2f} | "
            f"{m['seconds_per_image']:.4f} | {m['speedup_vs_teacher']:.1f} | {m['sampler_seconds_per_image']:.4f} | "
            f"{m['sampler_speedup_vs_teacher']:.1f} |")


def markdown(report: dict, run: Path) -> str:
    ae, t = report["autoencoder"], report["teacher"]
    rel = lambda p: Path(p).relative_to(run).as_posix()  # noqa: E731 - paths relative to report.md
    lines = ["# Demo report", "",
             f"Autoencoder held-out PSNR: **{ae['psnr']:.2f} dB** ({ae['held_out']} images, {ae['steps']} steps).", "",
             f"Adherence on {t['prompts']} unseen synthetic prompts (all attributes correct), guidance {t['guidance']}:", "",
             "s / image is end to end (text encoders + sampler + VAE decode); the sampler columns time the "
             "sampling loop alone. Evaluations are DiT forward passes per image (the guided teacher makes two a "
             "step); each student row is followed by the teacher with as few Euler steps.", "",
             "| model | steps | evaluations | adherence (all) | × teacher | s / image | speed-up | sampler s / image | sampler speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|", _row("teacher (Euler + CFG)", t, 2 * t["steps"])]
    few = {row["steps"]: row for row in report.get("teacher_few_steps", [])}
    for s in report["students"]:
        lines.append(_row("student (consistency)", s, s["steps"]))
        if s["steps"] in few:
            lines.append(_row("teacher (Euler + CFG)", few[s["steps"]], 2 * s["steps"]))
    lines += ["", "| attribute | " + " | ".join(["teacher"] + [f"student {s['steps']}" for s in report["students"]]) + " |",
              "|---|" + "---:|" * (1 + len(report["students"]))]
    for attr in t["adherence"]:
        lines.append(f"| {attr} | " + " | ".join(f"{m['adherence'][attr]:.3f}" for m in [t, *report["students"]]) + " |")
    for count in t["adherence_by_objects"]:
        lines.append(f"| all correct, {count}-object prompts | "
                     + " | ".join(f"{m['adherence_by_objects'].get(count, float('nan')):.3f}" for m in [t, *report["students"]]) + " |")
    lines += diversity_section(report)
    if t["adherence_vae_ceiling"]:
        ceiling = t["adherence_vae_ceiling"]
        lines += ["", "Autoencoder ceiling: the analyser reads the evaluation renders after the VAE's round trip as "
                  + ", ".join(f"{v:.3f} ({'all' if k == 'all' else f'{k}-object'})" for k, v in ceiling.items())
                  + ": no model in this latent space can score above it."]
    lines += ["", "## Goals", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {g['goal']} | {_number(g['value'])} | {g['target']:.3g} | {'yes' if g['met'] else '**no**'} |" for g in report["goals"]]
    lines += ["", f"`student_N_beats_teacher_N`: student minus teacher adherence at N steps (target: {BEAT_MARGIN} points)."]
    if report.get("sweep"):
        lines += ["", "## Guidance × steps", "", f"Adherence against coverage and recall across guidance "
                  f"(`sweep/sweep.md` has the numbers): ![sweep]({rel(report['sweep'])})"]
    lines += ["", "## Samples", "", f"Teacher, {t['steps']} steps: ![teacher]({rel(t['grid'])})", ""]
    lines += [f"Student, {s['steps']} step(s): ![student {s['steps']}]({rel(s['grid'])})\n" for s in report["students"]]
    if "lora" in report:
        lines += lora_section(report["lora"], t, rel)
    if "edits" in report:
        lines += edit_section(report["edits"], rel)
    if "inverse" in report:
        lines += inverse_section(report["inverse"], rel)
    lines += ["## Training curves", ""] + [f"![{name}]({rel(path)})" for name, path in report["loss_curves"].items()]
    if report.get("validation_curves"):
        lines += ["", "Validation loss on held-out latents (images, for the autoencoder) never trained on, at fixed t "
                  "and noise (`validation` in each config):", ""]
        lines += [f"![{name} validation]({rel(path)})" for name, path in report["validation_curves"].items()]
    if report.get("training"):
        lines += ["", training_line(report["training"])]
    lines += ["", f"Autoencoder reconstructions (each tile: original | reconstruction): ![ae]({rel(ae['reconstructions'])})"]
    if Path(ae["latents_decoded"]).exists():
        lines += ["", f"Stored training latents decoded back (original | decoded): ![latents]({rel(ae['latents_decoded'])})"]
    if report["stages"]:
        lines += ["", "## Stage start times (s)", "", " · ".join(f"{s['stage']} {s['start_s']}" for s in report["stages"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo's output folder")
    args = p.parse_args(argv)
    try:
        report = collect(args.run)
    except FileNotFoundError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    report["loss_curves"] = plot_curves(args.run)
    report["validation_curves"] = {name: str(args.run / name / "val_loss.png") for name in ("autoencoder", "teacher", "student")
                                   if (args.run / name / "val_loss.png").is_file()}
    report["training"] = training_counters(args.run)
    (args.run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.run / "report.md").write_text(markdown(report, args.run))
    print(f"{PROG}: wrote {args.run / 'report.md'} and report.json")
    for g in report["goals"]:
        print(f"  {g['goal']}: {g['value']:.3f} (target {g['target']}) {'met' if g['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
