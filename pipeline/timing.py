"""Clocks that tell the truth on a GPU (DESIGN.md §8: times are taken after a device synchronisation)."""

from __future__ import annotations

import time

import torch


def clock() -> float:
    """``time.perf_counter()`` once the GPU has finished its queued work. CUDA kernels run
    asynchronously: a clock read without a synchronisation times their launches, not the work
    (DESIGN.md §8). Every time this project reports goes through here."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
