"""Our DiT against diffusers' PixArtTransformer2DModel at equal size, side by side in one run.

Both: width 128, depth 6, 4 heads, patch 2, 8×8×4 latents (16 image tokens), 16 text tokens of
width 64 with a key mask (8 to 16 real tokens per row, like a padded batch), batch 64, CPU with
2 threads, float32.

- ``dit_vs_pixart_train_step``: time of one training step (forward + MSE loss + backward + AdamW
  step) of ours over PixArt's. Goal <= 0.9.
- ``dit_vs_pixart_forward``: time of one forward under ``torch.no_grad()``. Goal <= 0.9.

Rounds alternate the two models and each ratio uses the median time, because these machines are
noisy. Our DiT has per-block adaLN-Zero (DiT) where PixArt shares one (adaLN-single), so it holds
more parameters at the same width; the FLOPs per token are nearly the same.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from pipeline.models.dit import DiT, count_parameters

WIDTH, DEPTH, HEADS, PATCH = 128, 6, 4, 2
LATENT = (4, 8, 8)  # (C, h, w): 16 tokens of 2×2 patches
TEXT_TOKENS, TEXT_DIM, BATCH = 16, 64, 64


def make_models() -> dict[str, nn.Module]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    ours = DiT(
        in_channels=LATENT[0], sample_size=LATENT[1], patch_size=PATCH, hidden_size=WIDTH, depth=DEPTH,
        num_heads=HEADS, text_dim=TEXT_DIM,
    )
    pixart = PixArtTransformer2DModel(
        sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0], patch_size=PATCH, num_layers=DEPTH,
        attention_head_dim=WIDTH // HEADS, num_attention_heads=HEADS, cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM, norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return {"ours": ours, "pixart": pixart}


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(TEXT_TOKENS // 2, TEXT_TOKENS + 1, (BATCH,), generator=g)  # captions of 8..16 tokens
    return {
        "x": torch.randn(BATCH, *LATENT, generator=g),
        "t": torch.rand(BATCH, generator=g),
        "text": torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=g),
        "mask": torch.arange(TEXT_TOKENS)[None] < lengths[:, None],  # (B, L): padded like a real batch
        "target": torch.randn(BATCH, *LATENT, generator=g),
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


def run(quick: bool = False) -> list[dict]:
    rounds, repeats, warmup = (5, 5, 3) if quick else (11, 10, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models, batch = make_models(), make_batch()
        fns = {name: step_fns(name, model.train(), batch) for name, model in models.items()}
        kinds = ("train_step", "forward")
        ms: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in models} for kind in kinds}
        for name in models:
            for kind in ms:
                timed(fns[name][kind], warmup)
        for r in range(rounds):
            for kind in ms:
                for name in list(models)[:: 1 if r % 2 else -1]:  # alternate which model goes first
                    ms[kind][name].append(timed(fns[name][kind], repeats))
    finally:
        torch.set_num_threads(threads)
    params = {name: count_parameters(model) for name, model in models.items()}
    entries = []
    for kind, times in ms.items():
        median = {name: statistics.median(v) for name, v in times.items()}
        entries.append({
            "name": f"dit_vs_pixart_{kind}",
            "ratio": round(median["ours"] / median["pixart"], 3),
            "goal": 0.9,
            "better": "lower",
            "ms_per_step": {name: round(v, 2) for name, v in median.items()},
            "ratio_of_fastest": round(min(times["ours"]) / min(times["pixart"]), 3),
            "params": params,
            "rounds": rounds,
            "repeats": repeats,
            "batch": BATCH,
            "threads": 2,
            "ms_all": {name: [round(x, 2) for x in v] for name, v in times.items()},
        })
    return entries
