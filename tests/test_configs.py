"""Every YAML in configs/ loads into its stage's config class (typos in shipped configs fail here) and trains, shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    if path.name.startswith(("dit_", "pixart_")):
        from pipeline.training.dit_config import TrainConfig

        return TrainConfig, []
    if path.name.startswith(("distill_", "ct_")):
        from pipeline.training.distill import DistillConfig

        return DistillConfig, []
    if path.name.startswith("encode_"):
        from data_tools.encode import EncodeConfig

        return EncodeConfig, ["input=in", "output=out"]
    if path.name.startswith("autoencoder_"):
        from pipeline.training.autoencoder import AutoencoderTrainConfig

        return AutoencoderTrainConfig, []
    if path.name.startswith("pix2pix_"):
        from pipeline.training.pix2pix import Pix2PixTrainConfig

        return Pix2PixTrainConfig, []
    raise AssertionError(f"{path.name}: no config class known for this name; add it here")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    cls, extra = config_class(path)
    load_config(cls, path, extra)


# ---------------------------------------------------------------------------- every config trains

KEPT = ("mixed_precision", "optim", "deepspeed", "timesteps", "p_uncond", "ema")  # what shrinking must not touch


def kept_sections(original: dict, ran: dict) -> list[str]:
    """The settings the shrunk run changed among those it had to keep (none is the goal); a
    section is compared on the keys the file states (the rest are defaults in both)."""
    def same(a, b) -> bool:
        return all(same(a[k], b.get(k)) for k in a) if isinstance(a, dict) and isinstance(b, dict) else a == b

    return [k for k in KEPT if k in original and not same(original[k], ran.get(k))]


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_trains(path, launched_jobs):
    """Each configs/*.yaml, shrunk (tiny model, batch 4, 2 optimizer steps, local data) with its
    precision, parallelism (DeepSpeed ZeRO stage or DDP), accumulation, schedule and timestep
    settings kept, trains in a 2-process gloo job (``launched_jobs``): loss finite, the LR of each
    step on the config's schedule, a checkpoint, and a model that loads in this plain process."""
    import json
    import math

    import yaml

    from pipeline.training.optim import OptimConfig, lr_factor
    from tests.jobs import results

    for result in results(launched_jobs, path.stem):
        assert result["ok"], result["error"]
        assert result["world"] == 2
    run = launched_jobs / "configs" / path.stem
    if path.name.startswith("encode_"):
        meta = json.loads((run / "dataset.json").read_text())
        assert meta["samples"] == 48 and len(list(run.glob("latents-*.tar"))) == 4
        return
    original, ran = yaml.safe_load(path.read_text()), yaml.safe_load((run / "config.yaml").read_text())
    assert kept_sections(original, ran) == []
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    optim = OptimConfig(**{k: tuple(v) if k == "betas" else v for k, v in ran["optim"].items()})
    assert [m["lr"] for m in lines] == pytest.approx([optim.lr * lr_factor(s, optim, 2) for s in range(2)], rel=1e-12, abs=0)
    assert (run / "checkpoints/step-000002/train_state.json").exists()
    if path.name.startswith("autoencoder_"):
        from diffusers import AutoencoderKL

        assert all(math.isfinite(m["l1_rec"]) for m in lines)
        assert AutoencoderKL.from_pretrained(run / "vae").config.scaling_factor > 0
        return
    if path.name.startswith("pix2pix_"):
        from pipeline.models.translator import Translator

        assert all(math.isfinite(m["l1"]) for m in lines)
        assert Translator.from_pretrained(run / "generator").degradations == ["grayscale", "down4"]
        return
    from diffusers import PixArtTransformer2DModel

    from pipeline.models.dit import DiT

    assert all(math.isfinite(m["loss"]) for m in lines)
    if ran["deepspeed"]["enabled"]:
        assert len(list((run / "checkpoints/step-000002/accelerate").rglob("*optim_states.pt"))) == 2  # one partition per rank
    if ran["model"].get("architecture") == "pixart":
        assert PixArtTransformer2DModel.from_pretrained(run / "model/transformer").config.num_layers == 2
        return
    if ran.get("lora", {}).get("rank", 0) > 0:  # a LoRA fine-tune of the tiny teacher: adapters trained and saved
        from safetensors.torch import load_file

        from pipeline.training.lora import WEIGHT_NAME

        adapters = load_file(run / "lora" / WEIGHT_NAME)
        assert adapters and all(t.abs().max() > 0 for k, t in adapters.items() if "lora_B" in k)
        DiT.from_pretrained(run / "model/transformer")  # the fused export loads
        return
    assert DiT.from_pretrained(run / "model/transformer").config.depth == 2
