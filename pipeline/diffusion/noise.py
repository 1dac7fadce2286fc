"""Gaussian noise drawn per image, so that image k of a batch depends on its own seed only.

diffusers' convention (``randn_tensor`` with a list of generators): one ``torch.Generator`` per
image; row k of every draw comes from generator k alone. The samplers draw through
:func:`randn_rows` — the starting noise, a consistency student's fresh noise at each step,
RePaint's jumps, FlowEdit's noise at each step — so none of them mixes the images of a batch,
and a result does not change with the batch size or its batch partners.

A single generator (or None) keeps the older behaviour: one draw for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, one per image, or the global RNG


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def randn_rows(shape: Sequence[int], generators: Generators, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, …), drawn on the CPU (the same numbers on any device)
    and moved to ``device``. With a list of generators, row k is drawn from ``generators[k]``
    alone; with one generator or None, the batch is one draw."""
    shape = tuple(shape)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"noise of {shape[0]} rows but {len(generators)} generators (one per image)")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generators]).to(device)  # (B, …)


def continued_generators(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> list[torch.Generator]:
    """Image k's generator past its starting noise: seeded with ``seeds[k]``, one draw of
    ``shape`` (C, h, w) taken. The samplers' later draws thus continue the stream that gave
    image k its starting noise (``TextToImage.noise_per_image``), as one diffusers generator per
    image does, and never repeat another image's starting noise (seeds k and k + 1 are both
    in use when image k uses seed + k)."""
    generators = image_generators(seeds)
    for g in generators:
        torch.randn(tuple(shape), generator=g, dtype=dtype)
    return generators
