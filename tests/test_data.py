"""pipeline.data: padding and masks, disjoint ranks/workers, seeded order, exact resume, too few shards."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.latents import latent_loader, pad_sequences
from pipeline.data.stream import LoaderConfig
from pipeline.data.shards import shard_name, write_tar_atomic


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_latent_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    """Tiny latent shards; sample k has t5 length 1 + k % 5 and latent filled with k."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            k = s * per_shard + i
            members = {
                "latent.npy": npy_bytes(np.full((4, 2, 2), k, np.float16)),
                "t5.npy": npy_bytes(np.full((1 + k % 5, 8), k, np.float16)),
                "clip.npy": npy_bytes(np.full((6,), k, np.float16)),
                "txt": f"caption {k}".encode(),
            }
            samples.append((f"s{k:05d}", members))
        write_tar_atomic(folder / shard_name("latents", s), samples)
    return sorted(str(p) for p in folder.glob("*.tar"))


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_pad_sequences_and_mask():
    padded, mask = pad_sequences([torch.ones(2, 3), torch.ones(4, 3) * 2])
    assert padded.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert (padded[0, 2:] == 0).all() and (padded[1] == 2).all()


def test_batches_pad_text_and_keep_values(tmp_path):
    loader = latent_loader(write_latent_shards(tmp_path, 2, 10), LoaderConfig(batch_size=5))
    batch = next(iter(loader))
    assert batch["latent"].shape == (5, 4, 2, 2) and batch["latent"].dtype == torch.float16  # as stored: cast on the device
    lengths = batch["t5_mask"].sum(1)
    for i, key in enumerate(batch["key"]):
        k = int(key[1:])
        assert lengths[i] == 1 + k % 5 and (batch["t5"][i, : lengths[i]] == k).all()
        assert (batch["t5"][i, lengths[i] :] == 0).all() and batch["caption"][i] == f"caption {k}"
    assert set(batch) >= {"latent", "t5", "t5_mask", "clip", "caption", "key"}


def test_a_worker_builds_batches_in_shared_memory(tmp_path):
    """Handing a batch from a data worker to the trainer moves no bytes: it was built in shared memory."""
    batch = next(iter(latent_loader(write_latent_shards(tmp_path, 2, 10), LoaderConfig(batch_size=5, num_workers=1))))
    assert batch["latent"].is_shared() and batch["t5"].is_shared() and batch["clip"].is_shared()
    reference = next(iter(latent_loader(sorted(str(p) for p in tmp_path.glob("*.tar")), LoaderConfig(batch_size=5))))
    assert torch.equal(batch["t5"], reference["t5"]) and batch["key"] == reference["key"]


def test_order_is_seeded_and_changes_with_epoch(tmp_path):
    shards = write_latent_shards(tmp_path, 4, 6)
    first = keys(itertools.islice(latent_loader(shards, LoaderConfig(batch_size=6, seed=1)), 8))
    again = keys(itertools.islice(latent_loader(shards, LoaderConfig(batch_size=6, seed=1)), 8))
    other = keys(itertools.islice(latent_loader(shards, LoaderConfig(batch_size=6, seed=2)), 8))
    assert first == again and first != other
    assert sorted(first[:24]) == sorted(first[24:])  # two full epochs ...
    assert first[:24] != first[24:]  # ... in different orders


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_see_disjoint_data(tmp_path, workers):
    shards = write_latent_shards(tmp_path, 8, 5)
    cfg = LoaderConfig(batch_size=5, num_workers=workers)
    per_rank = [keys(itertools.islice(latent_loader(shards, cfg, rank=r, world_size=2), 4)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{k:05d}" for k in range(40))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_next_batches(tmp_path, workers):
    shards = write_latent_shards(tmp_path, 6, 7)  # batches straddle shard and epoch ends
    cfg = LoaderConfig(batch_size=4, num_workers=workers, seed=3)
    reference = keys(itertools.islice(latent_loader(shards, cfg), 25))
    stopped = latent_loader(shards, cfg)
    seen = keys(itertools.islice(stopped, 11))
    state = stopped.state_dict()
    resumed = latent_loader(shards, cfg)
    resumed.load_state_dict(state)
    assert seen + keys(itertools.islice(resumed, 14)) == reference
    assert state["samples_seen"] == 44 and state["epoch"] in (0, 1)


def test_resume_refuses_another_worker_count(tmp_path):
    shards = write_latent_shards(tmp_path, 4, 4)
    loader = latent_loader(shards, LoaderConfig(batch_size=2))
    next(iter(loader))
    other = latent_loader(shards, LoaderConfig(batch_size=2, num_workers=2))
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(loader.state_dict())


def test_too_few_shards_is_an_error_or_resamples(tmp_path):
    shards = write_latent_shards(tmp_path, 2, 4)
    with pytest.raises(ValueError, match="fewer than the 4 streams"):
        latent_loader(shards, LoaderConfig(batch_size=2), rank=0, world_size=4)
    cfg = LoaderConfig(batch_size=2, on_too_few_shards="resample")
    for rank in range(4):  # every rank still gets data, no hang
        assert len(keys(itertools.islice(latent_loader(shards, cfg, rank=rank, world_size=4), 6))) == 12
