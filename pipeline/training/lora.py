"""LoRA adapters on a DiT: which layers, adding them, saving and loading them, fusing them.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight
``W`` (out, in) gets a trained update ``(alpha / r)·B·A`` with ``A`` (r, in) random and ``B``
(out, r) zero, so a fresh adapter leaves the model unchanged. peft's ``LoraConfig`` and diffusers'
``PeftAdapterMixin.add_adapter`` build the layers (the DiT has that mixin); the file is diffusers'
LoRA format (DESIGN.md §11): ``pytorch_lora_weights.safetensors`` with keys prefixed
``transformer.`` (peft's ``get_peft_model_state_dict``) and ``lora_adapter_metadata`` holding the
``LoraConfig`` (rank, alpha, dropout, target modules), written by diffusers' own
``save_lora_weights`` and read back by ``transformer.load_lora_adapter(path, adapter_name=...)``.

The targets (``lora.targets``) resolve to the full names of ``nn.Linear`` modules of the model
(``target_modules``), so the saved config names exactly the layers that carry an adapter:

- ``attention``: in every block, the fused q/k/v, q, k/v and output projections of the self-
  and cross-attention (``attn.qkv``, ``attn.proj``, ``cross_attn.q``, ``cross_attn.kv``,
  ``cross_attn.proj``; a joint block's ``image.qkv``, ``text.kv`` …);
- ``attention_mlp``: those and the MLP's ``fc1`` / ``fc2``;
- ``all_linear``: every ``nn.Linear`` in the blocks (adaLN modulation too);
- ``blocks:A-B``: every ``nn.Linear`` of blocks A to B (inclusive);
- a list of names: peft's rule, a name matches a module called that or ending in ``.NAME``.

Reading adapter weights needs them whole: under ZeRO-3 gather first
(``pipeline.training.distributed.whole_parameters``), or a saved ``lora_B`` is all zeros (the
peft/DeepSpeed empty-adapter pitfall); :func:`adapter_state` refuses a partitioned module.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.training.distributed import is_partitioned

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PRESETS = {  # preset -> leaf names of the block linears it takes (None: every linear)
    "attention": frozenset({"qkv", "q", "kv", "proj"}),
    "attention_mlp": frozenset({"qkv", "q", "kv", "proj", "fc1", "fc2"}),
    "all_linear": None,
}
BLOCK_RANGE = re.compile(r"blocks:(\d+)-(\d+)")
ADAPTER = "default"  # peft's adapter name while training


def check_targets(targets: str | list[str]) -> None:
    """``lora.targets`` well formed (without a model): ValueError naming what is accepted."""
    if isinstance(targets, list):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be a non-empty list of module names (got {targets!r})")
        return
    found = BLOCK_RANGE.fullmatch(targets)
    if targets in PRESETS or (found and int(found[1]) <= int(found[2])):
        return
    raise ValueError(f"targets must be one of {', '.join(PRESETS)}, blocks:A-B (A <= B) or a list of module names (got {targets!r})")


def target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules ``targets`` selects, in model order; a
    ``ConfigError`` (one line naming the targets) when it selects none."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(targets, list):
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        chosen = [n for n in linears if _in_preset(n, targets, len(getattr(model, "blocks", ())))]
    if not chosen:
        raise ConfigError(f"lora.targets={targets!r} selects no nn.Linear of the model (its linears are named like "
                          f"{', '.join(linears[:3])}, …)")
    return chosen


def _in_preset(name: str, preset: str, depth: int) -> bool:
    """Whether block linear ``name`` (``blocks.I.…``) belongs to ``preset``; a block range beyond
    the model's depth is a ``ConfigError``."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return False
    found = BLOCK_RANGE.fullmatch(preset)
    if found:
        first, last = int(found[1]), int(found[2])
        if last >= depth:
            raise ConfigError(f"lora.targets={preset} but the model has {depth} blocks (0-{depth - 1})")
        return first <= int(parts[1]) <= last
    leaves = PRESETS[preset]
    return leaves is None or parts[-1] in leaves


def peft_config(rank: int, alpha: float, dropout: float, modules: list[str]):
    """peft's ``LoraConfig`` for these exact modules (A random, B zero: the adapter starts at 0)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, init_lora_weights=True)


def add_lora(model: nn.Module, cfg) -> nn.Module:
    """``cfg`` (``dit_config.LoraConfig``) adapters added to ``model`` in place: the base frozen
    (in ``cfg.base_dtype``), the adapters trainable and fp32. The adapters' A matrices draw from
    the global RNG (seed it alike on every rank)."""
    if not hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin
        raise ConfigError(f"lora.rank={cfg.rank}: a {type(model).__name__} takes no LoRA adapters here (our DiT does)")
    modules = target_modules(model, cfg.targets)
    model.add_adapter(peft_config(cfg.rank, cfg.resolved_alpha, cfg.dropout, modules), adapter_name=ADAPTER)
    base = torch.bfloat16 if cfg.base_dtype == "bf16" else torch.float32
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name
        p.requires_grad_(is_adapter)
        p.data = p.data.to(torch.float32 if is_adapter else base)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (peft names, no adapter name: ``blocks.0.attn.qkv.lora_A.weight``),
    fp32 on the CPU, from a module whose parameters are whole (a ZeRO-3 module: gather first)."""
    from peft.utils import get_peft_model_state_dict

    if is_partitioned(model):
        raise ValueError("adapter_state reads whole parameters; under ZeRO-3 gather them first (whole_parameters)")
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def adapter_metadata(model: nn.Module) -> dict:
    """The ``LoraConfig`` fields the file records (``load_lora_adapter`` rebuilds the config from them)."""
    config = model.peft_config[ADAPTER]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules), "init_lora_weights": True}


def save_adapter(folder: Path, model: nn.Module) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA format from ``model``'s adapter
    (keys ``transformer.…``, metadata ``lora_adapter_metadata``)."""
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    SanaLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=adapter_state(model), weight_name=WEIGHT_NAME,
                                          transformer_lora_adapter_metadata=adapter_metadata(model))
    return Path(folder) / WEIGHT_NAME


def fused_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 copy of ``model`` with its adapter merged into the base weights
    (``W + (alpha / r)·B·A``) and the LoRA layers removed: its state dict has no adapter key."""
    fused = copy.deepcopy(model).float()
    fused.fuse_lora()
    fused.unload_lora()
    return fused
