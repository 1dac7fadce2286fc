"""LoRA against full fine-tuning: trainable parameters and AdamW optimizer state, side by side.

At the DiT-B/2 and DiT-XL/2 shapes with T5-XXL and CLIP-L widths (``text_dim`` 4096, ``clip_dim``
768; 256 px through an /8 VAE: 4×32×32 latents), full fine-tuning against rank-16 LoRA on the
``attention`` preset (alpha 16; ``pipeline.training.lora``, Hu et al. 2021):

- ``lora_optimizer_state_dit_b2`` / ``_xl2``: AdamW's state bytes of full fine-tuning over LoRA's
  (higher is better; goal >= 20). AdamW keeps ``exp_avg`` and ``exp_avg_sq`` (fp32, like the
  parameter) and a 4-byte ``step`` per trainable tensor.

``measured``: the bytes of ``optimizer.state`` after one real AdamW step (forward + backward of a
batch of one on a small 4×8×8 latent: the state does not depend on the input size).
``counted``: the model built on the ``meta`` device and the state counted as 8 bytes per trainable
parameter + 4 per trainable tensor (the measured cases check that count). DiT-XL/2's full
fine-tune is counted, not measured (~11 GB of fp32 weights, gradients and state on a CPU);
``--quick`` counts every XL/2 case.

    python -m benchmarks.lora_memory [--quick] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.models.dit import build_dit
from pipeline.training.dit_config import LoraConfig
from pipeline.training.lora import add_lora

WIDTHS = {"text_dim": 4096, "clip_dim": 768, "in_channels": 4, "sample_size": 32}
LORA = LoraConfig(rank=16, alpha=16, targets="attention")
GOAL = 20.0


def build(name: str, lora: bool, device: str) -> torch.nn.Module:
    """The DiT (random weights; on ``meta``: shapes only), with the LoRA adapters when ``lora``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_dit(name, **WIDTHS)
        if lora:
            add_lora(model, LORA)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def counted_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's state for the trainable parameters: exp_avg + exp_avg_sq in the parameter's dtype, a 4-byte step each."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in trainable(model))


def measured_state_bytes(model: torch.nn.Module) -> int:
    """The bytes in ``optimizer.state`` after one real AdamW step on a batch of one (4×8×8 latent, 4 text tokens)."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, generator=g)
    cond = {"t5": torch.randn(1, 4, WIDTHS["text_dim"], generator=g), "clip": torch.randn(1, WIDTHS["clip_dim"], generator=g),
            "drop": torch.tensor([False])}  # "drop": the null condition's parameters take part (a gradient, a state)
    model(x, t, cond).square().mean().backward()  # (1, 4, 8, 8) -> a scalar
    optimizer.step()
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def case(name: str, lora: bool, measure: bool) -> dict:
    """One row: parameters, trainable parameters and optimizer-state bytes (measured or counted)."""
    model = build(name, lora, "cpu" if measure else "meta")
    row = {"model": name, "method": f"LoRA r{LORA.rank} {LORA.targets}" if lora else "full fine-tune",
           "parameters": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable(model)),
           "optimizer_state_bytes": counted_state_bytes(model), "how": "counted"}
    if measure:
        measured = measured_state_bytes(model)
        assert measured == row["optimizer_state_bytes"], (measured, row["optimizer_state_bytes"])  # the count is right
        row["how"] = "measured"
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'model':9} {'method':24} {'parameters':>12} {'trainable':>12} {'optimizer state':>16}  how"]
    for r in rows:
        lines.append(f"{r['model']:9} {r['method']:24} {r['parameters']:>12,} {r['trainable']:>12,} "
                     f"{r['optimizer_state_bytes'] / 2**20:>13.1f} MiB  {r['how']}")
    return "\n".join(lines)


def rows(quick: bool = False) -> list[dict]:
    measure = {("DiT-B/2", False): True, ("DiT-B/2", True): True, ("DiT-XL/2", False): False, ("DiT-XL/2", True): not quick}
    return [case(name, lora, measure[name, lora]) for name in ("DiT-B/2", "DiT-XL/2") for lora in (False, True)]


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    found = rows(quick)
    print(table(found))
    entries = []
    for name in ("DiT-B/2", "DiT-XL/2"):
        full, lora = (r for r in found if r["model"] == name)
        ratio = full["optimizer_state_bytes"] / lora["optimizer_state_bytes"]
        entries.append({"name": f"lora_optimizer_state_{name.lower().replace('-', '_').replace('/', '')}", "ratio": round(ratio, 1),
                        "goal": GOAL, "better": "higher", "full": full, "lora": lora})
    return entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_memory", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="count DiT-XL/2's LoRA case too instead of measuring it")
    p.add_argument("--output", type=Path, default=Path("runs/benchmarks/lora_memory.json"))
    args = p.parse_args(argv)
    entries = run(quick=args.quick)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmarks": entries}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
