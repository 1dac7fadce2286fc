"""``--dry-run``: what a launch would do, checked and printed before any GPU time is spent.

``python -m pipeline.train --config configs/dit_xl2_256.yaml --dry-run --world-size 32`` prints
the resolved world size, micro-batch, gradient accumulation, global batch, ZeRO stage or DDP,
shards per rank / per data worker (one worker = one stream of ``pipeline.data.stream``), tokens
per step, and an estimate of the memory per GPU. It builds no weights (models are built on the
``meta`` device) and reads no samples: only ``dataset.json``, the shard listing and the
``*_stats.json`` files (and a resumed checkpoint's ``data_rank0.json``). Without
``--world-size`` the world size is the real launch's (``pipeline.training.distributed.dist_env``), so
``accelerate launch ... -m pipeline.train --dry-run`` checks the real plan (rank 0 prints).

A plan that cannot run exits 1 with one line: the checks the trainer runs on every rank before
any collective (``pipeline.training.preflight``): fewer shard groups than ranks × workers with
``loader.on_too_few_shards=error`` (with ``resample`` it warns), a launch file whose DeepSpeed
setting contradicts the config, or a resume whose data position was written with another world
size or ``num_workers``.

Each training recipe provides its plan (``pipeline.training.dit.plan``,
``pipeline.training.distill.plan``: a :class:`~pipeline.training.preflight.TrainingPlan` whose
networks are built on ``meta``); a command hands it to :func:`run_stage`::

    options, argv = dry_run.split_flags(argv)
    cfg = parse_cli(DistillConfig, argv, PROG, ...)
    if options is not None:
        return dry_run.run_stage(cfg, options, plan, PROG)

``data_tools.encode --dry-run`` prints the shard split of the encoding job (its own ``plan``).

Memory model (ZeRO paper, Rajbhandari et al. 2020, §3: 2Ψ + 2Ψ + 12Ψ bytes for Ψ parameters
with mixed-precision Adam): 16-bit weights and gradients; AdamW's fp32 m and v plus the fp32
master weights; ZeRO-2 divides gradients and optimizer state by the world size, ZeRO-3 the
weights too; DDP keeps fp32 weights, fp32 gradients plus its gradient buckets (as large again)
and m, v on every rank. The fp32 EMA is a full copy on every rank (ZeRO does not divide it).
Activations are a rough count (see :func:`activation_bytes`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from pipeline.config import ConfigError
from pipeline.data.remote import dataset_meta
from pipeline.data.sizes import shard_sizes
from pipeline.data.stream import LoaderConfig, ShardLoader
from pipeline.training.distributed import deepspeed_config, dist_env
from pipeline.training.preflight import PlanError, TrainingPlan, check_shard_count, preflight

GIB = 1024**3
TEXT_TOKENS_ASSUMED = 32  # when dataset.json names no T5 max_length (as the trainer's logged FLOPs assume)
ACT_ELEMENTS_PER_TOKEN = 27  # saved activations per image token per hidden unit and block (activation_bytes)


@dataclass(frozen=True)
class DryRunOptions:
    world_size: int | None = None  # simulate this many processes (None: the real launch's)


def split_flags(argv: list[str] | None) -> tuple[DryRunOptions | None, list[str]]:
    """Take ``--dry-run [--world-size N]`` out of ``argv``; the rest goes to the stage's own parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--world-size", type=int)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        parser.error("--world-size N (N >= 1) goes with --dry-run")
    return (DryRunOptions(args.world_size) if args.dry_run else None), rest


# ---------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class DataPlan:
    """The stream schedule of ``pipeline.data.stream`` for one world size (pure arithmetic)."""

    shards: int
    samples: int
    world_size: int
    workers: int  # streams per rank: max(1, num_workers)
    groups: int
    shards_per_group: int
    resampled: bool  # fewer groups than streams, on_too_few_shards=resample
    stream_shards: tuple[int, ...]  # shards each stream reads in epoch 0
    stream_samples: tuple[int, ...]

    @property
    def streams(self) -> int:
        return self.world_size * self.workers

    def per_rank(self, values: tuple[int, ...]) -> list[int]:
        return [sum(values[r * self.workers : (r + 1) * self.workers]) for r in range(self.world_size)]


def data_plan(latents: Path, loader: LoaderConfig, world_size: int) -> DataPlan:
    """Shard listing + ``*_stats.json`` -> the schedule of every stream in epoch 0."""
    shards = check_shard_count(latents, loader, world_size)
    sizes = shard_sizes(shards)  # dataset.json's shard_samples, else *_stats.json, else a local tar's headers
    schedule = ShardLoader(shards, loader, lambda s: s, lambda b: b, 0, world_size, sizes=sizes).schedule
    per_stream = [schedule.groups(0, s) for s in range(schedule.n_streams)]
    return DataPlan(
        shards=len(shards),
        samples=sum(sizes),
        world_size=world_size,
        workers=max(1, loader.num_workers),
        groups=schedule.n_groups,
        shards_per_group=loader.shards_per_group,
        resampled=schedule.n_groups < schedule.n_streams,
        stream_shards=tuple(sum(len(g) for g in groups) for groups in per_stream),
        stream_samples=tuple(sum(sizes[i] for g in groups for i in g) for groups in per_stream),
    )


# ---------------------------------------------------------------------------- estimates


def text_tokens(meta: dict) -> tuple[int, str]:
    """Upper bound of text tokens per sample (T5 ``max_length`` + CLIP tokens when stored), and how it was found."""
    text = meta.get("text_encoders") or {}
    t5, clip = text.get("t5") or {}, text.get("clip") or {}
    parts, tokens = [], 0
    if t5:
        length = t5.get("max_length") or (meta.get("config", {}).get("text", {}).get("t5") or {}).get("max_length")
        tokens += length or TEXT_TOKENS_ASSUMED
        parts.append(f"T5 ≤ {length}" if length else f"T5 ~{TEXT_TOKENS_ASSUMED} (assumed)")
    if clip.get("return_tokens"):
        tokens += clip.get("context_length", 77)
        parts.append(f"CLIP tokens {clip.get('context_length', 77)}")
    return tokens, ", ".join(parts) or "none"


def activation_bytes(module: torch.nn.Module, micro_batch: int, image_tokens: int, text_len: int, precision: str, checkpointing: bool) -> int | None:
    """Saved activations of one DiT micro-batch (forward kept for backward); None for other models.

    Rough, counted per block, per sample, in elements: self-attention ~10·n·D (norm input,
    modulated input, qkv, QK-norm inputs, attention output, projection input, gate), cross-attention
    ~6·n·D + 3·L·D (query side, keys/values of L text tokens), MLP ~11·n·D (4D hidden before and
    after GELU): ~27·n·D + 3·L·D with SDPA (no n×n score matrix kept). Bytes: ×2 in bf16/fp16, ×4 in
    fp32. With gradient checkpointing only each block's input (n·D) is kept, plus one block
    recomputed. Compare Korthikanti et al. 2022: 34·s·b·h bytes per GPT layer. Expect ±50%.
    """
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "depth"):
        return None
    size = 2 if precision in ("bf16", "fp16") else 4
    D, depth = cfg.hidden_size, cfg.depth
    block = ACT_ELEMENTS_PER_TOKEN * image_tokens * D + 3 * text_len * D
    kept = depth * image_tokens * D + block if checkpointing else depth * block
    return micro_batch * kept * size


def memory_rows(plan: TrainingPlan, world: int, act: int | None, template: dict | None) -> list[tuple[str, str, float]]:
    """(item, how it is held, GiB per GPU) for every model of the plan."""
    half = plan.mixed_precision in ("bf16", "fp16")
    w = 2 if half else 4
    stage = plan.zero_stage if plan.deepspeed else 0
    div_w, div_g, div_o = (world if stage >= 3 else 1), (world if stage >= 2 else 1), (world if stage >= 1 else 1)
    label = f"ZeRO-{stage}" if stage else "DDP"

    def split(d: int, what: str) -> str:
        return "replicated" if d == 1 else f"÷{d} ({what})"

    rows = []
    for m in plan.models:
        p = sum(t.numel() for t in m.module.parameters())
        if not m.trained:
            rows.append((f"{m.name}: frozen weights", f"{m.frozen_bytes} B/param, replicated", p * m.frozen_bytes / GIB))
            continue
        rows.append((f"{m.name}: weights", f"{plan.mixed_precision if half and plan.deepspeed else 'fp32'}, {split(div_w, label)}",
                     p * (w if plan.deepspeed else 4) / div_w / GIB))
        if plan.deepspeed:
            rows.append((f"{m.name}: gradients", f"{'16-bit' if half else 'fp32'}, {split(div_g, label)}", p * w / div_g / GIB))
            master = 4 if half else 0
            rows.append((f"{m.name}: AdamW", f"fp32 m, v{' + fp32 master' if master else ''}, {split(div_o, label)}",
                         p * (8 + master) / div_o / GIB))
        else:
            rows.append((f"{m.name}: gradients", "fp32 + DDP buckets, replicated", p * 8 / GIB))
            rows.append((f"{m.name}: AdamW", "fp32 m, v, replicated", p * 8 / GIB))
        if m.fp32_copies:
            rows.append((f"{m.name}: {' + '.join(m.fp32_copies)}", "fp32, full copy on every rank", len(m.fp32_copies) * p * 4 / GIB))
    if template is not None:
        zero = template.get("zero_optimization", {})
        keys = ("reduce_bucket_size", "allgather_bucket_size") if stage < 3 else ("reduce_bucket_size", "stage3_prefetch_bucket_size")
        elements = sum(int(zero.get(k, 0)) for k in keys if isinstance(zero.get(k, 0), int))
        rows.append(("DeepSpeed buckets", " + ".join(keys), elements * w / GIB))
    if act is not None:
        rows.append(("activations", "rough, see below", act / GIB))
    return rows


# ---------------------------------------------------------------------------- the report


def run_stage(cfg, options: DryRunOptions, make_plan, prog: str) -> int:
    """``--dry-run`` of a training stage: its recipe's ``make_plan(cfg, prog)``, then :func:`run`."""
    try:
        plan = make_plan(cfg, prog)
    except (OSError, PlanError, ConfigError) as err:  # no dataset.json, no teacher config, buckets the model cannot cut, ...
        print(f"{prog}: dry run: {err}", file=sys.stderr)
        return 1
    return run(plan, options)


def run(plan: TrainingPlan, options: DryRunOptions, out: TextIO | None = None) -> int:
    """Print the plan of a training stage; 1 (and one line on stderr) when it cannot run."""
    out = out or sys.stdout
    env = dist_env()
    world = options.world_size or env.world_size
    if options.world_size is None and not env.is_main:
        return 0  # launched: rank 0 speaks for everyone
    try:
        preflight(plan.latents, plan.loader, world, deepspeed=plan.deepspeed, zero_stage=plan.zero_stage, resume_from=plan.resume_from)
        data = data_plan(plan.latents, plan.loader, world)
    except (PlanError, OSError) as err:  # OSError: a shard or its stats unreadable (pipeline.data.remote.SourceError)
        print(f"{plan.prog}: dry run: {err}", file=sys.stderr)
        return 1
    meta = dataset_meta(plan.latents)  # a local folder's or a URL's (pipeline.data.remote)
    source = f"--world-size {world}" if options.world_size else f"launcher: {env.launcher}"
    for line in report_lines(plan, data, meta, world, source):
        print(line, file=out)
    if data.resampled:
        print(f"{plan.prog}: warning: {data.groups} shard group(s) for {data.streams} streams: each stream draws groups "
              "with replacement (loader.on_too_few_shards=resample), so samples repeat within an epoch", file=sys.stderr)
    return 0


def report_lines(plan: TrainingPlan, data: DataPlan, meta: dict, world: int, source: str) -> list[str]:
    B, A = plan.loader.batch_size, plan.grad_accum
    global_batch = B * A * world
    template = None
    if plan.deepspeed:
        raw = json.loads(Path(plan.deepspeed_template).read_text())
        raw.setdefault("zero_optimization", {})["stage"] = plan.zero_stage
        template = deepspeed_config(raw, B, A, plan.grad_clip, plan.mixed_precision, world)  # as the trainer fills it
        assert template["train_batch_size"] == global_batch
    C, H, W = meta["latent_shape"]
    patch = plan.models[0].module.config.patch_size if plan.models and hasattr(plan.models[0].module, "config") else 2
    n_img = (H // patch) * (W // patch)
    n_txt, txt_how = text_tokens(meta)
    lines = [f"{plan.prog} dry run (no weights built, no samples read)", "launch"]
    kv = lambda k, v: lines.append(f"  {k:<24}{v}")  # noqa: E731
    kv("world size", f"{world} ({source})")
    mode = f"DeepSpeed ZeRO-{plan.zero_stage} ({plan.deepspeed_template})" if plan.deepspeed else "DDP (deepspeed.enabled=false)"
    kv("parallelism", f"{mode}, mixed_precision={plan.mixed_precision}")
    kv("precision", precision_line(plan.mixed_precision, plan.deepspeed))
    kv("micro-batch", f"{B} per process")
    kv("gradient accumulation", A)
    kv("global batch", f"{global_batch} = {B} × {A} × {world}")
    lines.append(f"data  {plan.latents}: {data.shards} shards, {data.samples:,} samples")
    kv("streams", f"{data.streams} = {world} ranks × {data.workers} workers")
    kv("shard groups", f"{data.groups} of {data.shards_per_group} shard(s)" + ("  (resampled: fewer than streams)" if data.resampled else ""))
    per_stream = data.groups // data.streams
    if not data.resampled and data.groups % data.streams:
        kv("groups per worker", f"{per_stream}–{per_stream + 1} per epoch: uneven, so the groups of short streams are read up to "
           f"{(per_stream + 1) / per_stream:.2g}× as often; a group count that is a multiple of {data.streams} evens it")
    rank_shards, rank_samples = data.per_rank(data.stream_shards), data.per_rank(data.stream_samples)
    epoch = " per epoch" + (" (groups drawn with replacement)" if data.resampled else "")
    kv("shards per rank", spread(rank_shards) + epoch)
    kv("shards per worker", spread(list(data.stream_shards)) + epoch + " (one worker = one stream)")
    kv("samples per rank", spread(rank_samples) + epoch)
    kv("steps per epoch", f"≈ {data.samples // max(1, global_batch):,}")
    kv("tokens per sample", f"{n_img} image ({H}×{W} latent, patch {patch}) + ≤ {n_txt} text ({txt_how})")
    kv("tokens per step", f"{global_batch * n_img:,} image + ≤ {global_batch * n_txt:,} text")
    lines.extend(bucket_lines(meta.get("buckets"), patch, B, data.streams))
    lines.extend(_model_lines(plan, world, B, n_img, n_txt, template, global_batch))
    return lines


def bucket_lines(buckets: dict | None, patch: int, micro_batch: int, streams: int) -> list[str]:
    """The aspect-ratio bucket histogram (``dataset.json``), image tokens per sample and per
    micro-batch of each bucket, and the buckets too small to fill a batch on every stream in an
    epoch (their samples wait across epochs: nothing is dropped, ``pipeline.data.stream``)."""
    if not buckets:
        return []
    total = sum(b["samples"] for b in buckets.values())
    lines = [f"buckets  {len(buckets)} (a batch holds one; partial batches wait for their bucket to fill)"]
    for name, b in buckets.items():
        _, h, w = b["latent_shape"]
        tokens = (h // patch) * (w // patch)
        rare = "  < a batch per stream per epoch: waits" if b["samples"] < micro_batch * streams else ""
        lines.append(f"  {name:<12}{b['samples']:>9,} ({b['samples'] / total:6.1%})  {tokens} tokens/sample, "
                     f"{tokens * micro_batch:,} per micro-batch{rare}")
    return lines


def precision_line(mixed_precision: str, deepspeed: bool) -> str:
    """How the run computes and what it keeps in fp32 (DESIGN.md §8), as the trainer sets it up."""
    if mixed_precision == "no":
        return "fp32 throughout"
    if deepspeed:
        scaling = ", dynamic loss scaling (DeepSpeed)" if mixed_precision == "fp16" else ""
        return f"{mixed_precision} weights and gradients (DeepSpeed), fp32 master weights, AdamW state and EMA{scaling}"
    scaling = " with a dynamic gradient scaler" if mixed_precision == "fp16" else ""
    return f"{mixed_precision} autocast{scaling}; fp32 weights, gradients, AdamW state and EMA"


def _model_lines(plan: TrainingPlan, world: int, B: int, n_img: int, n_txt: int, template: dict | None, global_batch: int) -> list[str]:
    from pipeline.models.dit import flops_per_sample

    lines = ["models"]
    act = None
    for m in plan.models:
        count = sum(t.numel() for t in m.module.parameters())
        lines.append(f"  {m.name:<24}{count:,} parameters ({'trained' if m.trained else 'frozen'})")
        if m.trained and hasattr(m.module, "config"):
            a = activation_bytes(m.module, B, n_img, n_txt, plan.mixed_precision, m.gradient_checkpointing)
            act = None if a is None else (act or 0) + a
            flops = 3 * flops_per_sample(m.module, tokens_text=n_txt) * global_batch
            lines.append(f"  {'':<24}≈ {flops / 1e15:.2f} PFLOP per optimizer step in its forward + backward (3 × forward, ≤ {n_txt} text tokens)")
    rows = memory_rows(plan, world, act, template)
    lines.append("memory per GPU (GiB, estimate)")
    for item, how, gib in rows:
        lines.append(f"  {item:<32}{gib:8.2f}  {how}")
    lines.append(f"  {'total':<32}{sum(r[2] for r in rows):8.2f}  + CUDA context and allocator slack (~1-3 GiB)")
    lines.append("  sample grids: rank 0 loads the VAE for each grid and releases it; the prompts are encoded once and the "
                 "text encoders released (not counted above)")
    if act is not None:
        ckpt = any(m.gradient_checkpointing for m in plan.models if m.trained)
        lines.append(f"  activations: micro-batch × depth × (27·n·D + 3·L·D) elements × {2 if plan.mixed_precision != 'no' else 4} B"
                     f"{' (checkpointing: depth × n·D + one block)' if ckpt else ''}; n={n_img}, L≤{n_txt}; rough (±50%)")
    return lines


def spread(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


__all__ = ["DataPlan", "DryRunOptions", "activation_bytes", "data_plan", "precision_line", "run", "run_stage", "split_flags", "spread"]
