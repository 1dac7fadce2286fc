"""Our DiT against diffusers' PixArtTransformer2DModel at equal size, side by side in one run.

Two shapes, both float32 on the CPU with 2 threads, text with a key mask (half to all of the
tokens real per row, like a padded batch):

- tiny: width 128, depth 6, 4 heads, patch 2, 8×8×4 latents (16 image tokens), 16 text tokens of
  width 64, batch 64. ``dit_vs_pixart_train_step`` / ``dit_vs_pixart_forward``, goal <= 0.9.
- B/2-like (DiT-B/2's width and heads, 4 blocks): width 768, 12 heads, patch 2, 32×32×4 latents
  (256 image tokens), 64 text tokens of width 768, batch 4. ``dit_vs_pixart_b2_train_step`` /
  ``dit_vs_pixart_b2_forward``, goal <= 0.85.

``train_step``: time of one training step (forward + MSE loss + backward + AdamW step, foreach as
torch's default, on both) of ours over PixArt's; ``forward``: one forward under ``torch.no_grad()``.

Ours is built with ``adaln="single"``, PixArt-α's adaLN-single (one shared modulation MLP plus a
(6, D) table per block), as PixArt is: with DiT's per-block adaLN it holds 54.6M parameters at the
B/2 shape against PixArt's 43.3M (42.8M with adaLN-single), and its train step measured 2–12%
slower over runs (per-block modulation, its gradients and the AdamW step over 12M more
parameters). The FLOPs per token are then nearly the same: at B/2, torch.profiler puts ~80% of
both models' train step in the same fp32 matmuls (mm / addmm at 150–190 GFLOPS on 2 cores), ~6%
in SDPA and ~4% in AdamW, so the ratio there sits near 1.0.

Rounds alternate the two models and each ratio uses the median time, because these machines are
noisy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.models.dit import DiT, count_parameters

ADALN = "single"  # our DiT's modulation in both comparisons (pipeline.models.dit.ADALN)


@dataclass(frozen=True)
class Shape:
    """One comparison: model size, inputs, goal, and (rounds, repeats, warmup) for quick / full runs."""

    prefix: str  # entry names: f"{prefix}_{kind}"
    width: int
    depth: int
    heads: int
    latent: tuple[int, int, int]  # (C, h, w)
    text_tokens: int
    text_dim: int
    batch: int
    goal: float
    quick: tuple[int, int, int]
    full: tuple[int, int, int]
    patch: int = 2


SHAPES = (
    Shape(prefix="dit_vs_pixart", width=128, depth=6, heads=4, latent=(4, 8, 8), text_tokens=16, text_dim=64, batch=64,
          goal=0.9, quick=(5, 5, 3), full=(11, 10, 5)),
    Shape(prefix="dit_vs_pixart_b2", width=768, depth=4, heads=12, latent=(4, 32, 32), text_tokens=64, text_dim=768,
          batch=4, goal=0.85, quick=(5, 2, 1), full=(7, 3, 2)),
)


def make_models(shape: Shape) -> dict[str, nn.Module]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    C, h, _ = shape.latent
    ours = DiT(
        in_channels=C, sample_size=h, patch_size=shape.patch, hidden_size=shape.width, depth=shape.depth,
        num_heads=shape.heads, text_dim=shape.text_dim, adaln=ADALN,
    )
    pixart = PixArtTransformer2DModel(
        sample_size=h, in_channels=C, out_channels=C, patch_size=shape.patch, num_layers=shape.depth,
        attention_head_dim=shape.width // shape.heads, num_attention_heads=shape.heads, cross_attention_dim=shape.width,
        caption_channels=shape.text_dim, norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return {"ours": ours, "pixart": pixart}


def make_batch(shape: Shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, L = shape.batch, shape.text_tokens
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)  # captions of L/2..L tokens
    return {
        "x": torch.randn(B, *shape.latent, generator=g),
        "t": torch.rand(B, generator=g),
        "text": torch.randn(B, L, shape.text_dim, generator=g),
        "mask": torch.arange(L)[None] < lengths[:, None],  # (B, L): padded like a real batch
        "target": torch.randn(B, *shape.latent, generator=g),
    }


def predict(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each model called the way it is meant to be called, with the same inputs."""
    if name == "ours":
        return model(batch["x"], batch["t"], {"t5": batch["text"], "t5_mask": batch["mask"]})
    return model(
        hidden_states=batch["x"],
        encoder_hidden_states=batch["text"],
        timestep=batch["t"] * 1000,
        encoder_attention_mask=batch["mask"].float(),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


def step_fns(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = (predict(name, model, batch) - batch["target"]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            predict(name, model, batch)

    return {"train_step": train_step, "forward": forward}


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Milliseconds per call, averaged over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1000 / repeats


def measure(shape: Shape, rounds: int, repeats: int, warmup: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Per kind, per model: the ms per call of every round; and each model's parameter count."""
    models, batch = make_models(shape), make_batch(shape)
    fns = {name: step_fns(name, model.train(), batch) for name, model in models.items()}
    ms: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in models} for kind in ("train_step", "forward")}
    for name in models:
        for kind in ms:
            timed(fns[name][kind], warmup)
    for r in range(rounds):
        for kind in ms:
            for name in list(models)[:: 1 if r % 2 else -1]:  # alternate which model goes first
                ms[kind][name].append(timed(fns[name][kind], repeats))
    return ms, {name: count_parameters(model) for name, model in models.items()}


def entries(shape: Shape, ms: dict[str, dict[str, list[float]]], params: dict[str, int], rounds: int, repeats: int) -> list[dict]:
    out = []
    for kind, times in ms.items():
        median = {name: statistics.median(v) for name, v in times.items()}
        out.append({
            "name": f"{shape.prefix}_{kind}",
            "ratio": round(median["ours"] / median["pixart"], 3),
            "goal": shape.goal,
            "better": "lower",
            "ms_per_step": {name: round(v, 2) for name, v in median.items()},
            "ratio_of_fastest": round(min(times["ours"]) / min(times["pixart"]), 3),
            "params": params,
            "adaln": ADALN,
            "width": shape.width,
            "depth": shape.depth,
            "tokens": {"image": shape.latent[1] * shape.latent[2] // shape.patch**2, "text": shape.text_tokens},
            "rounds": rounds,
            "repeats": repeats,
            "batch": shape.batch,
            "threads": 2,
            "ms_all": {name: [round(x, 2) for x in v] for name, v in times.items()},
        })
    return out


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    results = []
    try:
        for shape in SHAPES:
            rounds, repeats, warmup = shape.quick if quick else shape.full
            ms, params = measure(shape, rounds, repeats, warmup)
            results += entries(shape, ms, params, rounds, repeats)
    finally:
        torch.set_num_threads(threads)
    return results
