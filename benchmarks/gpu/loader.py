"""Loader supply against the GPU's need, measured on the same machine.

Need: the best training images/s our DiT reached in ``benchmarks.gpu.steps`` (any variant) for
B/2 and XL/2 at 256 px. Supply: ``pipeline.data.latents.latent_loader`` reading latent shards at
the shipped configs' real shapes (32×32×4 fp16 latents, 120 × 4096 fp16 T5-XXL tokens, pooled
CLIP-L; about 1 MB a sample, written by ``benchmarks.loader_throughput.write_latent_folder``, read
back from the page cache) with 4 and 8 DataLoader workers, one epoch after a warm-up batch per
worker. Ratio = supply / need; goal ≥ 1.5 with 4 workers for B/2 (issue #30): the loader must
keep the GPU fed with margin, since the training process also needs CPU. A size whose step
measurement was skipped falls back to the 40%-MFU figure of ``benchmarks.loader_throughput``.

``--cpu`` (the smoke test) reads a small folder at the same shapes with 1 worker.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SUPPLY_GOAL = 1.5  # 4-worker loader samples/s over the B/2 training images/s


def need(steps: list[dict]) -> dict[str, dict]:
    """Per size, the best measured images/s of our DiT and which variant gave it."""
    out = {}
    for size in ("DiT-B/2", "DiT-XL/2"):
        mine = [s for s in steps if s.get("model", "").startswith("ours") and s.get("size") == size and "skipped" not in s]
        if mine:
            best = max(mine, key=lambda s: s["images_per_s"])
            out[size] = {"images_per_s": best["images_per_s"], "from": "measured", "model": best["model"], "checkpointing": best["checkpointing"],
                         "compile": best["compile"]}
    return out


def fallback_need() -> dict[str, dict]:
    """The 40%-MFU H100 figure, for B/2, when no step was measured."""
    from benchmarks.loader_throughput import dit_b2_h100

    rate, words = dit_b2_h100(32)
    return {"DiT-B/2": {"images_per_s": rate, "from": words}}


def supply(cpu: bool) -> dict[str, dict]:
    """samples/s of the latent loader per worker count, at the real shapes."""
    from benchmarks.loader_throughput import latent_folder, measure
    from pipeline.data.stream import LoaderConfig

    shards, per_shard, batch = (2, 16, 8) if cpu else (8, 256, 64)
    workers = (1,) if cpu else (4, 8)
    with tempfile.TemporaryDirectory() as tmp, latent_folder(Path(tmp), "latents32", 32, shards, per_shard) as folder:
        batches = shards * per_shard // batch - max(workers)  # the rest of one epoch after the warm-up
        return {str(w): measure(folder, LoaderConfig(batch_size=batch, num_workers=w), batches) for w in workers}


def run(steps: list[dict], cpu: bool) -> dict:
    """Need, supply and their ratios; a failure is recorded, not raised (the check goes on)."""
    try:
        rates = supply(cpu)
    except Exception as err:  # noqa: BLE001 -- the loader failing must not end the GPU check
        return {"skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"}
    needs = need(steps) or fallback_need()
    ratios = {size: {w: r["samples_per_s"] / n["images_per_s"] for w, r in rates.items()} for size, n in needs.items()}
    first = min(rates, key=int)
    b2 = ratios.get("DiT-B/2", {}).get(first)
    return {"need": needs, "supply": rates, "ratios": ratios, "goal": f"DiT-B/2: {first}-worker supply ≥ {SUPPLY_GOAL}× need",
            "met": b2 is not None and b2 >= SUPPLY_GOAL}


def markdown(report: dict) -> list[str]:
    if "skipped" in report:
        return ["", f"Loader supply: skipped ({report['skipped']})"]
    workers = list(report["supply"])
    lines = ["", "| loader supply vs need | need images/s | " + " | ".join(f"{w} workers: samples/s (ratio)" for w in workers) + " |",
             "|---|---:|" + "---:|" * len(workers)]
    for size, n in report["need"].items():
        cells = [f"{report['supply'][w]['samples_per_s']:.0f} ({report['ratios'][size][w]:.2f}×)" for w in workers]
        lines.append(f"| {size} | {n['images_per_s']:.0f} | " + " | ".join(cells) + " |")
    return lines + ["", f"{report['goal']}: {'met' if report['met'] else 'NOT met'}"]
