"""The one place that reads the distributed environment, builds the ``Accelerator`` and the
DeepSpeed config, and knows how ZeRO-3 holds parameters.

Launchers describe the job in environment variables: ``accelerate launch`` and ``torchrun``
set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (+ ``MASTER_ADDR`` / ``MASTER_PORT``); SLURM sets
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; Open MPI sets ``OMPI_COMM_WORLD_*``.
:func:`dist_env` reads them once into an immutable :class:`DistEnv`; nothing else in the
project reads those variables (open_clip's ``world_info_from_env``, returned as a value).

Preprocessing runs as *independent* workers instead (no process group; a SLURM job array, or
several plain processes): :func:`work_split` says which share of the work this worker takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

import torch

from pipeline.config import ConfigError

_SOURCES = (  # launcher, rank, world size, local rank
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (first launcher found wins; none -> single process)."""
    env = os.environ if env is None else env
    for launcher, rank, world, local in _SOURCES:
        if rank in env and world in env:
            port = env.get("MASTER_PORT")
            return DistEnv(
                rank=int(env[rank]),
                world_size=int(env[world]),
                local_rank=int(env.get(local, 0)),
                launcher=launcher,
                master_addr=env.get("MASTER_ADDR"),
                master_port=int(port) if port else None,
            )
    return DistEnv()


_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class ArrayRange:
    """A SLURM job array's indices as sbatch states them: ``low``, ``low + step``, … ``high``, and
    how many tasks it has (``--array=1-64`` is 1, 64, 1, 64; a list ``--array=17,40`` is 17, 40, 1, 2)."""

    low: int
    high: int
    step: int
    count: int

    @property
    def plain(self) -> bool:
        """Whether the indices are one range ``A-B[:STEP]`` (a list is not)."""
        return self.step >= 1 and (self.high - self.low) // self.step + 1 == self.count

    def rank_of(self, task: int) -> int | None:
        """Task index ``task``'s position in the range; None when it is not one of its indices."""
        rank, off = divmod(task - self.low, max(self.step, 1))
        return rank if not off and 0 <= rank < self.count else None

    def __str__(self) -> str:
        return f"{self.low}-{self.high}:{self.step}"


def array_task(env: Mapping[str, str] | None = None) -> tuple[int, ArrayRange] | None:
    """This SLURM array task's index and its array (unchecked); None outside a job array."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task, low, high, step, count = (env.get(name) for name in _ARRAY)
    task = int(task)
    low, step = int(low or 0), int(step or 1)
    count = int(count) if count else (int(high if high else task) - low) // step + 1
    high = int(high) if high else low + (count - 1) * step
    return task, ArrayRange(low, high, step, count)


def slurm_array(env: Mapping[str, str] | None = None, first: ArrayRange | None = None) -> tuple[int, int] | None:
    """``(rank, world size)`` of this SLURM job-array task; None outside an array.

    sbatch sets ``SLURM_ARRAY_TASK_ID`` with the array's ``_MIN``, ``_MAX``, ``_STEP`` and ``_COUNT``:
    ``--array=0-7`` gives ranks 0..7 of 8, and ``--array=1-16`` or ``--array=0-14:2`` work too (the
    rank is the task's position in the range). A list (``--array=1,5,9``) has no such position and
    is refused. A ``%`` limit (``--array=0-63%8``) only delays tasks: workers never wait for each other.

    ``first``: the array that started the first workers of this job (``data_tools.split`` records
    it). A task of an array of another size, a rerun of some of them (``--array=17``, a list too),
    is the rank its index had there, of that array's size.
    """
    found = array_task(env)
    if found is None:
        return None
    task, here = found
    if first is not None and here.count != first.count:
        rank = first.rank_of(task)
        if rank is None:
            raise ConfigError(f"SLURM array task {task} is not one of the first array's ({first}, {first.count} workers): "
                              "rerun with the first array's task indices, or pass --rank and --world-size")
        return rank, first.count
    rank = here.rank_of(task) if here.plain else None
    if rank is None:
        raise ConfigError(f"SLURM array task {task} of {here.count} (indices {here}) is not in a plain range: "
                          "submit with --array=A-B[:STEP], or pass --rank and --world-size")
    return rank, here.count


def work_split(rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None,
               first: ArrayRange | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of an independent worker: each value from the flags when given, else
    from a SLURM job array (:func:`slurm_array`, with the ``first`` array of the job), else ``(0, 1)``.
    Not from torchrun or SLURM task variables: one process in an ``sbatch --ntasks=4`` script sees
    ``SLURM_PROCID=0``, ``SLURM_NTASKS=4`` and would silently do a quarter of the work (``srun`` tasks
    pass ``--rank $SLURM_PROCID --world-size $SLURM_NTASKS``). Raises ``ConfigError`` (one line)
    unless ``0 <= rank < world size``."""
    if rank is None or world_size is None:
        found = slurm_array(env, first) or (0, 1)
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1 (got {world_size}): check --world-size")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size}): check --rank and --world-size")
    return rank, world_size


def create_accelerator(*, timeout: timedelta | None = None, **kwargs):
    """An ``accelerate.Accelerator`` that is really distributed on CPU-only machines too.

    Without a GPU, a multi-process launch leaves accelerate's process group unset and each
    process silently runs alone (ENV-NOTES.md). Plain jobs need ``cpu=True`` (accelerate then
    picks MULTI_CPU with gloo); DeepSpeed jobs need the gloo backend named explicitly.

    The LR scheduler is never stepped by accelerate (``step_scheduler_with_optimizer=False``): its
    wrapper steps a prepared scheduler once per process per optimizer step, so a 2-process warmup
    ended twice as early. The trainers step their schedule once per optimizer step themselves.

    ``timeout``: the process group's, for every collective (None: torch's default, 30 min).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_precision(kwargs.get("mixed_precision") or "no")
    handlers = list(kwargs.pop("kwargs_handlers", []))
    group = {} if timeout is None else {"timeout": timeout}
    deepspeed = _deepspeed_launch() or kwargs.get("deepspeed_plugin") is not None
    if deepspeed and dist_env().launcher == "none":
        _single_process_group_env()
    if deepspeed and not torch.cuda.is_available():
        _skip_cpu_inference_op()
    if not torch.cuda.is_available() and dist_env().world_size > 1:
        if deepspeed:
            group["backend"] = "gloo"
        else:
            kwargs.setdefault("cpu", True)
    if group:
        handlers.append(InitProcessGroupKwargs(**group))
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def _skip_cpu_inference_op() -> None:
    """On a machine without a GPU, DeepSpeed's communication backend JIT-compiles a shared-memory
    op at start-up (~35 s of g++ the first time on a machine) that only its *inference* all-reduce
    uses; training all-reduces through the process group. Mark it unavailable, as DeepSpeed does
    where it cannot be built, so a CPU run starts without compiling it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_precision(mixed_precision: str) -> None:
    """fp16 needs a CUDA GPU: on the CPU accelerate has no fp16 autocast (it would train in fp32
    while the run says fp16) and DeepSpeed refuses it. One line, before anything is built."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU (on the CPU accelerate would silently train in fp32 "
                          "and DeepSpeed refuses fp16); use bf16 or no")


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the matrix work runs in for ``mixed_precision`` ("no", "bf16", "fp16")."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def _single_process_group_env() -> None:
    """DeepSpeed always builds a process group; started without a launcher (plain ``python -m``)
    it would look for MPI. Describe a one-process job instead."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in values.items():
        os.environ.setdefault(key, value)


def _deepspeed_launch() -> bool:
    """Whether ``accelerate launch --use_deepspeed`` (or a DeepSpeed config) started us."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def shutdown(accelerator) -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits
    (left to interpreter shutdown, gloo can abort a rank: "terminate called without an active exception")."""
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def deepspeed_template(zero_stage: int) -> Path:
    """The DeepSpeed JSON template shipped inside the package (``pipeline/training/ds_templates/zero{2,3}.json``)."""
    return Path(str(resources.files("pipeline.training") / "ds_templates" / f"zero{zero_stage}.json"))


def deepspeed_config(template: dict, micro_batch: int, grad_accum: int, grad_clip: float, precision: str, world_size: int) -> dict:
    """A DeepSpeed JSON (``pipeline/training/ds_templates/*.json``) with its ``"auto"`` fields filled from
    our config, so batch size, accumulation, clipping and precision are stated in one place only.

    ``bf16.enabled`` / ``fp16.enabled`` follow ``precision``; a template that states another value
    is refused (one line), so a run never trains in another precision than the config says. fp16
    gets DeepSpeed's dynamic loss scaling (its defaults unless the template sets them).
    """
    filled = json.loads(json.dumps(template))
    auto = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in auto.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
        elif filled[key] != value:
            raise ConfigError(f"the DeepSpeed template sets {key}={filled[key]!r} but the training config gives {value!r}: "
                              'write "auto" there (the training config states it)')
    for key in ("bf16", "fp16"):
        wanted = precision == key
        section = filled.setdefault(key, {})
        stated = section.get("enabled", "auto")
        if stated != "auto" and stated != wanted:
            raise ConfigError(f"the DeepSpeed template sets {key}.enabled={str(stated).lower()} but mixed_precision={precision}: "
                              f'write "auto" there (mixed_precision states it)')
        section["enabled"] = wanted
    return filled


def deepspeed_plugin(config_path: str | Path, zero_stage: int | None, **fill) -> object:
    """accelerate's ``DeepSpeedPlugin`` from a JSON template filled by :func:`deepspeed_config`."""
    from accelerate.utils import DeepSpeedPlugin

    template = json.loads(Path(config_path).read_text())
    if zero_stage is not None:
        template.setdefault("zero_optimization", {})["stage"] = zero_stage
    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(template, **fill))


# ---------------------------------------------------------------------------- ZeRO-3 parameters


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this module's parameters as shards (``ds_id`` on each)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _parameter_groups(module: torch.nn.Module, trainable_only: bool = False) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """The module's named parameters in groups: its own, then each child's (each element of a
    ``ModuleList`` / ``Sequential`` on its own, so one DiT block is gathered at a time);
    ``trainable_only``: those that require a gradient."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad or not trainable_only]
    if own:
        yield own
    for name, child in module.named_children():
        parts = child.named_children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) else [("", child)]
        for sub, part in parts:
            prefix = f"{name}.{sub}" if sub else name
            group = [(n, p) for n, p in part.named_parameters(prefix=prefix) if p.requires_grad or not trainable_only]
            if group:
                yield group


def whole_parameters(module: torch.nn.Module, trainable_only: bool = False) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Groups of ``(name, parameter)`` holding the full values, to read (EMA updates);
    ``trainable_only``: only those that require a gradient (LoRA's adapters: nothing frozen is gathered).

    Under ZeRO-3 each group is gathered on every rank while the caller holds it, then released,
    so the peak is one block, not the model (a collective: every rank must iterate alike).
    Otherwise the module's parameters are whole already and come as one group.
    """
    if not is_partitioned(module):
        yield [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        return
    import deepspeed

    for group in _parameter_groups(module, trainable_only):
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            yield group


# ---------------------------------------------------------------------------- the launch's DeepSpeed

_DS_FIELDS_OURS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                   "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                   "zero3_save_16bit_model", "mixed_precision")  # accelerate refuses these beside a config passed in code


@dataclass(frozen=True)
class DeepSpeedLaunch:
    """What ``accelerate launch`` was told about DeepSpeed (its config file or flags)."""

    enabled: bool = False
    config_file: Path | None = None  # the accelerate YAML's ``deepspeed_config.deepspeed_config_file``
    zero_stage: int | None = None  # from that JSON, else from ``--zero_stage``; None: not stated
    accelerate_fields: tuple[str, ...] = ()  # keys of the accelerate YAML's ``deepspeed_config`` section


def deepspeed_launch(env: Mapping[str, str] | None = None) -> DeepSpeedLaunch:
    """Read the DeepSpeed part of an ``accelerate launch`` from its environment variables."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return DeepSpeedLaunch()
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    config_file = Path(path) if path and path != "none" else None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if config_file is not None and config_file.is_file():
        stage = json.loads(config_file.read_text()).get("zero_optimization", {}).get("stage", stage)
    fields = tuple(f for f in env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f)
    return DeepSpeedLaunch(True, config_file, int(stage) if stage not in (None, "auto") else None, fields)


def deepspeed_launch_conflict(enabled: bool, zero_stage: int, env: Mapping[str, str] | None = None) -> str | None:
    """Why the launch's DeepSpeed setting and the training config's disagree; None when they agree.

    The rule: the training config says everything about the batch (micro-batch, accumulation,
    clipping, precision) and whether DeepSpeed runs at which ZeRO stage; our trainer hands
    accelerate its own ``DeepSpeedPlugin`` built from it, which replaces the launch file's JSON. A
    launch file may name a DeepSpeed JSON (so accelerate starts the DeepSpeed launcher), but then
    its ZeRO stage must be the config's, and it must not state what the config states.
    """
    launch = deepspeed_launch(env)
    if not launch.enabled:
        return None  # a plain launch (gpu1.yaml, cpu2.yaml, --multi_gpu, torchrun): the config decides
    where = f" ({launch.config_file})" if launch.config_file else ""
    if not enabled:
        return (f"the launch runs DeepSpeed{where} but the config has deepspeed.enabled=false: launch with a plain "
                "file (launch/accelerate/gpu1.yaml, --multi_gpu) or set deepspeed.enabled=true")
    if launch.zero_stage is not None and launch.zero_stage != zero_stage:
        return (f"the launch asks for ZeRO-{launch.zero_stage}{where} but the config has deepspeed.zero_stage={zero_stage}: "
                f"add deepspeed.zero_stage={launch.zero_stage}"
                + (f" deepspeed.config={launch.config_file}" if launch.config_file else "") + ", or use the other launch file")
    stated = [f for f in launch.accelerate_fields if f in _DS_FIELDS_OURS]
    if stated:
        return (f"the accelerate config file states {', '.join(stated)}; the training config states those "
                "(optim.grad_accum, optim.grad_clip, mixed_precision, deepspeed.*): remove them from the launch file")
    return None
