"""Aspect-ratio buckets (``pipeline.data.buckets``) and the streaming, bucketed loader
(``pipeline.data.stream``): tables, assignment, one shape per batch, nothing dropped, exact resume
with buckets waiting, a shard that ends early."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.encode import npy_bytes
from pipeline.data.buckets import Bucketing, bucket_table, fit_to_bucket, load_table, nearest_bucket, parse_bucket
from pipeline.data.latents import latent_loader
from pipeline.data.shards import shard_name, stats_path, write_json_atomic, write_tar_atomic
from pipeline.data.stream import LoaderConfig, buffer_order

SHAPES = [(4, 2, 2), (4, 2, 4), (4, 4, 2)]  # square, landscape, portrait latents


def write_bucketed_shards(folder: Path, shards: int, per_shard: int, weights=(6, 3, 1)) -> list[str]:
    """Latent shards whose sample k has shape SHAPES[j] drawn with ``weights`` (the portrait bucket
    is rare); the latent is filled with k, the key is ``s{k:05d}``; stats files as encode writes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    p = np.array(weights) / sum(weights)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            k = s * per_shard + i
            shape = SHAPES[rng.choice(len(SHAPES), p=p)]
            members = {
                "latent.npy": npy_bytes(np.full(shape, k, np.float16)),
                "t5.npy": npy_bytes(np.full((1 + k % 3, 8), k, np.float16)),
                "clip.npy": npy_bytes(np.full((6,), k, np.float16)),
                "txt": f"caption {k}".encode(),
            }
            samples.append((f"s{k:05d}", members))
        path = folder / shard_name("latents", s)
        write_json_atomic(stats_path(path), {"successes": per_shard})
        write_tar_atomic(path, samples)
    return sorted(str(p) for p in folder.glob("*.tar"))


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ---------------------------------------------------------------------------- tables


@pytest.mark.parametrize("base,step", [(32, 8), (256, 16), (512, 32), (1024, 64)])
def test_bucket_table_is_symmetric_whole_steps_about_base_squared(base, step):
    table = bucket_table(base, step)
    assert (base, base) in table
    for w, h in table:
        assert w % step == 0 and h % step == 0
        assert (h, w) in table
        assert max(w / h, h / w) <= 4
        # within one step of the exact height for its width (or its twin's)
        assert min(abs(w * h - base * base) / (w * step), abs(w * h - base * base) / (h * step)) <= 0.5 + 1e-9


def test_bucket_table_refuses_a_base_off_the_step():
    with pytest.raises(ValueError, match="multiple of the step"):
        bucket_table(36, 8)


def test_nearest_bucket_and_fit():
    table = bucket_table(32, 8)
    assert nearest_bucket(100, 100, table) == (32, 32)
    assert nearest_bucket(200, 100, table) == (48, 24)
    assert nearest_bucket(100, 200, table) == (24, 48)
    image = Image.new("RGB", (120, 50), (255, 0, 0))  # scaled by 0.48: a 100 x 50 centre crop
    image.paste((0, 0, 255), (0, 0, 6, 50))  # a blue strip on the left edge: cropped away
    fitted = fit_to_bucket(image, (48, 24))
    assert fitted.size == (48, 24)
    assert np.asarray(fitted)[:, :, 2].max() < 60  # the centre crop dropped the strip


def test_yaml_table(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text("buckets: [[64, 32], '32x64', [48, 48]]\n")
    assert load_table(path, 16) == [(32, 64), (48, 48), (64, 32)]
    path.write_text("[[64, 30]]\n")
    with pytest.raises(ValueError, match="multiples of 16"):
        load_table(path, 16)
    assert Bucketing.build(None, None, 8) is None
    assert parse_bucket("48x24") == (48, 24)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_bucket("48by24")


# ---------------------------------------------------------------------------- shuffle buffer


@pytest.mark.parametrize("n,buffer", [(1, 4), (10, 3), (50, 50), (50, 200), (300, 16)])
def test_buffer_order_is_a_permutation_that_a_bounded_reader_can_serve(n, buffer):
    order = buffer_order(n, buffer, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(n))
    assert all(order[k] < buffer + k for k in range(n))  # read before buffer + k: memory <= buffer


def test_buffer_order_with_a_large_buffer_is_uniform():
    first = Counter(int(buffer_order(4, 8, np.random.default_rng(s))[0]) for s in range(4000))
    assert all(abs(first[i] / 4000 - 0.25) < 0.03 for i in range(4))


# ---------------------------------------------------------------------------- the bucketed loader


def test_every_batch_is_one_shape_and_nothing_is_dropped(tmp_path):
    shards = write_bucketed_shards(tmp_path, 4, 25)
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=7, seed=3)
    loader = latent_loader(shards, cfg)
    seen = Counter()
    for batch in itertools.islice(loader, 100):  # 400 samples: about 4 epochs of 100
        assert len({tuple(x.shape) for x in batch["latent"]}) == 1
        assert all(float(x.flatten()[0]) == int(k[1:]) for x, k in zip(batch["latent"], batch["key"]))  # sample intact
        seen.update(batch["key"])
    assert len(seen) == 100  # every sample, rare bucket included
    assert min(seen.values()) >= 3 and max(seen.values()) <= 5
    assert loader.state_dict()["samples_waiting"] < 3 * cfg.batch_size


def test_ranks_and_workers_see_disjoint_samples_within_an_epoch(tmp_path):
    shards = write_bucketed_shards(tmp_path, 8, 12)
    cfg = LoaderConfig(batch_size=3, num_workers=2, shuffle_buffer=5)
    first = [keys(itertools.islice(latent_loader(shards, cfg, rank=r, world_size=2), 6)) for r in range(2)]
    together = first[0] + first[1]  # 36 of the 96 samples
    assert len(together) == len(set(together)) == 36


def test_exact_resume_mid_epoch_with_waiting_buckets_2_workers_2_ranks(tmp_path):
    shards = write_bucketed_shards(tmp_path, 8, 15)
    cfg = LoaderConfig(batch_size=3, num_workers=2, shuffle_buffer=4, seed=5)
    for rank in range(2):
        reference = list(itertools.islice(latent_loader(shards, cfg, rank, 2), 40))
        stopped = latent_loader(shards, cfg, rank, 2)
        before = list(itertools.islice(stopped, 13))
        state = json.loads(json.dumps(stopped.state_dict()))  # as a checkpoint stores it
        assert state["waiting"], "the test must stop with samples waiting in partial buckets"
        resumed = latent_loader(shards, cfg, rank, 2)
        resumed.load_state_dict(state)
        after = list(itertools.islice(resumed, 27))
        assert keys(before + after) == keys(reference)
        for a, b in zip(before + after, reference):
            assert (a["latent"] == b["latent"]).all() and (a["t5_mask"] == b["t5_mask"]).all()


def test_a_shard_that_ends_early_is_counted_not_hung(tmp_path):
    shards = write_bucketed_shards(tmp_path, 2, 10, weights=(1, 0, 0))
    write_json_atomic(stats_path(Path(shards[0])), {"successes": 14})  # the tar holds 10
    loader = latent_loader(shards, LoaderConfig(batch_size=4, shuffle_buffer=3))
    got = keys(itertools.islice(loader, 10))  # 40 samples: the 20 real ones twice
    assert Counter(got) == Counter({f"s{k:05d}": 2 for k in range(20)})
    assert loader.skipped["missing"] == 8  # 4 listed but absent, per epoch
    assert math.isfinite(loader.state_dict()["epoch"])


def test_samples_beyond_a_shards_recorded_size_are_counted(tmp_path):
    shards = write_bucketed_shards(tmp_path, 2, 10, weights=(1, 0, 0))
    write_json_atomic(stats_path(Path(shards[0])), {"successes": 6})  # the tar holds 10
    loader = latent_loader(shards, LoaderConfig(batch_size=4, shuffle_buffer=3))
    got = keys(itertools.islice(loader, 8))  # 32 samples: two epochs of the 16 recorded ones
    assert Counter(got) == Counter({f"s{k:05d}": 2 for k in [*range(6), *range(10, 20)]})
    assert loader.skipped["beyond_recorded_size"] == 8  # 4 in the tar but not in its stats, per epoch
    assert loader.report()["samples_skipped"] == 8


# ---------------------------------------------------------------------------- end to end


def test_encode_buckets_record_shapes_histogram_and_per_sample_bucket(bucketed_latents):
    from pipeline.data.shards import iter_samples
    from pipeline.data.latents import decode_latent_sample, shard_list

    meta = json.loads((bucketed_latents / "dataset.json").read_text())
    histogram = meta["buckets"]
    assert set(histogram) == {"24x48", "32x32", "48x24"} and sum(b["samples"] for b in histogram.values()) == 36
    assert histogram["48x24"]["latent_shape"] == [4, 6, 12] and meta["latent_shape"] == [4, 8, 8]
    seen = Counter()
    for raw in iter_samples(shard_list(bucketed_latents)):
        bucket = json.loads(raw["json"])["bucket"]
        assert list(decode_latent_sample(raw)["latent"].shape) == histogram[bucket]["latent_shape"]
        seen[bucket] += 1
    assert {k: v["samples"] for k, v in histogram.items()} == dict(seen)


def test_training_on_buckets_resumes_exactly_and_samples_any_bucket(bucketed_latents, tmp_path, capsys):
    from pipeline import sample, train

    base = [f"data.latents={bucketed_latents}", "deepspeed.enabled=false", "model.overrides={depth: 1}", "data.loader.batch_size=4",
            "data.loader.shuffle_buffer=5", "sampling.steps=2", "timesteps.shift=auto", "timesteps.shift_base_tokens=16",
            "checkpoint.every=3", "logging.every=1", "steps=6"]
    assert train.main([*base, f"output_dir={tmp_path}", "run=whole"]) == 0
    assert train.main([*base, f"output_dir={tmp_path}", "run=cut", "steps=3"]) == 0
    assert train.main([*base, f"output_dir={tmp_path}", "run=cut"]) == 0  # resumes at step 3
    losses = [[m["loss"] for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
              for run in ("whole", "cut")]
    assert losses[0][-3:] == losses[1][-3:]
    info = json.loads((tmp_path / "whole/model/model_index.json").read_text())["info"]
    assert info["timesteps"] == {"shift": "auto", "shift_base_tokens": 16} and set(info["buckets"]) == {"24x48", "32x32", "48x24"}
    out = tmp_path / "wide.png"
    assert sample.main(["--model", str(tmp_path / "whole/model"), "--prompt", "a red circle", "--steps", "2", "--width", "48",
                        "--height", "24", "--shift", "auto", "--output", str(out)]) == 0
    with pytest.raises(SystemExit):
        sample.main(["--model", str(tmp_path / "whole/model"), "--prompt", "x", "--width", "44", "--output", str(out)])
    assert "multiples of 8" in capsys.readouterr().err


def test_dry_run_prints_the_bucket_histogram(bucketed_latents, capsys):
    from pipeline import train

    assert train.main([f"data.latents={bucketed_latents}", "deepspeed.enabled=false", "data.loader.batch_size=4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "buckets  3" in out and "48x24" in out and "18 tokens/sample" in out


def test_preview_pairs_bucketed_latents_with_their_originals(bucketed_latents, tmp_path):
    from data_tools import preview_latents

    result = preview_latents.preview(bucketed_latents, tmp_path / "preview.png", count=9)
    assert result["paired"] and result["samples"] == 9 and (tmp_path / "preview.png").is_file()
    _, samples, pixels = preview_latents.decode_first(bucketed_latents, 9)  # each latent decoded at its own bucket's size
    assert [tuple(p.shape) for p in pixels] == [(3, 4 * s["latent"].shape[1], 4 * s["latent"].shape[2]) for s in samples]
    assert len({tuple(p.shape) for p in pixels}) == 3


def test_evaluate_at_a_bucket_size_skips_the_square_analyser(teacher_dir, image_shards, tmp_path, capsys):
    from pipeline import evaluate

    args = ["--model", str(teacher_dir), "--reference", str(image_shards), "--count", "2", "--steps", "1", "--batch-size", "2"]
    assert evaluate.main([*args, "--width", "48", "--height", "24", "--shift", "auto", "--output", str(tmp_path / "wide")]) == 0
    summary = json.loads((tmp_path / "wide/summary.json").read_text())
    assert "square" in summary["skipped"]["adherence"] and summary["shift"] == "auto"
    assert evaluate.main([*args, "--width", "44", "--output", str(tmp_path / "bad")]) == 2
    assert "multiples of 8" in capsys.readouterr().err


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_two_ranks_train_on_buckets_under_zero2_and_resume_exactly(launched_jobs):
    """2 gloo ranks × 2 data workers on bucketed latents (batches of different shapes in one step),
    ZeRO-2 bf16 with accumulation 2: no hang, and the run resumed at step 2 ends bit-identical."""
    from tests import jobs
    from tests.test_matrix import check_run_and_resume

    check_run_and_resume(launched_jobs, "buckets-" + jobs.cell_name(*jobs.BUCKET_CELL), 2)


def test_a_position_saved_with_other_order_settings_is_refused(tmp_path):
    shards = write_bucketed_shards(tmp_path, 2, 10)
    loader = latent_loader(shards, LoaderConfig(batch_size=2, shuffle_buffer=4))
    next(iter(loader))
    state = loader.state_dict()
    for change in ({"shuffle_buffer": 8}, {"batch_size": 3}, {"shards_per_group": 2}):
        other = latent_loader(shards, LoaderConfig(**{"batch_size": 2, "shuffle_buffer": 4, **change}))
        with pytest.raises(ValueError, match=f"{next(iter(change))}="):
            other.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k not in ("batch_size", "shards_per_group", "shuffle_buffer", "shards")}
    latent_loader(shards, LoaderConfig(batch_size=2, shuffle_buffer=4)).load_state_dict(legacy)  # saved before they were recorded


def test_buckets_the_model_cannot_cut_into_patches_are_one_line():
    from pipeline.config import ConfigError
    from pipeline.training.dit import check_buckets

    check_buckets({"48x24": {"samples": 3, "latent_shape": [4, 6, 12]}}, 2)
    with pytest.raises(ConfigError, match="bucket 40x20 is a 5x10 latent, not whole 2x2 patches"):
        check_buckets({"48x24": {"samples": 3, "latent_shape": [4, 6, 12]}, "40x20": {"samples": 1, "latent_shape": [4, 5, 10]}}, 2)
