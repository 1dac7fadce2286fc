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
