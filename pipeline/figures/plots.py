"""Pictures people would rather look at than numbers: loss curves and loss by timestep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: drawing needs no torch (the demo report starts without it)
    import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_loss_by_t(sums: torch.Tensor, counts: torch.Tensor, path: Path) -> Path:
    """Mean training loss in equal bins of t (t = 0 data, t = 1 noise)."""
    plt = _pyplot()
    buckets = len(sums)
    means = (sums / counts.clamp(min=1)).tolist()
    centres = [(i + 0.5) / buckets for i in range(buckets)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(centres, means, width=0.9 / buckets, color="#4c72b0")
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="mean velocity MSE", title="training loss by timestep", xlim=(0, 1))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(runs: dict[str, Path], path: Path, key: str = "loss") -> Path:
    """``key`` against step from each run's ``metrics.jsonl`` (log scale), one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, metrics in runs.items():
        rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
    ax.set(xlabel="step", ylabel=key, yscale="log", title=f"{key} during training")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_validation_loss(metrics: Path, path: Path, key: str = "val_loss") -> Path | None:
    """The validation loss against step from a run's ``metrics.jsonl``: a curve per time bin
    (``KEY/t=…``) and their mean (``KEY``, dashed), log scale; None (nothing written) when the run
    logged none. A step logged twice (a resumed run logs again the steps after its checkpoint)
    counts once, with its last line."""
    rows = {}
    for line in Path(metrics).read_text().splitlines() if Path(metrics).exists() else []:
        row = json.loads(line) if line.strip() else {}
        if key in row:
            rows[row["step"]] = row
    if not rows:
        return None
    plt = _pyplot()
    steps = sorted(rows)
    bins = sorted({k for row in rows.values() for k in row if k.startswith(f"{key}/")}, key=_bin_order)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = plt.get_cmap("viridis")
    for n, name in enumerate(bins):
        xs = [s for s in steps if name in rows[s]]
        ax.plot(xs, [rows[s][name] for s in xs], marker="o", ms=3, color=colours(n / max(1, len(bins) - 1)), label=name.split("/", 1)[1])
    ax.plot(steps, [rows[s][key] for s in steps], color="black", ls="--", marker="o", ms=3, label="mean" if bins else key)
    ax.set(xlabel="step", ylabel=key, yscale="log", title="validation loss (held-out samples, fixed t and noise)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _bin_order(name: str) -> tuple[float, str]:
    """``val_loss/t=0.3`` sorts by its time (a label that is not one sorts after, by name)."""
    label = name.split("=", 1)[-1]
    try:
        return float(label), name
    except ValueError:
        return float("inf"), name


def plot_curves(series: dict[str, list[dict]], pairs: list[tuple[str, str]], path: Path, along: str = "guidance",
                title: str = "") -> Path:
    """One panel per ``(x_key, y_key)`` pair, one line per series through its rows' points in the order
    of ``along`` (each point labelled with its ``along`` value): a sweep's trade-off curves."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    markers = "os^Dv<>p"
    for ax, (x_key, y_key) in zip(axes[0], pairs):
        for n, (label, rows) in enumerate(series.items()):
            rows = sorted((r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None), key=lambda r: r[along])
            if not rows:
                continue
            xs, ys = [r[x_key] for r in rows], [r[y_key] for r in rows]
            ax.plot(xs, ys, marker=markers[n % len(markers)], label=label)
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r[along]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=x_key, ylabel=y_key, title=f"{y_key} vs {x_key}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
