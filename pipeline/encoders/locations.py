"""Where the frozen encoders are: the recorded configs, moved where the user says and checked
before any work.

A latent folder's ``dataset.json`` and an exported model's ``model_index.json`` record the configs of
the VAE and text encoders they were made with (``{"vae": {...}, "text": {"t5": {...}, "clip":
{...}}}``), local paths relative to the folder (``pipeline.data.paths``). Latents streamed from a
URL, or copied away from those encoders, name paths that resolve nowhere; without a check a run
would train every step and fail in its final sample grid. So:

- :class:`EncoderPaths` replaces a recorded location: ``encoders.vae`` / ``encoders.t5`` /
  ``encoders.clip`` in the training configs (``pipeline.train``, ``pipeline.distill``),
  ``--encoder-vae`` / ``--encoder-t5`` / ``--encoder-clip`` on ``pipeline.sample``,
  ``pipeline.edit`` and ``pipeline.evaluate`` (:func:`add_encoder_args`);
- :func:`locate_encoders` applies them and checks every local location before step 1: one line
  (:class:`EncoderLoadError`) naming the encoder, the path that is not there, and the option to give.

A location that does not look local (a hub id such as ``org/name``) is left to the loader.
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass

from .common import EncoderLoadError

_LABELS = {"vae": "VAE", "t5": "T5 encoder", "clip": "CLIP encoder"}


@dataclass(kw_only=True)
class EncoderPaths:
    """Locations that replace the recorded ones (None: keep the recorded location)."""

    vae: str | None = None  # a diffusers AutoencoderKL folder (or hub id)
    t5: str | None = None  # a transformers T5 encoder + tokenizer folder (or hub id)
    clip: str | None = None  # an open_clip folder (open_clip_config.json + weights)

    def given(self) -> dict[str, str]:
        return {name: str(path) for name, path in vars(self).items() if path is not None}


def locate_encoders(config: dict, paths: EncoderPaths | None, where: str, option: str = "encoders.{name}") -> dict:
    """A copy of an encoder ``config`` (``{"vae": ..., "text": {"t5": ..., "clip": ...}}``) with the
    ``paths`` given put in, after checking that every local location exists. ``where`` names the
    file that recorded the config; ``option`` how the user overrides an encoder (``{name}``)."""
    config = copy.deepcopy(config)
    sections = {"vae": config.get("vae"), **(config.get("text") or {})}
    for name, path in (paths or EncoderPaths()).given().items():
        if sections.get(name) is None:
            raise EncoderLoadError(f"{option.format(name=name)}={path}: {where} records no {_LABELS[name]} to replace")
        sections[name]["path"] = path
        if name == "clip":  # a folder replaces a model name + checkpoint
            sections[name].update(model=None, checkpoint=None)
        if name == "vae":  # the folder given holds the VAE itself
            sections[name]["subfolder"] = None
        if name == "t5":  # the folder given holds its tokenizer too
            sections[name]["tokenizer"] = None
    for name, section in sections.items():
        if section is not None and name in _LABELS:
            _check(section, name, where, option.format(name=name))
    return config


def _check(section: dict, name: str, where: str, option: str) -> None:
    """One encoder's local files exist; else one line naming where it was recorded and the option."""
    for key in ("path", "tokenizer", "checkpoint"):
        location = section.get(key)
        if not location or not _looks_local(location):
            continue
        if not os.path.exists(location):
            raise EncoderLoadError(f"{_LABELS[name]} not found at '{location}' (recorded in {where}): give {option}=PATH "
                                   "where it is on this machine")


def _looks_local(location: str) -> bool:
    """A path, not a hub id or open_clip pretrained tag: absolute, ``./``/``../``, or existing."""
    return os.path.isabs(location) or location.startswith(".") or os.path.exists(location)


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    """``--encoder-vae/-t5/-clip``: where the model's encoders are, when not where its folder says."""
    for name, label in _LABELS.items():
        parser.add_argument(f"--encoder-{name}", metavar="PATH",
                            help=f"the {label} to use instead of the one the model folder records (moved or streamed models)")


def encoder_paths(args: argparse.Namespace) -> EncoderPaths:
    """The :class:`EncoderPaths` of :func:`add_encoder_args`' flags."""
    return EncoderPaths(**{name: getattr(args, f"encoder_{name}") for name in _LABELS})
