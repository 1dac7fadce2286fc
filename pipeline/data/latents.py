"""Latent shards (written by ``data_tools.encode``) -> training batches.

A latent sample holds ``KEY.latent.npy`` (C, h, w), ``KEY.t5.npy`` (L, D) unpadded,
``KEY.clip.npy`` (D,), optionally ``KEY.clip_tokens.npy`` (L', D'), ``KEY.txt`` and
``KEY.json``; a paired sample (``data_tools.pairs`` then ``data_tools.encode``) also holds
``KEY.src_latent.npy`` (C, h, w), its source image's latent, stacked like the latent.
The collate pads the variable-length token sequences and returns their masks.

Batches keep the stored dtype (fp16 as ``data_tools.encode`` writes by default): half the bytes
to decode, pad and hand from a data worker to the trainer, which casts on the device (the model
casts its inputs; the loss's latents are made float32 there). In a data worker the batch is
built straight in shared memory, as torch's ``default_collate`` does, so handing it over copies
nothing, and that memory is reused once the trainer drops the batch (``pipeline.data.stream.BatchMemory``).
Decoding views the tar members' bytes (``pipeline.data.stream.npy``): each sample is copied once,
into its place in the batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.stream import LoaderConfig, ShardLoader, batch_tensor, npy
from pipeline.data.paths import map_paths, resolved_from
from pipeline.data.remote import SourceNotFound, dataset_json_of, is_url, list_shards, read_json

SEQUENCES = ("t5", "clip_tokens")  # variable length: padded in a batch, with a mask
VECTORS = ("latent", "clip", "src_latent")  # fixed shape: stacked


def decode_latent_sample(raw: dict) -> dict | None:
    """Raw tar members -> tensors in their stored dtype; ``None`` (skipped) without a latent."""
    if "latent.npy" not in raw:
        return None
    sample = {"key": raw["__key__"], "caption": raw.get("txt", b"").decode("utf-8")}
    for name in VECTORS + SEQUENCES:
        if f"{name}.npy" in raw:
            sample[name] = torch.from_numpy(npy(raw[f"{name}.npy"]))
    return sample


def pad_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, D)] -> padded (B, L_max, D) with zeros, mask (B, L_max) True on real tokens."""
    longest = max(s.shape[0] for s in sequences)
    padded = batch_tensor((len(sequences), longest, sequences[0].shape[1]), sequences[0].dtype)
    mask = batch_tensor((len(sequences), longest), torch.bool).zero_()
    for i, s in enumerate(sequences):
        padded[i, : s.shape[0]] = s
        padded[i, s.shape[0] :] = 0
        mask[i, : s.shape[0]] = True
    return padded, mask


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` into a :func:`batch_tensor`."""
    return torch.stack(tensors, out=batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))


def collate_latents(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    for name in VECTORS:
        if name in samples[0]:
            batch[name] = stack([s[name] for s in samples])  # (B, ...)
    for name in SEQUENCES:
        if name in samples[0]:
            batch[name], batch[f"{name}_mask"] = pad_sequences([s[name] for s in samples])
    return batch


def latent_bucket(sample: dict) -> tuple[int, ...]:
    """A latent sample's bucket: its shape (C, h, w); a batch holds one."""
    return tuple(sample["latent"].shape)


def latent_loader(shards: str | Path | list[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                  sizes: list[int] | None = None, held_out: list[int] | None = None) -> ShardLoader:
    """Endless, resumable batches over a latent-shard folder (or an explicit shard list); each
    batch holds latents of one shape (aspect-ratio buckets, ``pipeline.data.buckets``). ``sizes``:
    the shards' sample counts when the caller found them (``pipeline.data.sizes.sizes_once``);
    ``held_out``: leading samples of each shard never trained on (``pipeline.data.stream.held_out_split``)."""
    return ShardLoader(shard_list(shards), cfg, decode_latent_sample, collate_latents, rank, world_size, latent_bucket, sizes, held_out)


def shard_list(shards: str | Path | list[str]) -> list[str]:
    """The shards of a source: a folder (local or URL), a URL pattern, ``pipe:``, a shard, or a list
    (``pipeline.data.remote.list_shards``); ``ValueError`` when there are none."""
    return list_shards(shards)


def latent_meta(folder: str | Path | list[str], meta: str | Path | None = None) -> dict:
    """The dataset.json of a latent folder (local or URL, or of a pattern's / shard list's folder),
    or the one ``meta`` names (for sources that have no folder: ``pipe:``); paths in it are resolved
    (``pipeline.data.paths``) when it is local, kept as written when remote. ``FileNotFoundError``
    (one line) when there is none."""
    try:
        where = str(meta) if meta is not None else dataset_json_of(folder)
    except ValueError as err:  # a pipe: source
        raise FileNotFoundError(f"{err}: give data.meta=PATH_OR_URL of the latent folder's dataset.json") from None
    try:
        found = read_json(where)
    except SourceNotFound:
        if meta is not None:
            raise FileNotFoundError(f"data.meta: {meta} not found") from None
        raise FileNotFoundError(f"{folder} has no dataset.json: is it a latent folder written by data_tools.encode?") from None
    return found if is_url(where) else map_paths(found, resolved_from(Path(where).parent))
