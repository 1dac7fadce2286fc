"""Run logging: ``metrics.jsonl`` always, plus wandb (offline by default) or TensorBoard, and the
throughput figures (samples/s, tokens/s, TFLOP/s, MFU when the device's peak is known).

Only the main process logs. Secrets never go into the logged config: keys that look like
credentials are dropped before the config reaches a tracker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.timing import clock

# Dense bf16 peak TFLOP/s of common accelerators (FLOPs = 2 x multiply-accumulates).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
_SECRET_WORDS = ("key", "token", "secret", "password")


@dataclass(kw_only=True)
class LoggingConfig:
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    project: str = "latent-diffusion"
    wandb_mode: Literal["offline", "online"] = "offline"  # online needs WANDB_API_KEY in the environment
    every: int = 10  # steps between metric lines
    peak_tflops: float | None = None  # per device; None = look the device name up in PEAK_TFLOPS

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1 (got {self.every})")


def without_secrets(obj):
    """A copy of a nested config dict without credential-looking keys."""
    if isinstance(obj, dict):
        return {k: without_secrets(v) for k, v in obj.items() if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(obj, list):
        return [without_secrets(v) for v in obj]
    return obj


def device_peak_tflops(cfg: LoggingConfig) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class Tracker:
    """Writes metric dicts to ``metrics.jsonl`` and the chosen tracker (main process only)."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config: dict, name: str, enabled: bool = True) -> None:
        self.enabled, self.cfg, self.backend = enabled, cfg, None
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        if cfg.logger == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self.backend = wandb.init(project=cfg.project, name=name, dir=str(run_dir), config=without_secrets(config), resume="allow")
        elif cfg.logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.cfg.logger == "wandb":
            self.backend.log(metrics, step=step)
        elif self.cfg.logger == "tensorboard":
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.backend.add_scalar(key, value, step)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.finish() if self.cfg.logger == "wandb" else self.backend.close()


class Throughput:
    """Samples/s, tokens/s, TFLOP/s and MFU over the interval since the last ``report``."""

    def __init__(self, flops_per_sample: float, tokens_per_sample: int, world_size: int, peak_tflops: float | None) -> None:
        self.flops, self.tokens, self.world, self.peak = flops_per_sample, tokens_per_sample, world_size, peak_tflops
        self.samples, self.start = 0, clock()

    def restart(self) -> None:
        """Count from now (after set-up and resume)."""
        self.samples, self.start = 0, clock()

    def add(self, samples: int) -> None:
        self.samples += samples

    def report(self) -> dict:
        elapsed = max(clock() - self.start, 1e-9)
        per_s = self.samples * self.world / elapsed  # all ranks
        tflops = 3 * self.flops * per_s / 1e12 / self.world  # training ≈ 3 × forward, per device
        out = {"samples_per_s": per_s, "tokens_per_s": per_s * self.tokens, "tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        self.samples, self.start = 0, clock()
        return out
