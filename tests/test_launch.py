"""Launching: the accelerate config files, the SLURM and torchrun scripts, ``--dry-run``, and
multi-process runs on CPU (real processes, gloo).

What the multi-process tests show, and how:

- Disjoint data per rank is checked at the loader level, with two real ``torch.distributed``
  ranks started from ``launch/accelerate/cpu2.yaml``: each builds ``latent_loader(folder, cfg,
  rank, world)`` exactly as the trainer does, reads real samples for one epoch (2 ranks × 2
  workers) and the keys are exchanged with ``all_gather_object``. This observes the keys that
  were actually read, instead of recomputing them from the same schedule code that is under test
  (the checkpoint's ``data_rank{r}.json`` offsets only say how far each stream went). The training
  run below then checks that the trainer's ranks own disjoint streams in those files.
- A 2-"node" job through ``launch/slurm.sbatch`` (``srun``/``scontrol`` replaced by stubs that
  start one launcher per node on this machine) trains with ZeRO-2 and checkpoints; a 1-node,
  2-process job from ``node8_zero2.yaml`` resumes it; a 1-process run gets its weights (the
  consolidated fp32 ZeRO weights and the exported EMA model) and is refused a resume, with one line.
- Too few shards for ranks × workers stops every rank before any collective, in bounded time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from pipeline import train
from pipeline.data.latents import latent_meta
from pipeline.training.dit import build_model
from pipeline.planning import dry_run
from pipeline.training.distributed import deepspeed_launch, deepspeed_launch_conflict
from tests.helpers import ROOT, free_port

LAUNCH = ROOT / "launch"
CONFIGS = {"dit_b2_256": (4, 4), "dit_xl2_256": (6, 4)}  # config: (num_workers, shards_per_group)
SHARDS = 1536  # 384 groups of 4: a multiple of every stream count below, so every rank gets the same share


# ---------------------------------------------------------------------------- helpers


def fake_latents(folder: Path, shards: int, per_shard: int = 1000) -> Path:
    """A latent folder the dry run can plan over: dataset.json, empty tars and their stats files."""
    folder.mkdir(parents=True)
    for i in range(shards):
        with tarfile.open(folder / f"latents-{i:06d}.tar", "w"):
            pass
        stats = {"count": per_shard, "successes": per_shard, "failed": 0, "failures": {}}
        (folder / f"latents-{i:06d}_stats.json").write_text(json.dumps(stats))
    meta = {
        "kind": "latent_shards", "samples": shards * per_shard, "latent_shape": [4, 32, 32], "resolution": 256,
        "text_encoders": {
            "t5": {"source": "google/t5-v1_1-xxl", "width": 4096, "max_length": 120},
            "clip": {"source": "ViT-L-14", "width": 768, "token_width": 768, "context_length": 77, "return_tokens": False},
        },
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory) -> Path:
    return fake_latents(tmp_path_factory.mktemp("fake") / "latents", SHARDS)


def dry(capsys, config: str, latents: Path, tmp: Path, *extra: str) -> tuple[int, str, str]:
    argv = ["--config", str(ROOT / f"configs/{config}.yaml"), "--dry-run", f"data.latents={latents}", f"output_dir={tmp}", *extra]
    code = train.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def field(out: str, name: str) -> str:
    """The value printed after ``name`` in the dry-run report."""
    match = re.search(rf"^\s+{re.escape(name)}\s{{2,}}(.+)$", out, re.M)
    assert match, f"no '{name}' line in:\n{out}"
    return match.group(1)


def gib(out: str, item: str) -> float:
    return float(re.search(rf"^\s+{re.escape(item)}\s+([\d.]+)\s", out, re.M).group(1))


def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **extra}


def accelerate(config_file: str, args: list[str], *flags: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch/accelerate/X.yaml [flags] ARGS`` from the repository root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "accelerate" / config_file),
           "--main_process_port", str(free_port()), *flags, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or launch_env())


PROBE = '''
"""Run under a launcher: where this process sits, and (with a latent folder) the keys it reads."""
import json, sys
from pathlib import Path

import torch.distributed as dist

from pipeline.training.distributed import create_accelerator, deepspeed_launch, dist_env, shutdown

out, latents, batches = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
accelerator = create_accelerator()
rank, world = accelerator.process_index, accelerator.num_processes
report = {"rank": rank, "world": world, "env_rank": dist_env().rank, "backend": dist.get_backend(),
          "type": str(accelerator.distributed_type), "deepspeed": deepspeed_launch().enabled}
if latents != "-":
    from pipeline.data.latents import latent_loader
    from pipeline.data.stream import LoaderConfig

    loader = latent_loader(latents, LoaderConfig(batch_size=4, num_workers=2), rank, world)  # as pipeline.train
    keys = []
    for i, batch in zip(range(batches), loader):
        keys += batch["key"]
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    report["keys"] = gathered
(out / f"rank{rank}.json").write_text(json.dumps(report))
shutdown(accelerator)
'''


def probe(tmp: Path) -> Path:
    (tmp / "launch_probe.py").write_text(PROBE)
    (tmp / "probe_out").mkdir()
    return tmp / "probe_out"


def reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


# ---------------------------------------------------------------------------- scripts and config files


def test_launch_scripts_parse():
    for script in ("slurm.sbatch", "torchrun.sh", "preprocess.sbatch"):  # preprocess.sbatch runs in tests/test_split.py
        result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_accelerate_config_files_load_and_leave_the_batch_to_the_training_config():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"gpu1": ("NO", 1), "cpu2": ("MULTI_GPU", 2), "node8_zero2": ("DEEPSPEED", 8),
                "multinode_zero2": ("DEEPSPEED", -1), "multinode_zero3": ("DEEPSPEED", -1)}
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(LAUNCH / f"accelerate/{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes) == (kind, processes), name
        assert config.mixed_precision is None, f"{name}: precision belongs to the training config"
        ds = config.deepspeed_config
        assert not set(ds) & {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device"}, name
        if ds:
            stage = json.loads((ROOT / ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"]
            assert f"zero{stage}" in name


def test_the_launch_files_deepspeed_must_agree_with_the_config():
    def env(file: str, fields: str = "deepspeed_config_file") -> dict:
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "pipeline/training/ds_templates" / file),
                "ACCELERATE_CONFIG_DS_FIELDS": fields}

    assert deepspeed_launch(env("zero3.json")).zero_stage == 3
    assert deepspeed_launch_conflict(True, 2, {}) is None  # plain launch: the config decides
    assert deepspeed_launch_conflict(False, 2, {}) is None
    assert deepspeed_launch_conflict(True, 2, env("zero2.json")) is None
    assert "deepspeed.zero_stage=3" in deepspeed_launch_conflict(True, 2, env("zero3.json"))
    assert "deepspeed.enabled=false" in deepspeed_launch_conflict(False, 2, env("zero2.json"))
    assert "mixed_precision" in deepspeed_launch_conflict(True, 2, env("zero2.json", "deepspeed_config_file,mixed_precision"))


def test_the_deepspeed_config_follows_the_training_config():
    from pipeline.config import ConfigError
    from pipeline.training.distributed import deepspeed_config, deepspeed_template

    template = json.loads(deepspeed_template(3).read_text())
    fill = dict(micro_batch=4, grad_accum=2, grad_clip=1.0, world_size=8)
    for precision, bf16, fp16 in (("no", False, False), ("bf16", True, False), ("fp16", False, True)):
        filled = deepspeed_config(template, precision=precision, **fill)
        assert (filled["bf16"]["enabled"], filled["fp16"]["enabled"]) == (bf16, fp16), precision
    assert deepspeed_config(template, precision="bf16", **fill)["train_batch_size"] == 4 * 2 * 8
    with pytest.raises(ConfigError, match="fp16.enabled=false but mixed_precision=fp16"):
        deepspeed_config({**template, "fp16": {"enabled": False}}, precision="fp16", **fill)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 but the training config gives 2"):
        deepspeed_config({**template, "gradient_accumulation_steps": 4}, precision="no", **fill)


def test_only_pipeline_distributed_reads_the_launcher_environment():
    pattern = re.compile(r"""["'](RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_\w*|OMPI_COMM_WORLD_\w*)["']""")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("pipeline", "data_tools", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path.name not in ("distributed.py", "job_env.py") and pattern.search(path.read_text())  # job_env: the same, without torch
    ]
    assert offenders == []


# ---------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("world", [1, 8, 32])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dry_run_prints_the_plan(config, world, fake_folder, tmp_path, capsys):
    code, out, err = dry(capsys, config, fake_folder, tmp_path, "--world-size", str(world))
    assert code == 0, err
    workers, per_group = CONFIGS[config]
    assert field(out, "world size").startswith(f"{world} ")
    assert field(out, "micro-batch") == "32 per process" and field(out, "gradient accumulation") == "1"
    assert field(out, "global batch") == f"{32 * 1 * world} = 32 × 1 × {world}"
    assert field(out, "parallelism").startswith("DeepSpeed ZeRO-2")
    assert field(out, "streams") == f"{world * workers} = {world} ranks × {workers} workers"
    assert field(out, "shards per rank") == f"{SHARDS // world:,} per epoch"
    assert field(out, "shards per worker").startswith(f"{SHARDS // (world * workers):,} per epoch")
    assert field(out, "tokens per step") == f"{32 * world * 256:,} image + ≤ {32 * world * 120:,} text"
    params = int(re.search(r"([\d,]+) parameters", out).group(1).replace(",", ""))
    name = "DiT-B/2" if config == "dit_b2_256" else "DiT-XL/2"
    # ZeRO-2 divides the optimizer state (fp32 m, v and master = 12 B/param) and the 16-bit gradients by the world size
    assert gib(out, f"{name}: AdamW") == pytest.approx(params * 12 / world / 2**30, abs=0.006)
    assert gib(out, f"{name}: gradients") == pytest.approx(params * 2 / world / 2**30, abs=0.006)
    assert gib(out, f"{name}: weights") == pytest.approx(params * 2 / 2**30, abs=0.006)
    assert gib(out, f"{name}: EMA") == pytest.approx(params * 4 / 2**30, abs=0.006)
    assert "activations" in out and err == ""


def test_dry_run_zero3_and_ddp(fake_folder, tmp_path, capsys):
    _, out, _ = dry(capsys, "dit_xl2_256", fake_folder, tmp_path, "--world-size", "32", "deepspeed.zero_stage=3")
    params = int(re.search(r"([\d,]+) parameters", out).group(1).replace(",", ""))
    assert gib(out, "DiT-XL/2: weights") == pytest.approx(params * 2 / 32 / 2**30, abs=0.006)
    _, out, _ = dry(capsys, "dit_xl2_256", fake_folder, tmp_path, "--world-size", "8", "deepspeed.enabled=false")
    assert field(out, "parallelism").startswith("DDP") and gib(out, "DiT-XL/2: AdamW") == pytest.approx(params * 8 / 2**30, abs=0.006)


def test_dry_run_takes_the_world_size_from_the_launch(fake_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    _, out, _ = dry(capsys, "dit_b2_256", fake_folder, tmp_path)
    assert field(out, "world size") == "16 (launcher: torchrun)" and field(out, "global batch").startswith("512 ")
    monkeypatch.setenv("RANK", "3")
    assert dry(capsys, "dit_b2_256", fake_folder, tmp_path)[:2] == (0, "")  # rank 0 speaks for everyone


def test_dry_run_fails_when_the_shards_cannot_feed_every_stream(tmp_path, capsys):
    few = fake_latents(tmp_path / "few", 100)  # 25 groups of 4
    code, out, err = dry(capsys, "dit_xl2_256", few, tmp_path, "--world-size", "8")  # 8 ranks × 6 workers = 48 streams
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "25 group(s) of 4, fewer than the 48 streams" in err
    code, out, err = dry(capsys, "dit_xl2_256", few, tmp_path, "--world-size", "8", "data.loader.on_too_few_shards=resample")
    assert code == 0 and "warning" in err and "with replacement" in err and "resampled" in field(out, "shard groups")
    assert dry(capsys, "dit_xl2_256", few, tmp_path, "--world-size", "4")[0] == 0  # 24 streams: fine


def test_dry_run_refuses_a_launch_file_that_contradicts_the_config(fake_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "pipeline/training/ds_templates/zero3.json"))
    code, _, err = dry(capsys, "dit_xl2_256", fake_folder, tmp_path, "--world-size", "8")
    assert code == 1 and "asks for ZeRO-3" in err and "deepspeed.zero_stage=2" in err
    assert dry(capsys, "dit_xl2_256", fake_folder, tmp_path, "--world-size", "8", "deepspeed.zero_stage=3")[0] == 0


def test_dry_run_of_distill_counts_teacher_and_target(fake_folder, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.training.distill import DistillConfig, plan
    from pipeline.models.dit import build_dit

    with torch.device("meta"):
        build_dit("DiT-XL/2", sample_size=32, text_dim=4096, clip_dim=768, qk_norm=True).save_config(tmp_path / "teacher/transformer")
    cfg = load_config(DistillConfig, ROOT / "configs/dit_xl2_256.yaml", [f"data.latents={fake_folder}", f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path}"])
    assert dry_run.run_stage(cfg, dry_run.DryRunOptions(world_size=8), plan, "pipeline.distill") == 0
    out = capsys.readouterr().out
    assert "student: EMA + target network" in out and "teacher: frozen weights" in out and "target network: frozen" not in out


def test_encode_dry_run_splits_shards_by_rank(fake_folder, tmp_path, capsys):
    from data_tools import encode

    (tmp_path / "out").mkdir()
    (tmp_path / "out/latents-000000.tar").write_bytes(b"")  # finished shards are skipped
    (tmp_path / "enc.yaml").write_text("vae: {path: nowhere/vae}\ntext: {t5: {path: nowhere/t5, max_length: 120}}\n")
    argv = ["--input", str(fake_folder), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "enc.yaml"), "--dry-run", "--world-size", "8"]
    assert encode.main(argv) == 0
    out = capsys.readouterr().out
    assert field(out, "output").endswith("1 shard(s) done, 1535 to encode")
    assert field(out, "shards per rank") == "191–192"


# ---------------------------------------------------------------------------- multi-process (real processes on CPU)


@pytest.mark.slow
def test_cpu2_config_makes_two_real_ranks_that_read_disjoint_data(latent_shards, tmp_path):
    out = probe(tmp_path)
    env = launch_env(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    result = accelerate("cpu2.yaml", ["-m", "launch_probe", str(out), str(latent_shards), "6"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = reports(out)
    assert [(r["rank"], r["world"], r["backend"]) for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    keys = ranks[0]["keys"]  # what each rank read in one epoch (2 ranks × 2 workers, one 12-sample shard each)
    assert len(keys[0]) == len(keys[1]) == 24 and not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 48  # together: every sample once


def fake_slurm(tmp: Path) -> Path:
    """``srun`` (start the command once per node, here, with SLURM_NODEID set) and ``scontrol``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\npids=()\n'
        'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" & pids+=($!); done\n'
        'status=0\nfor pid in "${pids[@]}"; do wait "$pid" || status=1; done\nexit $status\n'
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "127.0.0.1\\nnode-b\\n"\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


TRAIN = ["run=t", "deepspeed.enabled=true", "deepspeed.zero_stage=2", "model.overrides={depth: 2}", "data.loader.batch_size=8",
         "optim.lr=2e-3", "optim.warmup_steps=2", "logging.every=1", "sampling.steps=2", "ema.decay=0.9", "checkpoint.every=4"]


@pytest.mark.slow
def test_two_node_slurm_job_trains_and_its_checkpoint_resumes_on_one_node(latent_shards, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.models.dit import DiT
    from pipeline.training.dit_config import TrainConfig

    common = [f"data.latents={latent_shards}", f"output_dir={tmp_path}", *TRAIN]
    env = launch_env(PATH=f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[a-b]",
                     SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="1", GPUS_PER_NODE="1", MAIN_PORT=str(free_port()))
    first = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *common, "steps=4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 node(s) × 1 GPU(s), main 127.0.0.1" in first.stdout
    ckpt = tmp_path / "t/checkpoints/step-000004"
    positions = [json.loads((ckpt / f"data_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(p["world_size"], sorted(p["offsets"])) for p in positions] == [(2, ["0"]), (2, ["1"])]  # each rank its own stream
    assert len(list((ckpt / "accelerate").rglob("*optim_states.pt"))) == 2, "ZeRO-2 keeps one optimizer partition per rank"

    # the same world size on one node (node8_zero2.yaml, 2 processes) resumes exactly where the 2-node job stopped
    second = accelerate("node8_zero2.yaml", ["-m", "pipeline.train", *common, "steps=6"], "--num_processes", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert [m["step"] for m in map(json.loads, (tmp_path / "t/metrics.jsonl").read_text().splitlines())] == list(range(1, 7))

    # one process: the weights load (consolidated fp32 from the ZeRO partitions; the exported EMA model) ...
    ckpt = tmp_path / "t/checkpoints/step-000006"
    cfg = load_config(TrainConfig, None, [f"data.latents={latent_shards}", "model.overrides={depth: 2}"])
    model = build_model(cfg, latent_meta(latent_shards))
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "accelerate"), tag="pytorch_model")
    model.load_state_dict(fp32, strict=True)
    module = torch.load(ckpt / "accelerate/pytorch_model/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(fp32[k], module[k].float()) for k in fp32)
    exported = DiT.from_pretrained(tmp_path / "t/model/transformer")
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(p, ema[k]) for k, p in exported.state_dict().items() if k in ema)
    # ... but its training state does not: the data position (and ZeRO's partitions) are per rank
    capsys.readouterr()
    assert train.main([*common, "steps=8"]) == 1
    err = capsys.readouterr().err
    assert "written by 2 process(es)" in err and "this launch has 1" in err and err.count("\n") == 1


@pytest.mark.slow
def test_too_few_shards_stop_every_rank_quickly_with_the_message(latent_shards, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    for name in ("dataset.json", "latents-000000.tar", "latents-000000_stats.json"):
        shutil.copy(latent_shards / name, one / name)
    env = launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    start = time.time()
    result = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), f"data.latents={one}", f"output_dir={tmp_path}", *TRAIN, "steps=4"],
                            env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert result.returncode != 0 and elapsed < 60, (result.returncode, elapsed)
    assert "pipeline.train: 1 shards make 1 group(s) of 1, fewer than the 2 streams" in result.stderr
    assert not (tmp_path / "t").exists()  # stopped before anything was set up
