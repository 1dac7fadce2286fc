"""A pretrained transformer to start training from (``model.init``): find it, read what it records,
check it against the latents, load it.

References: Chen et al. 2024, "PixArt-Σ" (``PixArtTransformer2DModel``, trained here through
``pipeline.models.pixart``); Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3's MMDiT,
``SD3Transformer2DModel``: refused, see :data:`SD3_REFUSAL`); Brooks et al. 2023, "InstructPix2Pix"
(§3.2) and Flux Control: a text-to-image DiT widened into an image-conditioned one
(:func:`with_image_condition`), the patch embedding's new input channels zero, so it starts as the teacher.

Layouts (DESIGN.md §11), told apart by ``config.json``'s ``_class_name``:

- our exported model folder: ``MODEL/transformer/`` (a ``DiT`` or ``PixArtTransformer2DModel``) and
  ``MODEL/model_index.json``'s ``info`` (``MODEL/pipeline.json`` before it), which records the VAE and
  text encoders the latents were made with and the training / sampling shift (local paths relative
  to ``MODEL``);
- a diffusers pipeline folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
  ``scheduler/``): the encoders' ``config.json`` files and the scheduler's ``shift`` /
  ``flow_shift`` are what it records;
- a bare transformer folder (``config.json`` + weights);
- a hub id of any of these (its JSON files and ``transformer/`` fetched, not its encoders).

The latents must have been encoded with the checkpoint's VAE and text encoders: the widths are
always checked (latent channels, T5 width against the model's text / caption width, CLIP widths)
and, where both sides' ``config.json`` can be read, the encoders' configs; every refusal is one
``ConfigError`` line naming both sides. Nothing here imports the data or encoder layers: ``meta`` is
the latent ``dataset.json`` as a dict (paths resolved by the caller).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError

ARCHITECTURES = {"DiT": "dit", "PixArtTransformer2DModel": "pixart"}  # config.json _class_name -> ours
SD3_REFUSAL = ("holds an SD3Transformer2DModel (SD3 MMDiT), which does not map onto our joint DiT: its pooled CLIP-L+G "
               "projection (time_text_embed), context_embedder over the CLIP+T5 token concat, learned positions "
               "(pos_embed_max_size) and SD3.5 dual attention have no counterpart; train model.text_attention=joint from "
               "scratch or start from a PixArt-Σ checkpoint")
ENCODER_FILES = {"vae": "config.json", "t5": "config.json", "clip": "open_clip_config.json"}
PIPELINE_COMPONENTS = {"vae": "vae", "t5": "text_encoder"}  # diffusers pipeline subfolders (PixArt-Σ: one T5, no CLIP)
NOT_IDENTITY = {"architectures", "use_cache", "dtype", "torch_dtype", "transformers_version", "name_or_path"}
HUB_FILES = ["*.json", "transformer/*"]  # what a hub id is fetched for: configs and the transformer's weights


@dataclass(frozen=True)
class Pretrained:
    """What a ``model.init`` checkpoint is and records."""

    given: str  # as the config said
    root: Path  # the folder it names (fetched for a hub id)
    transformer: Path  # the from_pretrained folder of the transformer
    architecture: str  # "dit" | "pixart"
    config: dict  # the transformer's config.json
    encoders: dict[str, dict | None] = field(default_factory=dict)  # "vae" / "t5" / "clip" -> its config.json (None: unknown)
    records: dict = field(default_factory=dict)  # our folder's info: encoder configs ({"vae": .., "text": ..}), paths resolved
    shift: dict[str, float | str] | None = None  # {"timesteps": .., "sampling": ..}: the shift it was trained / samples with


def find_pretrained(init: str) -> Pretrained:
    """The checkpoint ``init`` names; one ``ConfigError`` line when it is missing, not a model, or refused."""
    root = _local(init)
    transformer = root / "transformer" if (root / "transformer/config.json").is_file() else root
    if not (transformer / "config.json").is_file():
        raise ConfigError(f"model.init: {init} is not a model folder (no transformer/config.json or config.json)")
    config = _read_json(transformer / "config.json")
    name = config.get("_class_name")
    if name == "SD3Transformer2DModel":
        raise ConfigError(f"model.init: {init} {SD3_REFUSAL}")
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.init: {init} holds a {name or 'config.json without _class_name'}, not a transformer this "
                          f"trainer starts from ({', '.join(ARCHITECTURES)})")
    ours = _our_info(root) if transformer != root else None
    if ours is not None:
        records = _resolve_paths(ours, root)
        encoders = _our_encoders(records)
        shift = {"timesteps": ours.get("timesteps", {}).get("shift"), "sampling": ours.get("sampling", {}).get("shift")}
        shift = {k: v for k, v in shift.items() if v is not None} or None
    else:
        records, encoders, shift = {}, _pipeline_encoders(root) if transformer != root else {}, _scheduler_shift(root)
    return Pretrained(init, root, transformer, ARCHITECTURES[name], config, encoders, records, shift)


def _our_info(root: Path) -> dict | None:
    """What our exported folder records: ``model_index.json``'s ``info`` (``pipeline.data.model_folder``),
    or the ``pipeline.json`` of folders exported before it; None for any other folder."""
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    if isinstance(index.get("info"), dict):
        return index["info"]
    return _read_json(root / "pipeline.json") if (root / "pipeline.json").is_file() else None


def _local(init: str) -> Path:
    """The local folder of ``init``: as given, or a hub id's snapshot (configs and transformer only)."""
    path = Path(init).expanduser()
    if path.exists() or os.path.isabs(init) or init.startswith(".") or init.count("/") != 1:
        if not path.is_dir():
            raise ConfigError(f"model.init: {init} not found (give a model folder, a diffusers pipeline or transformer folder, "
                              "or a hub id)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(init, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, no access: one line
        raise ConfigError(f"model.init: {init} is not a folder here and the hub did not give it ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init: cannot read {path}: {err}") from None


def _resolve_paths(entry: Any, root: Path) -> Any:
    """Our pipeline.json with its relative local paths (``./``, ``../``) made absolute from ``root``."""
    if isinstance(entry, dict):
        return {k: _resolve_paths(v, root) if isinstance(v, dict) else
                (str(root / v) if k in ("path", "checkpoint") and isinstance(v, str) and v.startswith(".") else v)
                for k, v in entry.items()}
    return entry


def encoder_config(kind: str, record: dict | None) -> dict | None:
    """The ``config.json`` (CLIP: ``open_clip_config.json``) of an encoder as a latent ``dataset.json``
    or our ``pipeline.json`` records it (``{"path", "subfolder"?}``), when it is a readable local folder."""
    if not record or not record.get("path"):
        return None
    file = Path(record["path"]) / (record.get("subfolder") or "") / ENCODER_FILES[kind]
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, ValueError):
        return None


def _our_encoders(records: dict) -> dict[str, dict | None]:
    text = records.get("text") or {}
    return {"vae": encoder_config("vae", records.get("vae")), "t5": encoder_config("t5", text.get("t5")),
            "clip": encoder_config("clip", text.get("clip"))}


def _pipeline_encoders(root: Path) -> dict[str, dict | None]:
    """A diffusers pipeline folder's ``vae/`` and ``text_encoder/`` configs."""
    found = {}
    for kind, sub in PIPELINE_COMPONENTS.items():
        file = root / sub / "config.json"
        found[kind] = _read_json(file) if file.is_file() else None
    return found


def _scheduler_shift(root: Path) -> dict[str, float] | None:
    """A diffusers scheduler's flow shift: FlowMatchEuler's ``shift``, a flow DPM-Solver's ``flow_shift``;
    None for a non-flow (DDPM / ε) scheduler or a dynamic (resolution-dependent, Flux) one."""
    file = root / "scheduler/scheduler_config.json"
    if not file.is_file():
        return None
    config = _read_json(file)
    if config.get("use_dynamic_shifting"):
        return None
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        value = config.get("shift", 1.0)
    elif config.get("use_flow_sigmas"):
        value = config.get("flow_shift", 1.0)
    else:
        return None
    return {"timesteps": float(value), "sampling": float(value)}


# ---------------------------------------------------------------------------- against the latents


def check_latents(source: Pretrained, meta: dict) -> None:
    """The latent set (its ``dataset.json``, encoder paths resolved) fits the checkpoint: latent
    channels, text widths, and the encoders' identities where both sides can be read."""
    c, text = source.config, meta.get("text_encoders") or {}
    t5, clip = text.get("t5") or {}, text.get("clip") or {}
    widths = [("latent channels", meta["latent_shape"][0], "in_channels", c["in_channels"])]
    if source.architecture == "pixart":
        widths.append(("T5 width", t5.get("width", 0), "caption_channels", c.get("caption_channels") or 0))
    else:
        tokens = clip.get("token_width", 0) if clip.get("return_tokens") else 0
        widths += [("T5 width", t5.get("width", 0), "text_dim", c.get("text_dim", 0)),
                   ("CLIP width", clip.get("width", 0), "clip_dim", c.get("clip_dim", 0)),
                   ("CLIP token width", tokens, "clip_token_dim", c.get("clip_token_dim", 0))]
    for what, ours, key, theirs in widths:
        if ours != theirs:
            raise ConfigError(f"model.init: the latents' {what} is {ours or 'absent'} but {source.given}'s transformer has "
                              f"{key}={theirs}: encode the latents with the checkpoint's encoders")
    _check_identities(source, meta)


def _check_identities(source: Pretrained, meta: dict) -> None:
    """Each encoder's config.json on both sides, compared on the keys both have (versions and dtypes aside)."""
    config = meta.get("config") or {}
    latent_records = {"vae": config.get("vae"), **(config.get("text") or {})}
    for kind, theirs in source.encoders.items():
        ours = encoder_config(kind, latent_records.get(kind))
        if theirs is None or ours is None:
            continue
        for key in sorted(set(ours) & set(theirs)):
            if key.startswith("_") or key in NOT_IDENTITY or ours[key] == theirs[key]:
                continue
            where = (latent_records.get(kind) or {}).get("path")
            raise ConfigError(f"model.init: the latents' {kind} ({where}) has {key}={ours[key]!r} but {source.given}'s has "
                              f"{key}={theirs[key]!r}: encode the latents with the checkpoint's {kind}")
    if source.architecture == "pixart" and source.encoders.get("vae") and meta.get("vae"):
        _check_latent_scale(source, meta["vae"])


def _check_latent_scale(source: Pretrained, vae: dict) -> None:
    """A diffusers pipeline normalises latents with its VAE config's factors: the latents must match."""
    theirs = source.encoders["vae"]
    if source.records:  # our folder: the factors the latents were stored with are the ones it records
        return
    for key, default in (("scaling_factor", 1.0), ("shift_factor", 0.0)):
        mine, other = vae.get(key), theirs.get(key)
        mine, other = default if mine is None else mine, default if other is None else other
        if abs(float(mine) - float(other)) > 1e-6:
            raise ConfigError(f"model.init: the latents were stored with {key}={mine} but {source.given}'s VAE uses "
                              f"{key}={other}: encode with vae.{key}={other}")


# ---------------------------------------------------------------------------- loading


def load_pretrained(source: Pretrained, empty: bool = False, image_condition: str | None = None) -> nn.Module:
    """The checkpoint's transformer in fp32 (master weights, DESIGN.md §8) behind our contract: a
    ``DiT``, or a ``PixArt`` (null text not yet set). ``empty``: built from the config alone (on the
    ``meta`` device, for the dry run). ``image_condition`` (``model.image_condition``): a text-to-image
    DiT becomes an image-conditioned one (:func:`with_image_condition`); a conditioned checkpoint must
    have that mode."""
    if image_condition is not None:
        _check_image_condition(source, image_condition)
    if source.architecture == "dit":
        from pipeline.models.dit import DiT

        cls = DiT
    else:
        from diffusers import PixArtTransformer2DModel

        cls = PixArtTransformer2DModel
    if empty:
        model = cls.from_config({k: v for k, v in source.config.items() if not k.startswith("_")})
    else:
        model = cls.from_pretrained(source.transformer, torch_dtype=torch.float32).float()
    if source.architecture == "pixart":
        from pipeline.models.pixart import PixArt

        try:
            return PixArt(model)
        except ValueError as err:
            raise ConfigError(f"model.init: {source.given}: {err}") from None
    if image_condition is not None and model.config.get("image_condition") is None:
        return with_image_condition(model, image_condition)
    return model


def _check_image_condition(source: Pretrained, mode: str) -> None:
    """``model.image_condition`` on a checkpoint: a DiT, text-to-image or conditioned the same way."""
    if source.architecture != "dit":
        raise ConfigError(f"model.image_condition={mode}: {source.given} holds a {source.architecture} transformer; "
                          "image conditioning is a DiT option (model.init of our DiT folder, or a fresh DiT)")
    theirs = source.config.get("image_condition")
    if theirs is not None and theirs != mode:
        raise ConfigError(f"model.image_condition={mode}, but {source.given} is conditioned with image_condition={theirs}: "
                          f"set model.image_condition={theirs}")


def with_image_condition(teacher: nn.Module, mode: str) -> nn.Module:
    """A text-to-image ``DiT`` as an image-conditioned one (``mode``: ``concat`` | ``sequence``) holding
    its weights. ``concat``: the patch embedding takes [noisy ‖ source], the source's input channels
    zero (InstructPix2Pix), so its outputs equal the teacher's for any source; ``sequence``: the same
    weights (the source's tokens go through the teacher's patch embedding, FLUX.1 Kontext)."""
    from pipeline.models.dit import DiT

    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    widened = DiT.from_config({**config, "image_condition": mode})
    if teacher.x_embedder.weight.device.type == "meta":  # the dry run: shapes only
        return widened
    state = teacher.state_dict()
    if mode == "concat":
        weight = state["x_embedder.weight"]  # (D, C, p, p)
        state["x_embedder.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # (D, 2C, p, p)
    widened.load_state_dict(state)
    return widened
