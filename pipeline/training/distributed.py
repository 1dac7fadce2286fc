"""The one place that builds the ``Accelerator`` and the DeepSpeed config, and knows how ZeRO-3
holds parameters. Where a process sits in the job (the launcher's variables, a SLURM array's
share) is :mod:`pipeline.training.job_env`, re-exported here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.training.job_env import (  # noqa: F401  (re-exported)
    ArrayRange,
    DistEnv,
    array_task,
    dist_env,
    slurm_array,
    work_split,
)


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
    while the run says fp16) and DeepSpeed refuses it. One line, before anything is built. bf16
    where the machine has no bf16 matrix kernels (:func:`native_bf16`) trains as asked, after one
    warning line (rank 0) that names the cost and the fix."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU (on the CPU accelerate would silently train in fp32 "
                          "and DeepSpeed refuses fp16); use bf16 or no")
    if mixed_precision == "bf16" and dist_env().rank == 0 and not native_bf16():
        print("warning: mixed_precision=bf16 on a CPU without bf16 matrix kernels (AVX2, no AVX-512 or AMX): its matrix "
              "multiplies run ~10x slower than in fp32 here; mixed_precision=no trains in fp32", file=sys.stderr, flush=True)


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices at speed: a CUDA GPU with bf16, or a CPU whose
    oneDNN has bf16 kernels (AVX-512 and newer). On an AVX2-only CPU (2-core AMD EPYC, 2026-12-07)
    a bf16 matmul took 14x an fp32 one (17.6 against 1.24 ms, (1024, 128) @ (128, 512), 2 threads)
    and a DiT-tiny training step in bf16 autocast 3.6-4.2 s against 0.25-0.32 s in fp32. Where
    torch cannot tell (no oneDNN probe), the answer is yes: the run does what it was asked."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


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
