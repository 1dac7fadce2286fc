"""Cached latents against online encoding, side by side in one run (issue: frozen encoders…).

- ``cached_vs_online_step``: time of a training step (DiT-tiny, forward + backward + AdamW,
  batch 64) fed from latent shards, against the same step fed from image shards that encodes
  the batch online with the VAE + T5 + CLIP. Ratio = online / cached; goal >= 3.
- ``loader_vs_step``: samples/s the latent loader delivers (decoding in the main process, no
  workers: its bare cost) against samples/s the training step consumes on a batch already in
  memory. Goal >= 10: the loader must never be what the step waits for.
- ``encode_throughput``: samples/s of ``data_tools.encode`` over the same image shards
  (informational; ratio is samples/s, no goal).

The VAE has the demo autoencoder's architecture (``configs/autoencoder_demo.yaml``), randomly
initialised: speed does not depend on the weights.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.fixtures import demo_vae, image_shards
from data_tools import encode, make_encoders
from pipeline.data.images import image_loader
from pipeline.data.latents import latent_loader
from pipeline.data.stream import LoaderConfig
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.config import from_dict
from pipeline.diffusion.flow import flow_loss, sample_timesteps, TimestepConfig
from pipeline.models.dit import build_dit
from pipeline.training.dit import to_device

BATCH = 64


def build(folder: Path, count: int) -> tuple[Path, Path, dict]:
    """Image shards, the demo-sized VAE, tiny text encoders and the latent shards."""
    shards = image_shards(folder / "images", count)
    vae_dir = demo_vae(folder / "vae")
    make_encoders.main(["--output", str(folder / "encoders")])
    text = yaml.safe_load((folder / "encoders/encoders.yaml").read_text())
    cfg = {"vae": {"path": str(vae_dir)}, "text": text, "batch_size": BATCH}
    (folder / "encode.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    encode.main(["--input", str(shards), "--output", str(folder / "latents"), "--config", str(folder / "encode.yaml")])
    cfg["encode_samples_per_s"] = count / (time.perf_counter() - start)
    return shards, folder / "latents", cfg


def step_fn(model, optimizer):
    timesteps = TimestepConfig()

    def step(x0: torch.Tensor, cond: dict) -> None:
        x0, cond = to_device(x0, x0.device), {k: to_device(v, v.device) for k, v in cond.items()}  # as the trainer: float32
        t = sample_timesteps(x0.shape[0], timesteps)
        loss = flow_loss(model, x0, cond, t, torch.randn_like(x0)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def cached_steps(latents: Path, step, n: int) -> list[float]:
    times, loader = [], iter(latent_loader(latents, LoaderConfig(batch_size=BATCH)))
    for _ in range(n):
        start = time.perf_counter()
        batch = next(loader)
        step(batch["latent"], {k: batch[k] for k in ("t5", "t5_mask", "clip")})
        times.append(time.perf_counter() - start)
    return times


def loader_seconds(latents: Path, n: int) -> list[float]:
    """Seconds per batch of the latent loader alone."""
    times, loader = [], iter(latent_loader(latents, LoaderConfig(batch_size=BATCH)))
    next(loader)
    for _ in range(n):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return times


def step_seconds(latents: Path, step, n: int) -> list[float]:
    """Seconds per training step on one batch held in memory."""
    batch = next(iter(latent_loader(latents, LoaderConfig(batch_size=BATCH))))
    cond, times = {k: batch[k] for k in ("t5", "t5_mask", "clip")}, []
    for _ in range(n):
        start = time.perf_counter()
        step(batch["latent"], cond)
        times.append(time.perf_counter() - start)
    return times


def online_steps(shards: Path, vae: FrozenVAE, text: TextEncoders, step, n: int) -> list[float]:
    times, loader = [], iter(image_loader(shards, LoaderConfig(batch_size=BATCH)))
    for _ in range(n):
        start = time.perf_counter()
        batch = next(loader)
        with torch.no_grad():
            x0, cond = vae.encode(batch["image"]), text.encode(batch["caption"])
        step(x0, {k: cond[k] for k in ("t5", "t5_mask", "clip")})
        times.append(time.perf_counter() - start)
    return times


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    count, steps, rounds = (256, 5, 2) if quick else (512, 10, 3)
    with tempfile.TemporaryDirectory() as tmp:
        shards, latents, cfg = build(Path(tmp), count)
        vae = FrozenVAE(from_dict(VAEConfig, cfg["vae"]))
        text = TextEncoders(from_dict(TextEncodersConfig, cfg["text"]))
        torch.manual_seed(0)
        model = build_dit("DiT-tiny", in_channels=4, sample_size=8, text_dim=text.t5.width, clip_dim=text.clip.width)
        step = step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        cached_steps(latents, step, 2)  # warm-up
        times = {"cached": [], "online": [], "loader": [], "step": []}
        for _ in range(rounds):
            times["cached"] += cached_steps(latents, step, steps)
            times["online"] += online_steps(shards, vae, text, step, steps)
            times["loader"] += loader_seconds(latents, steps)
            times["step"] += step_seconds(latents, step, steps)
    median = {k: statistics.median(v) for k, v in times.items()}
    details = {"batch": BATCH, "ms_per_batch": {k: round(v * 1000, 1) for k, v in median.items()}, "steps_each": len(times["cached"])}
    rates = {"loader_samples_per_s": round(BATCH / median["loader"], 1), "step_samples_per_s": round(BATCH / median["step"], 1)}
    return [
        {"name": "cached_vs_online_step", "ratio": round(median["online"] / median["cached"], 3), "goal": 3.0, "better": "higher", **details},
        {"name": "loader_vs_step", "ratio": round(median["step"] / median["loader"], 2), "goal": 10.0, "better": "higher", **rates},
        {"name": "encode_throughput", "ratio": round(cfg["encode_samples_per_s"], 1), "goal": 0.0, "better": "higher", "unit": "samples/s", "samples": count},
    ]


if __name__ == "__main__":
    print(run(quick=True))
