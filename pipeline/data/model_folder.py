"""The exported text-to-image model folder: a diffusers pipeline folder (DESIGN.md §11), written by
training from the EMA weights, read by our inference and by diffusers.

    MODEL/model_index.json        _class_name LatentDiffusionPipeline; one [library, class] per component;
                                  "sampler" (euler | consistency) and "info" (below)
    MODEL/transformer/            the DiT (``from_pretrained`` folder: config.json + safetensors)
    MODEL/vae/                    diffusers AutoencoderKL; its config's scaling/shift factors are the
                                  ones the latents were normalised with
    MODEL/text_encoder/, tokenizer/   T5 (transformers), when the model reads T5
    MODEL/text_encoder_2/         CLIP (open_clip folder + ``OpenCLIPTextEncoder``'s config.json)
    MODEL/scheduler/              FlowMatchEulerDiscreteScheduler with the model's sampling shift
                                  ("auto": dynamic shifting, SD3's resolution shift from the tokens)
    MODEL/latent_diffusion_pipeline.py   for stock diffusers' ``custom_pipeline=`` (needs this package)

A PixArt-Σ profile run (``model.architecture: pixart``) writes a stock ``PixArtSigmaPipeline``
folder instead: ``transformer/`` a diffusers ``PixArtTransformer2DModel``, T5 and VAE as above, no
CLIP, ``scheduler/`` flow DPM-Solver++ with the shift as a number; ``info`` adds
``architecture: pixart`` and ``max_sequence_length`` (the latents' T5 length, which a stock call
should pass: PixArtSigmaPipeline's default is 300).

``info`` is what our own readers need beyond the components: the encoder configs (max length,
dtypes; local paths relative to MODEL, ``pipeline.data.paths``, so a run folder can move), the latent
shape, resolution, sampler defaults, training shift, buckets, a student's teacher; for an
image-conditioned DiT (``image_condition`` in its config: InstructPix2Pix / FLUX.1 Kontext)
``"image_condition": {"mode": "concat" | "sequence", "degradations": [SPEC, ...]}``, the tasks its
paired latents' ``dataset.json`` records (``LatentDiffusionPipeline`` refuses such a folder: it is
text-to-image only; ``pipeline.inference.pipeline.TextToImage`` and ``pipeline.edit`` run it).
``encoders="reference"`` records the encoders where they are instead of copying them (a T5-XXL of
many GB): their components are then ``[null, null]`` in ``model_index.json`` and
``LatentDiffusionPipeline.from_pretrained`` loads them from ``info``. Encoders named by hub id are
always referenced (nothing is downloaded here).

This module writes files only (it sits below the encoders and inference layers); the classes it
names are ``pipeline.models.dit.DiT``, ``pipeline.encoders.clip_component.OpenCLIPTextEncoder`` and
``pipeline.inference.diffusers_pipeline.LatentDiffusionPipeline``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from pipeline.data.paths import map_paths, relative_to, resolved_from
from pipeline.data.shards import write_json_atomic

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "LatentDiffusionPipeline"
PIXART_CLASS = "PixArtSigmaPipeline"  # a model.architecture=pixart run: a stock PixArt-Σ pipeline folder
PIPELINE_MODULE = "latent_diffusion_pipeline"  # MODEL/latent_diffusion_pipeline.py, for custom_pipeline=
CLIP_COMPONENT = ["pipeline.encoders.clip_component", "OpenCLIPTextEncoder"]
NONE = [None, None]
_TEXT_ENCODER_FILES = ("config.json", "generation_config.json")  # beside the weights (*.safetensors, *.bin, their index)
_SHIM = f'''"""Stock diffusers' route to this folder (needs the latent-diffusion-pipeline package installed):

    DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline="{PIPELINE_MODULE}", trust_remote_code=True)

With the package imported, ``{PIPELINE_CLASS}.from_pretrained(FOLDER)`` needs neither."""

from pipeline.inference.diffusers_pipeline import {PIPELINE_CLASS}  # noqa: F401
'''
Encoders = Literal["copy", "reference"]


def export_model(folder: Path, model: torch.nn.Module, latent_meta: dict, extra: dict | None = None,
                 encoders: Encoders = "copy") -> Path:
    """Write ``model`` (a ``ModelMixin``, or ``pipeline.models.pixart.PixArt``) with the VAE and text
    encoders of ``latent_meta`` as a diffusers pipeline folder; ``extra``: sampler, sampling defaults,
    timesteps, buckets, teacher. A PixArt model makes a stock ``PixArtSigmaPipeline`` folder: its
    transformer, T5 and VAE, and the flow DPM-Solver++ scheduler Sana ships (DESIGN.md §11)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    extra = dict(extra or {})
    config = latent_meta["config"]
    pixart = getattr(model, "architecture", None) == "pixart"
    vae, vae_entry = _write_vae(folder, config["vae"], encoders)
    text, text_entries = _write_text(folder, config["text"], encoders)
    shift, base = extra.get("sampling", {}).get("shift", 1.0), extra.get("timesteps", {}).get("shift_base_tokens", 256)
    info = {"kind": "text_to_image", "transformer": "transformer", "vae": vae, "text": text,
            "latent_shape": latent_meta["latent_shape"], "resolution": latent_meta["resolution"], **extra}
    mode = (getattr(model, "config", None) or {}).get("image_condition")
    if mode is not None:
        info["image_condition"] = {"mode": mode, "degradations": list((latent_meta.get("image_condition") or {}).get("degradations", []))}
    if pixart:
        _, h, w = latent_meta["latent_shape"]
        shift = math.sqrt(h * w / model.patch_size**2 / base) if shift == "auto" else float(shift)  # no dynamic shifting there
        text_entries.pop("text_encoder_2")
        info.update(architecture="pixart", max_sequence_length=(text.get("t5") or {}).get("max_length", 300))
        head = {"_class_name": PIXART_CLASS, "transformer": ["diffusers", "PixArtTransformer2DModel"],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    else:
        head = {"_class_name": PIPELINE_CLASS, "transformer": [type(model).__module__, type(model).__name__],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "sampler": extra.get("sampler", "euler")}
        (folder / f"{PIPELINE_MODULE}.py").write_text(_SHIM)
    _write_scheduler(folder, shift, base, pixart)
    index = {**head, "_diffusers_version": _diffusers_version(), "vae": vae_entry, **text_entries,
             "info": map_paths(info, relative_to(folder))}
    write_json_atomic(folder / MODEL_INDEX, dict(sorted(index.items())))
    return folder


def read_model_info(folder: Path) -> dict:
    """``info`` of a model folder written by :func:`export_model`, local paths resolved."""
    index_path = Path(folder) / MODEL_INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no {MODEL_INDEX})")
    index = json.loads(index_path.read_text())
    if "info" not in index:
        raise FileNotFoundError(f"{index_path} is a diffusers pipeline ({index.get('_class_name')}) but not one this "
                                f"package exported (no 'info'); start a run from it with model.init instead")
    return map_paths(index["info"], resolved_from(Path(folder)))


# ---------------------------------------------------------------------------- components


def _is_local(path: str | None) -> bool:
    return path is not None and os.path.isdir(path)


def _copy_files(source: Path, target: Path, keep) -> None:
    """Files of ``source`` that ``keep(name)`` accepts, into ``target`` (hard links where possible)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and keep(item.name):
            destination = target / item.name
            destination.unlink(missing_ok=True)
            try:
                os.link(item, destination)
            except OSError:
                shutil.copyfile(item, destination)


def _write_vae(folder: Path, vae: dict, encoders: Encoders) -> tuple[dict, list]:
    """``MODEL/vae`` with the latents' scaling/shift factors in its config; the VAE config to record."""
    source = Path(vae["path"]) / (vae.get("subfolder") or "")
    if encoders == "reference" or not _is_local(str(source)):
        return vae, NONE
    target = folder / "vae"
    _copy_files(source, target, lambda name: name == "config.json" or name.startswith("diffusion_pytorch_model"))
    config = json.loads((target / "config.json").read_text())
    for key in ("scaling_factor", "shift_factor"):
        if vae.get(key) is not None:
            config[key] = vae[key]
    (target / "config.json").unlink()  # a hard link to the source's: write a new file
    write_json_atomic(target / "config.json", config)
    recorded = {**vae, "path": str(folder), "subfolder": "vae", "scaling_factor": None, "shift_factor": None}
    return recorded, ["diffusers", "AutoencoderKL"]


def _write_text(folder: Path, text: dict, encoders: Encoders) -> tuple[dict, dict]:
    """``text_encoder``/``tokenizer`` (T5) and ``text_encoder_2`` (CLIP); the text config to record
    and the ``model_index.json`` entries."""
    recorded, entries = dict(text), {"text_encoder": NONE, "tokenizer": NONE, "text_encoder_2": NONE}
    t5, clip = text.get("t5"), text.get("clip")
    if t5 and encoders == "copy" and _is_local(t5["path"]) and _is_local(t5.get("tokenizer") or t5["path"]):
        weights = lambda name: name in _TEXT_ENCODER_FILES or name.endswith((".safetensors", ".bin", ".safetensors.index.json"))
        _copy_files(Path(t5["path"]), folder / "text_encoder", weights)
        _copy_files(Path(t5.get("tokenizer") or t5["path"]), folder / "tokenizer", lambda name: not weights(name))
        recorded["t5"] = {**t5, "path": str(folder / "text_encoder"), "tokenizer": str(folder / "tokenizer")}
        entries["text_encoder"] = ["transformers", "T5EncoderModel"]
        entries["tokenizer"] = ["transformers", _tokenizer_class(folder / "tokenizer")]
    if clip and encoders == "copy" and _is_local(clip.get("path")):
        target = folder / "text_encoder_2"
        _copy_files(Path(clip["path"]), target, lambda name: name != "config.json")
        write_json_atomic(target / "config.json", {"_class_name": CLIP_COMPONENT[1], "_diffusers_version": _diffusers_version(),
                                                   "return_tokens": bool(clip.get("return_tokens")),
                                                   "dtype": clip.get("dtype", "fp32")})
        recorded["clip"] = {**clip, "path": str(target)}
        entries["text_encoder_2"] = CLIP_COMPONENT
    return recorded, entries


def _tokenizer_class(folder: Path) -> str:
    """The tokenizer's transformers class, as its ``tokenizer_config.json`` names it."""
    config = folder / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    return name or "T5TokenizerFast"


def _write_scheduler(folder: Path, shift: float | str, base_tokens: int, pixart: bool) -> None:
    """FlowMatch Euler with the sampling shift; ``"auto"``: dynamic shifting (the pipeline passes
    ``mu = log(sqrt(tokens / base))``, which is SD3's resolution shift). PixArt: flow DPM-Solver++,
    which ``PixArtSigmaPipeline`` can start (it scales the noise by ``init_noise_sigma``)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if pixart:
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    elif shift == "auto":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=base_tokens)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=float(shift))
    scheduler.save_pretrained(folder / "scheduler")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
