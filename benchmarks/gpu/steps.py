"""Training-step throughput of our DiT against diffusers' peers at equal size, on one device.

Each model trains as ``pipeline.train`` trains it on one GPU without DeepSpeed: fp32 weights,
bf16 autocast (on a GPU; fp32 on the CPU), the rectified-flow loss in fp32, backward, AdamW. Our
DiT gets the conditions the shipped GPU configs give it: 32×32×4 latents (256 px through an f8
VAE, 256 image tokens at patch 2), T5-XXL-shaped text (120 tokens of width 4096, a key mask) and
a pooled CLIP-L vector (768); ``ours_single`` is the same model with ``adaln="single"`` (PixArt-α's
shared modulation, about PixArt's parameter count). The peers, at the same width, depth, heads and image tokens:

- ``PixArtTransformer2DModel`` (PixArt-α: cross-attention to the same 120 × 4096 tokens,
  adaLN-single);
- ``DiTTransformer2DModel`` (diffusers' class-conditional DiT: no text, so fewer FLOPs).

Variants: activation checkpointing (``enable_gradient_checkpointing``) and ``torch.compile``
applied per transformer block (one compilation serves every block). Reported per variant:
images/s, model TFLOP/s and MFU (model FLOPs = 3 × forward, 2 × multiply-accumulates, over the
device's dense bf16 peak; recomputation under checkpointing is not counted), peak memory, and
the compile time. Clocks are read after a device synchronisation.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.diffusion.flow import TimestepConfig, flow_loss, sample_timesteps
from pipeline.models.dit import DIT_CONFIGS, build_dit, count_parameters, flops_per_sample
from pipeline.timing import clock


@dataclass(frozen=True)
class Shape:
    latent: tuple[int, int, int]  # (C, h, w)
    text_tokens: int
    text_dim: int
    clip_dim: int


GPU_SHAPE = Shape((4, 32, 32), 120, 4096, 768)
CPU_SHAPE = Shape((4, 8, 8), 16, 64, 32)


def ours(name: str, shape: Shape, depth: int | None = None, adaln: str = "block") -> nn.Module:
    extra = {"depth": depth} if depth else {}
    return build_dit(name, in_channels=shape.latent[0], sample_size=shape.latent[1], text_dim=shape.text_dim,
                     clip_dim=shape.clip_dim, qk_norm=True, adaln=adaln, **extra)


def peer(kind: str, name: str, shape: Shape, depth: int | None = None) -> nn.Module:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    size = DIT_CONFIGS[name]
    width, heads, layers = size["hidden_size"], size["num_heads"], depth or size["depth"]
    common = dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=shape.latent[0],
                  out_channels=shape.latent[0], num_layers=layers, sample_size=shape.latent[1], patch_size=size["patch_size"])
    if kind == "pixart":
        return PixArtTransformer2DModel(**common, cross_attention_dim=width, caption_channels=shape.text_dim,
                                        norm_type="ada_norm_single", use_additional_conditions=False)
    return DiTTransformer2DModel(**common)


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.blocks if hasattr(model, "blocks") else model.transformer_blocks


def batch_for(kind: str, batch: int, shape: Shape, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    L = shape.text_tokens
    lengths = torch.randint(L // 2, L + 1, (batch,), generator=g)
    data = {"x0": torch.randn(batch, *shape.latent, generator=g), "mask": torch.arange(L)[None] < lengths[:, None]}
    if kind != "dit":
        data["text"] = torch.randn(batch, L, shape.text_dim, generator=g)
    data["clip"] = torch.randn(batch, shape.clip_dim, generator=g)
    data["labels"] = torch.randint(0, 1000, (batch,), generator=g)
    return {k: v.to(device) for k, v in data.items()}


def predictor(kind: str, model: nn.Module, data: dict):
    """``model(x_t, t, cond)`` for the loss, each model called as it is meant to be."""
    if kind.startswith("ours"):
        cond = {"t5": data["text"], "t5_mask": data["mask"], "clip": data["clip"]}
        return lambda x, t, _: model(x, t, cond)
    if kind == "pixart":
        return lambda x, t, _: model(hidden_states=x, encoder_hidden_states=data["text"], timestep=t * 1000,
                                     encoder_attention_mask=data["mask"].float(),
                                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return lambda x, t, _: model(hidden_states=x, timestep=(t * 999).long(), class_labels=data["labels"], return_dict=False)[0]


def measure(kind: str, name: str, shape: Shape, batch: int, device: str, checkpointing: bool, compiled: bool,
            steps: int, warmup: int, depth: int | None = None) -> dict:
    """One variant: warm-up steps (compilation included), then ``steps`` timed training steps."""
    torch.manual_seed(0)
    mine = kind.startswith("ours")
    model = (ours(name, shape, depth, ADALN[kind]) if mine else peer(kind, name, shape, depth)).to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    if compiled:
        for block in blocks(model):
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data, timesteps = batch_for(kind, batch, shape, device), TimestepConfig()
    predict = predictor(kind, model, data)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            t = sample_timesteps(batch, timesteps, device=device)
            loss = flow_loss(predict, data["x0"], {}, t, torch.randn_like(data["x0"])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock()
    step()  # the first step compiles
    first = clock() - start
    for _ in range(warmup - 1):
        step()
    start = clock()
    for _ in range(steps):
        step()
    seconds = clock() - start
    per_s = steps * batch / seconds
    flops = flops_per_sample(model, tokens_text=shape.text_tokens) if mine else None
    result = {"model": kind, "size": name, "checkpointing": checkpointing, "compile": compiled, "batch": batch,
              "params": count_parameters(model), "images_per_s": per_s, "ms_per_step": 1000 * seconds / steps,
              "first_step_s": first, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "tflops": 3 * flops * per_s / 1e12 if flops else None}
    return result


def release() -> None:
    """Return the memory of the last measurement before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan(cpu: bool) -> list[tuple[str, str, bool, bool]]:
    """(size, model kind, checkpointing, compile) in the order they run: every eager measurement
    of both sizes first (seconds each), then the compiled ones, ours first (each compiles for
    tens of seconds), so a tight budget drops the least needed. CPU: eager only, one size."""
    sizes = ("DiT-B/2",) if cpu else ("DiT-B/2", "DiT-XL/2")
    eager = [(size, kind, ckpt, False) for size in sizes
             for kind, ckpt in (("ours", False), ("ours", True), ("ours_single", False), ("pixart", False), ("dit", False))]
    compiled = [(size, kind, ckpt, True) for kind, ckpt in (("ours", False), ("pixart", False), ("ours_single", False), ("ours", True),
                                                            ("dit", False)) for size in sizes]
    return eager + ([] if cpu else compiled)


BATCH = {"DiT-B/2": 128, "DiT-XL/2": 64}
ADALN = {"ours": "block", "ours_single": "single"}  # our model kinds: per-block adaLN, PixArt-α's adaLN-single


def run(device: str, cpu: bool, peak_tflops: float | None, deadline: float) -> list[dict]:
    """Every planned measurement until ``deadline`` (time.monotonic); the rest are recorded as
    skipped, and one that fails is recorded with its error."""
    shape, depth = (CPU_SHAPE, 2) if cpu else (GPU_SHAPE, None)
    steps, warmup = (2, 1) if cpu else (20, 5)
    results = []
    for name, kind, ckpt, comp in plan(cpu):
        row = {"model": kind, "size": name, "checkpointing": ckpt, "compile": comp}
        if time.monotonic() > deadline:
            results.append({**row, "skipped": "time budget"})
            continue
        try:
            r = measure(kind, name, shape, 4 if cpu else BATCH[name], device, ckpt, comp, steps, warmup, depth)
        except Exception as err:  # noqa: BLE001 -- one variant failing (a compiler error, OOM) must not end the check
            results.append({**row, "skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"})
            continue
        finally:
            release()
        if r["tflops"] is not None and peak_tflops:
            r["mfu"] = r["tflops"] / peak_tflops
        results.append(r)
        print(f"benchmarks.gpu: {name} {kind} ckpt={ckpt} compile={comp}: {r['images_per_s']:.1f} img/s"
              + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""), flush=True)
    return results
