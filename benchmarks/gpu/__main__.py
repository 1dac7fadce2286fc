"""``python -m benchmarks.gpu [--output runs/gpu_check.json] [--cpu] [--budget SECONDS]``

What to run first on a new GPU machine (under 8 minutes on one H100/H200: ``--budget``, default
300 s, bounds the step measurements and records what it skipped; the rest takes about 2 minutes). It writes JSON and a Markdown
table beside it (``.md``):

1. training-step throughput at 256 px (``benchmarks.gpu.steps``): DiT-B/2 and DiT-XL/2 with and
   without activation checkpointing and ``torch.compile``, diffusers' PixArt and DiT at equal size
   beside them: images/s, MFU, peak memory; goals: MFU ≥ 40% (B/2) and ≥ 45% (XL/2), and ≥ 1.15×
   PixArt's images/s;
2. ``pipeline.train`` with DeepSpeed ZeRO-2 in bf16 and fp16: trains, checkpoints, resumes, exports;
3. the 50-step guided teacher against the 4-step student, sampler seconds per image and end to
   end (text encoders + sampler + VAE decode at the shipped configs' sizes);
4. loader supply against need (``benchmarks.gpu.loader``): the latent loader at real shapes with
   4 and 8 workers against the measured B/2 and XL/2 training images/s; goal ≥ 1.5× for B/2.

``--cpu`` runs the same code at toy sizes on the CPU (no compile, bf16 only): the test suite's
smoke test. Without a GPU and without ``--cpu`` it stops with one line. On a machine without
network, install the wheels ``benchmarks/gpu_wheels.sh`` gathered, or use ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

GOALS = {"DiT-B/2": 0.40, "DiT-XL/2": 0.45}
PEER_GOAL = 1.15  # ours / PixArt images per second, same variant


def device_info(cpu: bool) -> dict:
    from pipeline.training.tracking import PEAK_TFLOPS

    if cpu:
        return {"device": "cpu", "name": platform.processor() or "cpu", "peak_tflops": None}
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    return {"device": "cuda", "name": name, "peak_tflops": peak, "torch": torch.__version__, "cuda": torch.version.cuda}


def goals(steps: list[dict]) -> list[dict]:
    """MFU goals per size (best of our variants, either adaLN) and each of our models against PixArt
    at the same variant."""
    done = [s for s in steps if "skipped" not in s]
    out = []
    for size, goal in GOALS.items():
        mine = [s for s in done if s["size"] == size and s["model"].startswith("ours") and s.get("mfu") is not None]
        if mine:
            best = max(mine, key=lambda s: s["mfu"])
            out.append({"goal": f"{size} MFU ≥ {goal:.0%}", "value": f"{best['mfu']:.1%} ({best['model']}, {variant(best)})",
                        "met": best["mfu"] >= goal})
        for kind in ("ours", "ours_single"):
            for compiled in (False, True):
                a = [s for s in done if s["size"] == size and s["model"] == kind and not s["checkpointing"] and s["compile"] == compiled]
                b = [s for s in done if s["size"] == size and s["model"] == "pixart" and s["compile"] == compiled]
                if a and b:
                    ratio = a[0]["images_per_s"] / b[0]["images_per_s"]
                    out.append({"goal": f"{size} {kind} ≥ {PEER_GOAL}× PixArt ({'compiled' if compiled else 'eager'})",
                                "value": f"{ratio:.2f}×", "met": ratio >= PEER_GOAL})
    return out


def variant(s: dict) -> str:
    return "+".join([p for p, on in (("checkpointing", s["checkpointing"]), ("compile", s["compile"])) if on]) or "eager"


def markdown(report: dict) -> str:
    from benchmarks.gpu import loader

    dev = report["device"]
    lines = [f"# GPU check: {dev['name']}", "", f"dense bf16 peak: {dev['peak_tflops']} TFLOP/s; wall {report['seconds']:.0f} s", "",
             "| size | model | variant | batch | images/s | ms/step | TFLOP/s | MFU | peak GiB | first step s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["steps"]:
        if "skipped" in s:
            lines.append(f"| {s['size']} | {s['model']} | {variant(s)} | | skipped: {s['skipped']} | | | | | |")
            continue
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {s['size']} | {s['model']} | {variant(s)} | {s['batch']} | {s['images_per_s']:.1f} | {s['ms_per_step']:.1f} | "
                     f"{fmt(s['tflops'], '.1f')} | {fmt(s.get('mfu'), '.1%')} | {fmt(s['peak_memory_gib'], '.1f')} | {s['first_step_s']:.1f} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'NO'} |" for g in report["goals"]]
    lines += ["", "| pipeline.train, DeepSpeed ZeRO-2 | ok (train, resume, export) | steps | final loss | samples/s | seconds |",
              "|---|---|---:|---:|---:|---:|"]
    for precision, r in report["train"].items():
        lines.append(f"| {precision} | {'yes' if r['ok'] else 'NO'} | {r['steps']} | {r['final_loss']} | {r['samples_per_s']} | {r['seconds']:.0f} |")
    s = report["sampling"]
    lines += ["", f"Sampling ({s['model']}, batch {s['batch']}, sampler only): teacher 50 steps + CFG "
              f"{1000 * s['teacher_50_seconds_per_image']:.1f} ms/image, student 4 steps {1000 * s['student_4_seconds_per_image']:.2f} "
              f"ms/image: {s['speedup']:.1f}× faster. End to end (+ T5-XXL and CLIP-L text {1000 * s['text_seconds_per_image']:.2f} "
              f"ms/image, SD-VAE decode {1000 * s['decode_seconds_per_image']:.2f} ms/image): {s['end_to_end_speedup']:.1f}× faster."]
    lines += loader.markdown(report["loader"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/gpu_check.json"))
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (the test suite's smoke test)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the step measurements; the rest is skipped")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA GPU here; --cpu runs the smoke test at toy sizes", file=sys.stderr)
        return 2
    from benchmarks.gpu import chain, loader, steps

    start = time.monotonic()
    info = device_info(args.cpu)
    device = "cpu" if args.cpu else "cuda"
    report = {"device": info, "steps": steps.run(device, args.cpu, info["peak_tflops"], start + args.budget)}
    report["goals"] = goals(report["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        report["train"] = chain.train_run(Path(tmp), args.cpu)
    report["sampling"] = chain.sampling(device, args.cpu)
    report["loader"] = loader.run(report["steps"], args.cpu)
    report["seconds"] = time.monotonic() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"benchmarks.gpu: wrote {args.output} and {args.output.with_suffix('.md')}")
    return 0 if all(r["ok"] for r in report["train"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
