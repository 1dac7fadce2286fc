"""Run checkpoints: atomic folders, the resume rule, newest-complete lookup, retention, and the
small save/load helpers the training core uses (DESIGN.md §6).

``runs/NAME/checkpoints/step-NNNNNN/`` appears only when complete: it is written as
``.tmp-step-NNNNNN`` by every rank, then renamed by the main process. Loading takes the newest
complete folder; retention deletes the oldest ones but never the newest complete checkpoint.
Inside: ``accelerate/`` (weights as safetensors, optimizer states, every rank's RNG states), LR
schedules through ``torch.save`` read back with ``torch.load(..., weights_only=True)``, counters
and the data position as JSON (``pipeline.training.core``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.data.shards import write_json_atomic

@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 2
    resume: str = "auto"  # "auto" (newest complete checkpoint, if any), "never", or a checkpoint folder

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("every and keep must be >= 1")


_STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAIN_STATE = "train_state.json"  # written last inside a checkpoint


class Checkpoints:
    """The ``checkpoints/`` folder of one run."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep})")
        self.root, self.keep = Path(root), keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resume_folder(self, choice: str) -> Path | None:
        """The one resume rule: ``"auto"`` the newest complete checkpoint (None if there is none),
        ``"never"`` None, anything else a checkpoint folder."""
        if choice == "never":
            return None
        return self.latest() if choice == "auto" else Path(choice)

    def save(
        self,
        step: int,
        write: Callable[[Path], None],
        is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> Path:
        """Run ``write(tmp_folder)`` on every rank, then publish the folder atomically.

        ``barrier`` synchronises the ranks (e.g. ``accelerator.wait_for_everyone``).
        """
        tmp, final = self.root / f".tmp-step-{step:06d}", self.path(step)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        if is_main:
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            tmp.rename(final)
            self.prune()
        barrier()
        return final

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints and stale temporaries."""
        removed = [p for _, p in self.complete()[: -self.keep]]
        removed += [p for p in self.root.glob(".tmp-step-*") if p.is_dir()]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed


# ---------------------------------------------------------------------------- file helpers


def save_tensors(obj: Any, path: Path) -> None:
    """Optimizer / scheduler / RNG state (tensors, numbers, lists, dicts) via ``torch.save``."""
    torch.save(obj, path)


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_train_state(folder: Path, state: dict) -> None:
    write_json_atomic(Path(folder) / TRAIN_STATE, state)


def read_train_state(folder: Path) -> dict:
    return json.loads((Path(folder) / TRAIN_STATE).read_text())
