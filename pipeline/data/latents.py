"""Latent shards (written by ``data_tools.encode``) -> training batches.

A latent sample holds ``KEY.latent.npy`` (C, h, w), ``KEY.t5.npy`` (L, D) unpadded,
``KEY.clip.npy`` (D,), optionally ``KEY.clip_tokens.npy`` (L', D'), ``KEY.txt`` and
``KEY.json``. The collate pads the variable-length token sequences and returns their masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.data.stream import LoaderConfig, ShardLoader, npy
from pipeline.data.paths import map_paths, resolved_from
from pipeline.data.shards import complete_shards

SEQUENCES = ("t5", "clip_tokens")  # variable length: padded in a batch, with a mask
VECTORS = ("latent", "clip")  # fixed shape: stacked


def decode_latent_sample(raw: dict) -> dict | None:
    """Raw tar members -> float32 tensors; ``None`` (skipped) without a latent."""
    if "latent.npy" not in raw:
        return None
    sample = {"key": raw["__key__"], "caption": raw.get("txt", b"").decode("utf-8")}
    for name in VECTORS + SEQUENCES:
        if f"{name}.npy" in raw:
            sample[name] = torch.from_numpy(npy(raw[f"{name}.npy"]).astype("float32"))
    return sample


def pad_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, D)] -> padded (B, L_max, D) with zeros, mask (B, L_max) True on real tokens."""
    longest = max(s.shape[0] for s in sequences)
    padded = sequences[0].new_zeros(len(sequences), longest, sequences[0].shape[1])
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, s in enumerate(sequences):
        padded[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return padded, mask


def collate_latents(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    for name in VECTORS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])  # (B, ...)
    for name in SEQUENCES:
        if name in samples[0]:
            batch[name], batch[f"{name}_mask"] = pad_sequences([s[name] for s in samples])
    return batch


def latent_loader(shards: str | Path | list[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """Endless, resumable batches over a latent-shard folder (or an explicit shard list)."""
    return ShardLoader(shard_list(shards), cfg, decode_latent_sample, collate_latents, rank, world_size)


def shard_list(shards: str | Path | list[str]) -> list[str]:
    """A folder -> its complete shards; a list is taken as given."""
    if isinstance(shards, (str, Path)) and Path(shards).is_dir():
        found = [str(p) for p in complete_shards(Path(shards))]
        if not found:
            raise ValueError(f"no shards in {shards}")
        return found
    return [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]


def latent_meta(folder: Path) -> dict:
    """The latent folder's dataset.json, its local paths resolved (``pipeline.data.paths``)."""
    path = Path(folder) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no dataset.json: is it a latent folder written by data_tools.encode?")
    return map_paths(json.loads(path.read_text()), resolved_from(folder))
