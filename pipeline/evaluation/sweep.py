"""Guidance × steps sweeps: the fidelity–diversity curves of ``pipeline.evaluate --guidance G [G …]``.

Each (guidance, steps) cell is one ``pipeline.evaluate`` output folder; this module gathers their
summaries into ``sweep.json``, ``sweep.md`` and ``sweep.png`` in one folder: adherence against
coverage and recall, FID against CLIP score (the pairs the cells measured), one curve per model
and step count, guidance along each curve. A folder that several models write to (the teacher's
sweep, then a student's) keeps them all: a run replaces its own model's cells and keeps the
others', so teacher and students come side by side.

Guidance is ``g`` of ``v̂ = v_null + g·(v_cond − v_null)`` (``pipeline.diffusion.guidance``),
which is ``1 + w`` in the ``(1 + w)·v_cond − w·v_null`` convention.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.figures.plots import plot_curves

DIVERSITY_KEYS = ("precision", "recall", "density", "coverage", "vendi")
# (x, y) plotted where measured; one-to-many's entropy ratio is the within-prompt diversity that
# set metrics miss when every prompt is drawn once (1 = as varied as the data, 0 = collapsed)
PAIRS = (("coverage", "adherence_all"), ("recall", "adherence_all"), ("one_to_many_entropy_ratio", "adherence_all"),
         ("one_to_many_tv_excess", "adherence_all"), ("clip_score", "fid"))
ONE_TO_MANY_KEYS = ("one_to_many_tv", "one_to_many_tv_excess", "one_to_many_entropy_ratio")
FIDELITY_KEYS = ("adherence_all", "clip_score", "fid", "vendi")  # each against guidance when no pair was measured
PREFERRED_FEATURES = ("dinov2", "inception", "pixels")  # the curves' diversity: DINOv2's when measured (Stein et al. 2023)


def model_label(model: Path, info: dict | None) -> str:
    """``teacher`` / ``student`` from the folder's recorded kind, and the run's name."""
    folder = Path(model).resolve()
    name = folder.parent.name if folder.name == "model" else folder.name
    role = "student" if (info or {}).get("sampler") == "consistency" else "teacher"
    return name if name == role else f"{role} {name}"


def outside_range(info: dict | None, guidance: float) -> list[float] | None:
    """The student's exported ``guidance_range`` when ``guidance`` falls outside it, else None."""
    bounds = (info or {}).get("guidance_range")
    if not bounds or bounds[0] <= guidance <= bounds[1]:
        return None
    return list(bounds)


def headline_diversity(summary: dict) -> dict:
    """The diversity metrics of the preferred feature space in ``summary`` (with ``features`` naming it)."""
    blocks = summary.get("diversity", {})
    for name in PREFERRED_FEATURES:
        if name in blocks:
            return {"features": name, **{k: blocks[name][k] for k in DIVERSITY_KEYS if k in blocks[name]}}
    return {}


def cell(summary: dict, folder: Path, label: str) -> dict:
    """One sweep row from a ``pipeline.evaluate`` summary."""
    row = {"label": label, "model": str(Path(summary["model"]).resolve()), "steps": summary["steps"], "guidance": summary["guidance"],
           "output": str(folder), "count": summary["count"], "seconds_per_image": summary["seconds_per_image"]}
    row |= {k: summary[k] for k in ("adherence_all", "clip_score", "fid", "kid_mean") if k in summary}
    row |= headline_diversity(summary)
    row |= {k: summary[k] for k in ONE_TO_MANY_KEYS if k in summary}
    if summary.get("outside_guidance_range"):
        row["outside_guidance_range"] = summary["outside_guidance_range"]
    return row


def _series(cells: list[dict]) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for row in sorted(cells, key=lambda r: (r["label"], r["steps"], r["guidance"])):
        series.setdefault(f"{row['label']}, {row['steps']} step{'s' if row['steps'] != 1 else ''}", []).append(row)
    return series


def markdown(cells: list[dict]) -> str:
    features = sorted({r["features"] for r in cells if "features" in r})
    spaces = (f"Diversity in {' / '.join(features)} feature space (precision/recall k = 3, density/coverage k = 5)." if features
              else "No diversity metrics: `pipeline.evaluate --guidance … --inception FILE | --dinov2 FOLDER` measures them.")
    lines = ["# Guidance × steps sweep", "",
             f"Guidance g: `v_null + g·(v_cond − v_null)`, i.e. 1 + w in `(1+w)·v_cond − w·v_null`; g = 1 is no guidance. {spaces}", "",
             "One-to-many (`--one-to-many K`): the attribute an under-specified prompt leaves out, over K seeds, "
             "against the training grammar: TV beyond a perfect sampler's, and the entropy ratio.", "",
             "| model | steps | guidance | adherence | CLIP score | FID | precision | recall | density | coverage | Vendi "
             "| unnamed TV excess | entropy ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("adherence_all", "clip_score", "fid", "precision", "recall", "density", "coverage", "vendi",
            "one_to_many_tv_excess", "one_to_many_entropy_ratio")
    for rows in _series(cells).values():
        for r in rows:
            values = " | ".join(f"{r[k]:.4f}" if k in r else "–" for k in keys)
            flag = " (outside the trained range)" if r.get("outside_guidance_range") else ""
            lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g}{flag} | {values} |")
    lines += ["", "![sweep](sweep.png)"]
    return "\n".join(lines) + "\n"


def plot_pairs(cells: list[dict]) -> list[tuple[str, str]]:
    """The PAIRS that some cell measured both sides of; else each measured metric against guidance."""
    pairs = [(x, y) for x, y in PAIRS if any(x in r and y in r for r in cells)]
    return pairs or [("guidance", k) for k in FIDELITY_KEYS if any(k in r for r in cells)] or [("guidance", "seconds_per_image")]


def write_sweep(folder: Path, cells: list[dict]) -> dict:
    """Merge ``cells`` into ``folder/sweep.json`` (replacing earlier cells of the same models) and
    write ``sweep.md`` and ``sweep.png`` for everything it then holds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.json"
    models = {r["model"] for r in cells}
    kept = [r for r in json.loads(path.read_text())["cells"] if r["model"] not in models] if path.is_file() else []
    sweep = {"cells": kept + cells}
    path.write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")
    (folder / "sweep.md").write_text(markdown(sweep["cells"]), encoding="utf-8")
    plot_curves(_series(sweep["cells"]), plot_pairs(sweep["cells"]), folder / "sweep.png", along="guidance",
                title="point labels: guidance g")
    return sweep
