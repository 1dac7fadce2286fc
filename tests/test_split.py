"""Preprocessing split across independent workers (``--rank/--world-size``, SLURM job arrays):
N workers of ``data_tools.shard`` / ``data_tools.encode`` into one folder end with the same
shards, byte for byte, as one process; ``--merge`` refuses an incomplete folder with one line;
``launch/preprocess.sbatch`` runs as two concurrent array tasks and a merge job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_tools import encode, shard, split
from pipeline.config import ConfigError
from pipeline.training.distributed import slurm_array, work_split
from tests import imagebytes as ib
from tests.helpers import ROOT


def array_env(task: int, count: int, low: int = 0, step: int = 1) -> dict[str, str]:
    """What sbatch sets in an array task (``--array=LOW-HIGH:STEP``)."""
    high = low + (count - 1) * step
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
            "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_JOB_ID": "77"}


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def dataset(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def latent_dataset(folder: Path) -> dict:
    """The latent folder's dataset.json less the output path (two folders are compared)."""
    meta = dataset(folder)
    del meta["config"]["output"]
    return meta


# ---------------------------------------------------------------------------- where a worker sits


def test_work_split_takes_flags_then_a_slurm_array_never_the_launcher():
    assert work_split(env={}) == (0, 1)
    assert work_split(env=array_env(3, 8)) == (3, 8)
    assert work_split(env=array_env(16, 16, low=1)) == (15, 16)  # --array=1-16
    assert work_split(env=array_env(6, 8, step=2)) == (3, 8)  # --array=0-14:2
    assert work_split(env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)  # no _MIN/_MAX
    assert work_split(env={"RANK": "1", "WORLD_SIZE": "4"}) == (0, 1)  # torchrun: no silent share of the work
    assert work_split(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # one process in an sbatch --ntasks=4
    assert work_split(env={**array_env(1, 2), "RANK": "0", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (1, 2)
    assert work_split(0, 2, env=array_env(3, 8)) == (0, 2)  # the flags win
    assert work_split(None, 16, env=array_env(3, 8)) == (3, 16)
    assert slurm_array({}) is None and slurm_array(array_env(0, 1)) == (0, 1)


@pytest.mark.parametrize("rank,world,env,says", [
    (2, 2, {}, "rank 2 is not in 0..1"),
    (-1, 2, {}, "rank -1 is not in 0..1"),
    (0, 0, {}, "world size must be >= 1"),
    (None, 2, array_env(5, 8), "rank 5 is not in 0..1"),
    (None, None, {**array_env(5, 3, low=1), "SLURM_ARRAY_TASK_MAX": "9"}, "not in a plain range"),  # --array=1,5,9
])
def test_a_bad_split_is_one_line(rank, world, env, says):
    with pytest.raises(ConfigError, match=says) as err:
        work_split(rank, world, env=env)
    assert "\n" not in str(err.value)


def test_a_bad_rank_exits_2_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "data_tools.shard", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--rank", "2", "--world-size", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "data_tools.shard: config error: rank 2 is not in 0..1 (world size 2): check --rank and --world-size"


# ---------------------------------------------------------------------------- data_tools.shard


def pairs(root: Path) -> None:
    """17 pairs in a known order (--keep-order, 3 per shard): 00.png's bytes again as 01 (same
    shard: a repeat within it) and as 05 (shard 1: a repeat across shards); 07 is too small."""
    for i in range(17):
        image = ib.solid_png((32, 32), (i * 15, 255 - i * 15, 80))
        image = {1: ib.solid_png((32, 32), (0, 255, 80)), 5: ib.solid_png((32, 32), (0, 255, 80)), 7: ib.solid_png((8, 8))}.get(i, image)
        (root / f"{i:02d}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{i:02d}.png").write_bytes(image)
        (root / f"{i:02d}.txt").write_text(f"picture {i}")


def shard_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["--input", str(tmp_path / "in"), "--output", str(tmp_path / out), "--resolution", "16", "--min-size", "16",
            "--samples-per-shard", "3", "--keep-order", "--dedup", *extra]


def test_two_shard_workers_write_what_one_process_writes(tmp_path, capsys):
    pairs(tmp_path / "in")
    assert shard.main(shard_args(tmp_path, "one")) == 0
    one = dataset(tmp_path / "one")
    assert (one["samples"], one["skipped"], len(one["shards"])) == (14, {"duplicate": 2, "too_small": 1}, 6)
    keys = [k for k, _ in shard.keyed_hashes(tmp_path / "one/images-000001.tar")]
    assert keys == ["000001000000", "000001000001"]  # 05.png (key ...0002) repeated 00.png from shard 0

    capsys.readouterr()
    assert shard.main(shard_args(tmp_path, "two", "--rank", "1", "--world-size", "2")) == 0  # finishes first
    assert "3 of 6 shard(s) are not complete yet" in capsys.readouterr().out
    assert sorted(tar_bytes(tmp_path / "two")) == ["images-000001.tar", "images-000003.tar", "images-000005.tar"]
    assert not (tmp_path / "two/dataset.json").exists()
    assert shard.main(shard_args(tmp_path, "two", "--rank", "0", "--world-size", "2")) == 0  # the last one: dataset.json
    assert tar_bytes(tmp_path / "two") == tar_bytes(tmp_path / "one")
    two = dataset(tmp_path / "two")
    for field in ("samples", "skipped", "shards", "shard_pattern", "resolution"):
        assert two[field] == one[field], field
    assert {k: v for k, v in two["options"].items() if k != "output"} == {k: v for k, v in one["options"].items() if k != "output"}
    stats = json.loads((tmp_path / "two/images-000001_stats.json").read_text())
    assert (stats["successes"], stats["failures"], stats["duplicates_removed"]) == (2, {"duplicate": 1}, ["000001000002"])

    (tmp_path / "two/dataset.json").unlink()  # --merge is the last step alone, and repeats change nothing
    assert shard.main(shard_args(tmp_path, "two", "--merge")) == 0
    assert tar_bytes(tmp_path / "two") == tar_bytes(tmp_path / "one") and dataset(tmp_path / "two")["skipped"] == one["skipped"]


def test_merge_names_the_missing_shards_and_workers_keep_to_their_own(tmp_path, capsys):
    pairs(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/images-000000.tar.tmp-node7-12").write_bytes(b"rank 0's, from a crash")
    (tmp_path / "out/images-000001_stats.json.tmp-node8-12").write_bytes(b"rank 1's, being written now")
    assert shard.main(shard_args(tmp_path, "out", "--world-size", "3", "--rank", "0")) == 0
    assert [p.name for p in (tmp_path / "out").glob("*.tmp-*")] == ["images-000001_stats.json.tmp-node8-12"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        shard.main(shard_args(tmp_path, "out", "--merge"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "4 of 6 shard(s) are missing" in err and "images-000001.tar" in err
    assert not (tmp_path / "out/dataset.json").exists()
    with pytest.raises(SystemExit):  # nothing of this command there at all
        shard.main(shard_args(tmp_path, "empty", "--merge"))
    assert "no shards of this command" in capsys.readouterr().err


# ---------------------------------------------------------------------------- data_tools.encode


@pytest.fixture(scope="module")
def encode_yaml(tmp_path_factory, tiny_vae_dir, tiny_text_encoders_dir) -> Path:
    text = yaml.safe_load((tiny_text_encoders_dir / "encoders.yaml").read_text())
    path = tmp_path_factory.mktemp("split_cfg") / "encode.yaml"
    path.write_text(yaml.safe_dump({"vae": {"path": str(tiny_vae_dir)}, "text": text, "batch_size": 6}))
    return path


def encode_args(images: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["--input", str(images), "--output", str(out), "--config", str(config), *extra]


def test_two_encode_workers_write_what_one_process_writes(image_shards, encode_yaml, tmp_path, capsys):
    assert encode.main(encode_args(image_shards, tmp_path / "one", encode_yaml)) == 0  # one (accelerate) process
    capsys.readouterr()
    two = tmp_path / "two"
    assert encode.main(encode_args(image_shards, two, encode_yaml, "--rank", "1", "--world-size", "2")) == 0
    assert "2 of 4 shard(s) are not complete yet" in capsys.readouterr().out and not (two / "dataset.json").exists()
    assert encode.main(encode_args(image_shards, two, encode_yaml, "--rank", "0", "--world-size", "2")) == 0
    assert tar_bytes(two) == tar_bytes(tmp_path / "one") and len(tar_bytes(two)) == 4
    assert latent_dataset(two) == latent_dataset(tmp_path / "one")

    (two / "latents-000002.tar").unlink()
    (two / "dataset.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        encode.main(encode_args(image_shards, two, encode_yaml, "--merge"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "1 of 4 shard(s) are missing" in err and "latents-000002.tar" in err
    assert encode.main(encode_args(image_shards, two, encode_yaml, "--rank", "0", "--world-size", "2")) == 0  # redoes shard 2
    assert tar_bytes(two) == tar_bytes(tmp_path / "one") and latent_dataset(two) == latent_dataset(tmp_path / "one")
    (two / "dataset.json").unlink()
    assert encode.main(encode_args(image_shards, two, encode_yaml, "--merge")) == 0
    assert latent_dataset(two) == latent_dataset(tmp_path / "one")


def test_encode_workers_refuse_an_unfinished_image_folder_and_a_bad_rank(image_shards, encode_yaml, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(image_shards, images)
    (images / "dataset.json").unlink()  # the shard workers are not done
    with pytest.raises(SystemExit) as exit_:
        encode.main(encode_args(images, tmp_path / "lat", encode_yaml, "--rank", "0", "--world-size", "2"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "not finished" in err
    for key, value in {**array_env(5, 3, low=1), "SLURM_ARRAY_TASK_MAX": "9"}.items():  # --array=1,5,9, no flags: still a worker
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        encode.main(encode_args(image_shards, tmp_path / "lat", encode_yaml))
    assert capsys.readouterr().err.strip() == "data_tools.encode: config error: SLURM array task 5 of 3 (indices 1-9:1) is not in a plain range: " \
        "submit with --array=A-B[:STEP], or pass --rank and --world-size"
    assert not (tmp_path / "lat").exists()
    monkeypatch.setenv("RANK", "0")  # a worker inside a 2-process accelerate/torchrun launch: both would do its share
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        encode.main(encode_args(image_shards, tmp_path / "lat", encode_yaml, "--rank", "0", "--world-size", "2"))
    assert "is one process, but this launch started 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------- launch/preprocess.sbatch


def test_preprocess_sbatch_array_tasks_then_merge(tmp_path):
    """Two array tasks at once (fake SLURM variables), then the merge job, equal one process."""
    pairs(tmp_path / "in")
    assert shard.main(shard_args(tmp_path, "one")) == 0
    script = ROOT / "launch/preprocess.sbatch"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), SLURM_SUBMIT_DIR=str(ROOT), OMP_NUM_THREADS="1", SLURM_CPUS_PER_TASK="1")
    tasks = [subprocess.Popen(["bash", str(script), "shard", *shard_args(tmp_path, "two")], cwd=tmp_path, env={**base, **array_env(t, 2, low=1)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in (1, 2)]  # --array=1-2
    for task in tasks:
        out, err = task.communicate(timeout=180)
        assert task.returncode == 0, err[-2000:]
        assert "-m data_tools.shard --input" in out
    merged = subprocess.run(["bash", str(script), "shard", *shard_args(tmp_path, "two"), "--merge"], cwd=tmp_path, env={**base, **array_env(0, 1)},
                            capture_output=True, text=True, timeout=180)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert tar_bytes(tmp_path / "two") == tar_bytes(tmp_path / "one")
    assert dataset(tmp_path / "two")["samples"] == dataset(tmp_path / "one")["samples"] == 14
    wrong = subprocess.run(["bash", str(script), "train"], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "shard or encode" in wrong.stderr


# ---------------------------------------------------------------------------- rerunning one task (--array=17)


def set_env(monkeypatch, env: dict[str, str]) -> None:
    """This process as a SLURM array task described by ``env`` (no other SLURM variables)."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_a_rerun_of_one_array_task_keeps_its_rank_and_spares_a_live_tasks_temporaries(tmp_path, monkeypatch, capsys):
    """``--array=0-2`` (3 workers, 6 shards): task 0 is done, task 1 is still writing shard 1 (its
    ``*.tmp-HOST-PID`` file), task 2 failed and is rerun alone (``--array=2``: SLURM says task 2 of
    1). The rerun is rank 2 of 3 from the worker plan: it writes shards 2 and 5 only, and task 1's
    temporary stays. When task 1 ends, the folder equals one process's."""
    pairs(tmp_path / "in")
    assert shard.main(shard_args(tmp_path, "one")) == 0
    set_env(monkeypatch, array_env(0, 3))
    assert shard.main(shard_args(tmp_path, "out")) == 0
    live = tmp_path / "out/images-000001.tar.tmp-otherhost-123"
    live.write_bytes(b"task 1's shard, being written now")
    capsys.readouterr()
    set_env(monkeypatch, array_env(2, 1, low=2))  # sbatch --array=2
    assert shard.main(shard_args(tmp_path, "out")) == 0
    said = capsys.readouterr().out
    assert "data_tools.shard: SLURM array task 2 is worker 2 of 3" in said, said
    assert live.exists()
    assert sorted(tar_bytes(tmp_path / "out")) == [f"images-00000{i}.tar" for i in (0, 2, 3, 5)]
    assert not (tmp_path / "out/dataset.json").exists()
    set_env(monkeypatch, array_env(1, 3))  # task 1 (its leftover temporary is its own)
    assert shard.main(shard_args(tmp_path, "out")) == 0
    assert tar_bytes(tmp_path / "out") == tar_bytes(tmp_path / "one") and not list((tmp_path / "out").glob("*.tmp-*"))
    assert dataset(tmp_path / "out")["samples"] == dataset(tmp_path / "one")["samples"]


def test_a_rerun_task_maps_its_index_through_the_first_array(tmp_path, capsys):
    """The first workers record their split (``worker_plan.json``); a later array of another size
    (``--array=17``, ``--array=17,40``) takes rank ``(task - min) / step`` of their world size."""
    out = tmp_path / "out"
    rank, world, plan = split.worker_split(out, None, None, "p", env=array_env(5, 64, low=1))  # --array=1-64
    assert (rank, world) == (4, 64) and capsys.readouterr().out == ""
    split.record_split(out, plan)
    assert json.loads((out / split.WORKER_PLAN).read_text())["world_size"] == 64
    assert split.worker_split(out, None, None, "p", env=array_env(17, 1, low=17))[:2] == (16, 64)  # --array=17
    assert capsys.readouterr().out.strip() == f"p: SLURM array task 17 is worker 16 of 64, as the first array (1-64:1) recorded in {out / split.WORKER_PLAN}"
    listed = {**array_env(40, 2, low=17), "SLURM_ARRAY_TASK_MAX": "40"}  # --array=17,40
    assert split.worker_split(out, None, None, "p", env=listed)[:2] == (39, 64)
    assert split.worker_split(out, None, None, "p", env=array_env(5, 64))[:2] == (5, 64)  # --array=0-63 again: its own positions
    assert split.worker_split(out, 16, 64, "p", env={})[:2] == (16, 64)  # the flags
    assert split.worker_split(out, 0, 1, "p", env={})[:2] == (0, 1)  # one process, asked for
    stepped = tmp_path / "stepped"
    split.record_split(stepped, split.worker_split(stepped, None, None, "p", env=array_env(0, 64, step=2))[2])  # --array=0-126:2
    assert split.worker_split(stepped, None, None, "p", env=array_env(34, 1, low=34))[:2] == (17, 64)


@pytest.mark.parametrize("first,rerun,flags,says", [
    (array_env(5, 64, low=1), {}, (None, None), "holds the shards of 64 workers"),  # no flags, no array
    (array_env(5, 64, low=1), array_env(70, 1, low=70), (None, None), "SLURM array task 70 is not one of the first array's (1-64:1, 64 workers)"),
    (array_env(5, 64, low=1), {}, (None, 8), "holds the shards of 64 workers (worker_plan.json); --world-size 8 would take their shards"),
    (array_env(0, 64, step=2), array_env(35, 1, low=35), (None, None), "SLURM array task 35 is not one of the first array's (0-126:2, 64 workers)"),
    (None, array_env(1, 1, low=1), (None, None), "holds the shards of 2 workers (worker_plan.json); a SLURM array of 1 task(s)"),  # first split by flags
])
def test_a_split_that_cannot_be_recovered_is_refused_in_one_line(tmp_path, first, rerun, flags, says):
    out = tmp_path / "out"
    split.record_split(out, split.worker_split(out, None, None, "p", env=first)[2] if first else split.worker_split(out, 1, 2, "p", env={})[2])
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        split.worker_split(out, *flags, "p", env=rerun)
    assert "\n" not in str(err.value) and "--rank" in str(err.value)


def test_plain_runs_into_a_folder_of_several_workers_are_refused(image_shards, encode_yaml, tmp_path, capsys, monkeypatch):
    """Neither a plain shard run nor an accelerate encode launch claims the shards of the recorded workers."""
    set_env(monkeypatch, {})
    pairs(tmp_path / "in")
    assert shard.main(shard_args(tmp_path, "out", "--rank", "0", "--world-size", "2")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        shard.main(shard_args(tmp_path, "out"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--world-size 1" in err, err
    assert shard.main(shard_args(tmp_path, "out", "--world-size", "1")) == 0  # one process, asked for: does the rest
    assert dataset(tmp_path / "out")["samples"] == 14
    capsys.readouterr()
    lat = tmp_path / "lat"
    split.record_split(lat, split.WorkerPlan(2))
    with pytest.raises(SystemExit) as exit_:
        encode.main(encode_args(image_shards, lat, encode_yaml))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "holds the shards of 2 workers" in err, err
