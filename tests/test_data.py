"""pipeline.data: padding and masks, disjoint ranks/workers, seeded order, exact resume, too few shards."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.latents import latent_loader, pad_sequences
from pipeline.data.stream import LoaderConfig
from pipeline.data.shards import shard_name, stats_path, write_json_atomic, write_tar_atomic


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_latent_shards(folder: Path, shards: int, per_shard: int | list[int], stats: bool = False) -> list[str]:
    """Tiny latent shards (``per_shard`` samples each, or one count per shard: 0 writes an empty
    tar, as encode does when every sample failed); sample k has t5 length 1 + k % 5 and latent
    filled with k; ``stats``: a ``_stats.json`` beside each, as encode writes."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    first = [sum(counts[:s]) for s in range(len(counts))]
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            k = first[s] + i
            members = {
                "latent.npy": npy_bytes(np.full((4, 2, 2), k, np.float16)),
                "t5.npy": npy_bytes(np.full((1 + k % 5, 8), k, np.float16)),
                "clip.npy": npy_bytes(np.full((6,), k, np.float16)),
                "txt": f"caption {k}".encode(),
            }
            samples.append((f"s{k:05d}", members))
        if stats:
            write_json_atomic(stats_path(folder / shard_name("latents", s)), {"successes": count})
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


# ---------------------------------------------------------------------------- empty shards


@pytest.mark.parametrize("stats", [True, False], ids=["stats-say-0", "no-stats"])
def test_an_empty_shard_is_skipped_and_counted_on_every_rank(tmp_path, stats):
    """Sizes [0, 5, 5, 5] on 4 ranks: each epoch one stream's group is the empty shard; it goes on
    to the next epoch instead of failing, and every sample still comes."""
    shards = write_latent_shards(tmp_path, 4, [0, 5, 5, 5], stats=stats)
    cfg = LoaderConfig(batch_size=2)
    loaders = [latent_loader(shards, cfg, rank=rank, world_size=4) for rank in range(4)]
    seen = [k for loader in loaders for k in keys(itertools.islice(loader, 10))]  # 20 samples a rank: several epochs
    assert set(seen) == {f"s{k:05d}" for k in range(15)}
    assert all(loader.report()["shards_empty"] == 1 and loader.report()["epoch"] >= 1 for loader in loaders)


def test_one_empty_shard_among_16_streams_for_200_epochs(tmp_path):
    """16 shards, 16 streams (4 ranks × 4 workers), one empty shard: every stream's position maps
    to a sample of its own groups for 200 epochs, the empty one passed over; a stream reads on."""
    counts = [3] * 16
    counts[5] = 0
    shards = write_latent_shards(tmp_path, 16, counts, stats=True)
    cfg = LoaderConfig(batch_size=3, num_workers=4)
    schedule = latent_loader(shards, cfg, rank=0, world_size=4).schedule
    for stream in range(16):
        offset, epochs = 0, []
        while True:
            epoch, position, k = schedule.seek(stream, offset)
            if epoch >= 200:
                break
            group = schedule.groups(epoch, stream)[position]
            assert 5 not in group and k < 3 * len(group)  # never lands in the empty shard
            epochs.append(epoch)
            offset += 1
        assert len(set(epochs)) >= 180  # ~one epoch in 16 holds only the empty shard for this stream
    loader = latent_loader(shards, LoaderConfig(batch_size=3), rank=1, world_size=16)
    assert len(keys(itertools.islice(loader, 40))) == 120


def test_only_empty_shards_is_one_clear_error(tmp_path):
    shards = write_latent_shards(tmp_path, 3, [0, 0, 0], stats=True)
    with pytest.raises(ValueError, match="all 3 shard\\(s\\) are empty"):
        latent_loader(shards, LoaderConfig(batch_size=2))


def test_an_empty_shard_in_a_folder_and_over_http(tmp_path):
    """The same loader from a folder (its dataset.json's shard_samples) and its URL (no stats files)."""
    from tests.shard_server import serving

    folder = tmp_path / "latents"
    shards = write_latent_shards(folder, 4, [5, 0, 5, 5])
    (folder / "dataset.json").write_text(json.dumps({"shards": [Path(s).name for s in shards],
                                                      "shard_samples": {Path(s).name: n for s, n in zip(shards, [5, 0, 5, 5])}}))
    local = keys(itertools.islice(latent_loader(folder, LoaderConfig(batch_size=3), rank=0, world_size=2), 6))
    (folder / "dataset.json").write_text(json.dumps({"shards": [Path(s).name for s in shards]}))
    with serving(tmp_path) as server:
        loader = latent_loader(server.url + "latents/", LoaderConfig(batch_size=3), rank=0, world_size=2)
        assert keys(itertools.islice(loader, 6)) == local and loader.report()["shards_empty"] == 1


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                                   np.array(3.5, dtype=np.float32), np.zeros((0, 8), dtype=np.float16), np.arange(5, dtype=">i4"),
                                   np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", "<f8")])])
def test_npy_views_the_member_bytes_and_decodes_as_np_load(array):
    """``npy`` reads the header (cached) and views the bytes: the same array ``np.load`` gives, no copy."""
    from pipeline.data.stream import npy

    for version in ((1, 0), (2, 0)):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version)
        data = bytearray(buffer.getvalue())
        decoded = npy(data)
        assert decoded.dtype == array.dtype and decoded.shape == array.shape and np.array_equal(decoded, array)
        if array.size:
            assert np.shares_memory(decoded, np.frombuffer(data, dtype=np.uint8))  # a view: written once, into the batch
        from_bytes = npy(bytes(data))  # immutable bytes: a writable copy (tensors made from it may be written in place)
        assert np.array_equal(from_bytes, array) and from_bytes.flags.writeable


@pytest.mark.parametrize("key", ["000001000042", "k" * 95, "k" * 96, "k" * 120, "clé"])
def test_tar_writer_matches_tarfile_byte_for_byte(tmp_path, key):
    """``write_tar_atomic`` patches ustar headers into a template: the file must equal what
    ``tarfile`` (PAX format, the fixed metadata) writes, names at and past 100 bytes and non-ASCII
    ones included (those take tarfile's pax headers), and read back in webdataset."""
    import tarfile

    import webdataset as wds

    from pipeline.data.shards import _tar_info

    rng = np.random.default_rng(len(key))
    samples = [(f"{key}{i}", {ext: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for ext, size in zip(
        ("jpg", "txt", "latent.npy"), (0, 511, 512) if i == 0 else (513, 1, 10_240 * i), strict=True)}) for i in range(3)]
    write_tar_atomic(tmp_path / "fast.tar", samples)
    with tarfile.open(tmp_path / "tarfile.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for sample_key, members in samples:
            for ext in sorted(members):
                tar.addfile(_tar_info(f"{sample_key}.{ext}", len(members[ext])), io.BytesIO(members[ext]))
    assert (tmp_path / "fast.tar").read_bytes() == (tmp_path / "tarfile.tar").read_bytes()
    read = {s["__key__"]: {k: s[k] for k in ("jpg", "txt", "latent.npy")} for s in wds.WebDataset(str(tmp_path / "fast.tar"), shardshuffle=False)}
    assert read == dict(samples)


def test_npy_of_an_object_array_is_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object))
    from pipeline.data.stream import npy

    with pytest.raises(ValueError):
        npy(bytearray(buffer.getvalue()))


def test_in_process_batch_memory_is_reused_only_once_the_trainer_drops_it(tmp_path, monkeypatch):
    """Without workers, a batch's large tensors reuse a dropped batch's memory, never a held one's,
    and give the batches a fresh allocation gives; the pool is emptied when the loader stops."""
    from pipeline.data.stream import LocalBatchMemory

    monkeypatch.setattr(LocalBatchMemory, "MIN_BYTES", 64)  # the test's batches are small
    shards = write_latent_shards(tmp_path, 4, 24)
    batches = itertools.islice(latent_loader(shards, LoaderConfig(batch_size=4)), 20)
    reference = [(b["key"], b["t5"].clone()) for b in batches]
    loader = iter(latent_loader(shards, LoaderConfig(batch_size=4)))
    held, pointers = [], []
    for i in range(20):
        batch = next(loader)
        assert batch["key"] == reference[i][0] and torch.equal(batch["t5"], reference[i][1])
        pointers.append(batch["t5"].data_ptr())
        if i % 4 == 0:  # kept while later batches are built
            held.append((i, batch, batch["t5"].clone()))
        del batch
    assert LocalBatchMemory.kept and LocalBatchMemory.loaders == 1
    for i, batch, copy in held:
        assert torch.equal(batch["t5"], copy)
        assert pointers[i] not in pointers[i + 1 :]  # held memory was not lent again
    assert len(set(pointers)) < len(pointers)  # dropped memory was reused
    loader.close()
    assert LocalBatchMemory.loaders == 0 and not LocalBatchMemory.kept


def _many_tensors(samples: list[dict]) -> dict:
    """A collate that builds its batch without ``batch_tensor`` (as the image loaders do), in 200
    shared tensors: 200 storages for the main process to give back per batch."""
    return {"key": [s["key"] for s in samples], **{f"t{i}": torch.full((1,), i) for i in range(200)}}


def test_give_backs_of_batches_a_worker_did_not_build_never_block_the_trainer(tmp_path):
    """The main process gives every shared batch storage back to its worker; a worker whose collate
    never asks for batch memory (the image loaders) must still read them, or the pipe fills
    (~64 KiB: ~4,000 give-backs) and the trainer blocks for good (the demo's autoencoder hung at
    step 3,441). 60 batches of 200 storages are 12,000 give-backs, three pipes' worth."""
    import threading

    from pipeline.data.stream import ShardLoader

    shards = write_latent_shards(tmp_path, 4, 24)
    loader = ShardLoader(shards, LoaderConfig(batch_size=4, num_workers=1, prefetch_factor=2),
                         lambda raw: {"key": raw["__key__"]}, _many_tensors)
    keys: list = []
    reader = threading.Thread(target=lambda: keys.extend(b["key"] for b in itertools.islice(loader, 60)), daemon=True)
    reader.start()
    reader.join(timeout=90)  # blocked for good in a give-back, it would never end: fail, do not hang
    assert not reader.is_alive(), f"the loader blocked giving batch memory back after {len(keys)} batches"
    assert len(keys) == 60 and all(len(k) == 4 for k in keys)


def test_worker_batch_memory_is_reused_only_once_the_trainer_drops_it(tmp_path):
    """A worker reuses a batch's shared memory after the main process freed it, never while a batch is held."""
    from pipeline.data.stream import _inode

    shards = write_latent_shards(tmp_path, 4, 24)
    loader = iter(latent_loader(shards, LoaderConfig(batch_size=4, num_workers=2, prefetch_factor=2)))
    held, inodes = [], []
    for i in range(20):
        batch = next(loader)
        inodes.append(_inode(batch["t5"].untyped_storage()))
        if i % 4 == 0:  # kept while later batches are built
            held.append((i, batch, {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}))
        del batch
    for i, batch, copy in held:
        assert all(torch.equal(batch[k], v) for k, v in copy.items())
        assert inodes[i] not in inodes[i + 1 :]  # held memory was not lent again
    assert len(set(inodes)) < len(inodes)  # released memory came back to the workers
