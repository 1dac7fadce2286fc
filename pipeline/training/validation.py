"""Validation loss during training: held-out samples at fixed times with fixed noise, every N
optimizer steps, computed once over all ranks and logged by the main process.

References: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (SD3): a validation loss on held-out data, which tracks sample quality; SimpleTuner's
evaluation loss: held-out samples, the loss at a fixed set of timesteps, one curve per timestep.

What is held out (``validation.latents``):

- null (the default): the first ``count`` samples of the last latent shard (of the shard before it
  too, when the last holds fewer), which the training stream then never emits
  (``pipeline.data.stream.held_out_split``). The autoencoder holds out the first samples of the last
  image shard, and ``data_tools.encode`` keeps shard order and keys, so in the demo the DiT's
  held-out latents are images the VAE never trained on either;
- a latent folder (or URL): a separate validation set, its first ``count`` samples; the training
  stream is left as it was (a run can switch validation on or off and resume exactly).

How it is computed: a *unit* is one held-out sample at one time bin. All units, in one fixed order
(samples grouped by latent shape, since a batch holds one; bin by bin), are cut into batches of
``batch_size``; batch ``k`` is run by rank ``k mod world``. Each rank sums its per-unit values per
bin (float64), the sums and counts are all-reduced once, and the main process logs the means: the
same batches whatever the world size, so the value does not depend on it beyond the order of an
fp32 sum. Under ZeRO-3 each forward gathers parameters with every rank, so every rank runs as many
forwards: a rank with fewer batches repeats its first one and does not count it.

The noise of sample ``i`` comes from numpy's ``Generator([seed, i])``; nothing is drawn from torch's
generators, and the work runs inside ``torch.random.fork_rng`` (a network that draws, such as LoRA
dropout, is in eval mode anyway), so validation leaves training's RNG streams, and so the training
trajectory and exact resume, as they were.

Logged keys (``metrics.jsonl`` and the tracker): ``val_loss`` (the mean over every unit) and
``val_loss/t=T`` per bin; at the end the main process plots them (``RUN/val_loss.png``,
``pipeline.figures.plots.plot_validation_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.config.source import Source

Unit = tuple[int, int]  # (held-out sample, time bin)


@dataclass(kw_only=True)
class ValidationConfig:
    """The validation loss of a DiT stage (teacher: rectified flow; student: consistency loss).
    ``every``: optimizer steps between two (and at the last step); 0 switches it off and leaves the
    run exactly as without this section. ``bins``: a number of equal bins of t (their centres:
    5 -> 0.1, 0.3, …, 0.9) or the times themselves. ``batch_size``: units (sample × bin) per
    forward, on each rank. ``weights``: the trained network (``model``) or its EMA (``ema``, the
    one exported)."""

    every: int = 0
    count: int = 64  # held-out samples
    bins: int | list[float] = 5
    seed: int = 0  # of the fixed noise
    batch_size: int = 32
    latents: Source | None = None  # None: held out from data.latents; else a separate latent folder / URL
    weights: Literal["model", "ema"] = "model"

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0 = off; got {self.every})")
        if self.count < 1 or self.batch_size < 1:
            raise ValueError(f"count and batch_size must be >= 1 (got {self.count}, {self.batch_size})")
        if isinstance(self.bins, int) and self.bins < 1:
            raise ValueError(f"bins must be >= 1 or a list of times in [0, 1] (got {self.bins})")
        if isinstance(self.bins, list) and (not self.bins or len(set(self.bins)) < len(self.bins) or not all(0 <= t <= 1 for t in self.bins)):
            raise ValueError(f"bins must be distinct times in [0, 1] (got {self.bins})")

    @property
    def times(self) -> list[float]:
        """The fixed times, one per bin."""
        if isinstance(self.bins, int):
            return [round((i + 0.5) / self.bins, 6) for i in range(self.bins)]
        return list(self.bins)


def due(every: int, step: int, last: int) -> bool:
    """Whether a validation falls on optimizer step ``step``: every ``every`` steps and at the last."""
    return every > 0 and (step % every == 0 or step == last)


def fixed_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Sample ``index``'s noise, float32 ``shape``: the same on any rank, run and resume."""
    return torch.from_numpy(np.random.default_rng([seed, index]).standard_normal(tuple(shape), dtype=np.float32))


def unit_batches(shapes: list[tuple[int, ...]], bins: int, batch_size: int) -> list[list[Unit]]:
    """Every (sample, bin) unit in one fixed order: samples grouped by shape (a batch holds one),
    bin by bin, cut into batches of ``batch_size``."""
    batches = []
    for shape in dict.fromkeys(shapes):  # first-seen order
        members = [i for i, s in enumerate(shapes) if s == shape]
        units = [(i, j) for j in range(bins) for i in members]
        batches += [units[k : k + batch_size] for k in range(0, len(units), batch_size)]
    return batches


def rank_share(batches: list[list[Unit]], rank: int, world: int, even: bool) -> list[tuple[list[Unit], bool]]:
    """``(batch, counted)`` this rank runs: batches ``rank, rank + world, …``; with ``even`` (ZeRO-3)
    as many as the busiest rank, a short rank repeating its first (or the first) batch uncounted."""
    mine = [(batch, True) for batch in batches[rank::world]]
    if even and batches:
        spare = mine[0][0] if mine else batches[0]
        mine += [(spare, False)] * (-(-len(batches) // world) - len(mine))
    return mine


class Validation:
    """A stage's held-out set, this rank's share of it, and the logged metrics.

    ``samples``: the held-out samples (anything the stage's unit function reads); ``shapes``: each
    one's shape (batches hold one); ``names``: the quantities the unit function returns per unit,
    the first one the loss; ``labels``: one per bin (``t=0.1``…), none for a stage without bins."""

    def __init__(self, every: int, samples: list[Any], shapes: list[tuple[int, ...]], names: tuple[str, ...], labels: list[str],
                 batch_size: int, rank: int, world: int, even: bool) -> None:
        self.every, self.names, self.labels, self.size = every, names, labels, len(samples)
        self.bins = max(1, len(labels))
        self.share = rank_share(unit_batches(shapes, self.bins, batch_size), rank, world, even)
        needed = {i for units, _ in self.share for i, _ in units}
        self.samples = {i: samples[i] for i in sorted(needed)}  # only what this rank reads

    def due(self, step: int, last: int) -> bool:
        return due(self.every, step, last)

    def run(self, values: Callable[[list[Unit]], torch.Tensor], device: torch.device) -> torch.Tensor:
        """This rank's per-bin sums of each quantity and the unit counts, (K + 1, bins) float64 (one
        all-reduce); ``values(units)`` -> (B, K). No gradient, and training's RNG streams untouched."""
        totals = torch.zeros(len(self.names) + 1, self.bins, dtype=torch.float64, device=device)
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for units, counted in self.share:
                out = values(units)  # (B, K)
                if counted:
                    bins = torch.tensor([j for _, j in units], device=device)
                    totals[:-1].index_add_(1, bins, out.double().T)
                    totals[-1].index_add_(0, bins, torch.ones(len(units), dtype=torch.float64, device=device))
        return totals

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        """The logged line from the all-reduced totals: each quantity's mean, and per bin."""
        totals = totals.cpu()
        sums, counts = totals[:-1], totals[-1]
        out = {}
        for k, name in enumerate(self.names):
            out[name] = float(sums[k].sum() / counts.sum())
            for j, label in enumerate(self.labels):
                out[f"{name}/{label}"] = float(sums[k, j] / counts[j])
        return out
