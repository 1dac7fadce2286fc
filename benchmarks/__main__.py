"""``python -m benchmarks --output FILE.json [--quick] [--only NAME]``: run the ratio benchmarks,
write one JSON entry per benchmark plus a Markdown table beside the JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks import BENCHMARKS


def markdown(entries: list[dict]) -> str:
    lines = ["| benchmark | ratio | goal | better | met |", "|---|---|---|---|---|"]
    for e in entries:
        met = e["ratio"] >= e["goal"] if e["better"] == "higher" else e["ratio"] <= e["goal"]
        lines.append(f"| {e['name']} | {e['ratio']:.3f} | {e['goal']} | {e['better']} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds")
    p.add_argument("--only", default=None, help="run only modules whose name contains this")
    args = p.parse_args(argv)
    entries = []
    for module in BENCHMARKS:
        if args.only and args.only not in module:
            continue
        start = time.time()
        for entry in importlib.import_module(module).run(quick=args.quick):
            entries.append({**entry, "module": module, "module_seconds": round(time.time() - start, 1)})
            print(f"{entry['name']}: ratio {entry['ratio']:.3f} (goal {entry['goal']}, {entry['better']} is better)", flush=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, "benchmarks": entries}, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(entries))
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
