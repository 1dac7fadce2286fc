"""``model.init``: training starts from a pretrained model (``pipeline.models.pretrained``).

Fine-tuned for 20 steps from each format the trainer accepts, checkpointed at 10 and resumed from
there: our exported model folder (the ``teacher_dir`` DiT) and a stock diffusers
``PixArtSigmaPipeline`` folder saved here (the PixArt profile, its scheduler's ``flow_shift``
adopted); the network starts as the checkpoint's weights, the loss falls, the resumed run logs the
same losses and ends with the same EMA, and the export loads back. Refused in one line each: a
folder that is not there, one that holds no model, an SD3 transformer, and latents whose channels,
T5 width or VAE do not match the checkpoint's.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from tests import jobs

STEPS, RESUME_AT = 20, 10
SHIFT = 2.0  # the PixArt pipeline folder's scheduler flow_shift


def fine_tune_jobs(name: str, init: Path, latents: Path, out: Path) -> list[dict]:
    common = [f"data.latents={latents}", f"output_dir={out}", f"model.init={init}", *jobs.MODES["one"], "data.loader.batch_size=8",
              "optim.lr=1e-3", "optim.warmup_steps=2", f"steps={STEPS}", f"checkpoint.every={RESUME_AT}", "checkpoint.keep=5",
              "logging.every=1", "sampling.prompts=[]", "ema.decay=0.9"]
    return [jobs.job(name, "train", [*common, f"run={name}"]),
            jobs.job(f"{name}-resumed", "train", [*common, f"run={name}-resumed"], resume_from={"run": str(out / name), "step": RESUME_AT})]


def check_fine_tune(out: Path, name: str) -> list[float]:
    """Both runs ran; the loss fell; the resumed run logged the same losses and ended with the same EMA."""
    full = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / f"{name}-resumed" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in full]
    assert [m["step"] for m in full] == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert [m["loss"] for m in resumed if m["step"] > RESUME_AT] == losses[RESUME_AT:], "the resumed run drifted"
    a, b = (load_file(str(out / run / f"checkpoints/step-{STEPS:06d}/ema.safetensors")) for run in (name, f"{name}-resumed"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return losses


def built(init: Path, latents: Path, out: Path) -> torch.nn.Module:
    """The network a run with ``model.init=init`` starts from."""
    from pipeline.config import load_config
    from pipeline.training.dit import build_model, located_meta
    from pipeline.training.dit_config import TrainConfig

    cfg = load_config(TrainConfig, None, [f"data.latents={latents}", f"output_dir={out}", f"model.init={init}"])
    return build_model(cfg, located_meta(cfg, "test"))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pixart_pipeline_dir(tmp_path_factory, tiny_vae_dir, tiny_text_encoders_dir) -> Path:
    """A stock ``PixArtSigmaPipeline`` folder (the tiny T5, tokenizer and VAE; a tiny PixArt with
    diffusers' own random initialisation; flow DPM-Solver++ with ``flow_shift`` 2)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from pipeline.models.pixart import pixart_config

    folder = tmp_path_factory.mktemp("pixart_pipeline")
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**pixart_config("PixArt-tiny", in_channels=4, sample_size=8, caption_channels=64))
    t5 = tiny_text_encoders_dir / "t5"
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
    pipe = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(t5), text_encoder=T5EncoderModel.from_pretrained(t5),
                               vae=AutoencoderKL.from_pretrained(tiny_vae_dir), transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def test_fine_tunes_our_exported_folder_and_resumes_exactly(teacher_dir, latent_shards, tmp_path):
    from pipeline.models.dit import DiT

    assert same_weights(built(teacher_dir, latent_shards, tmp_path), DiT.from_pretrained(teacher_dir / "transformer"))
    for spec in fine_tune_jobs("from-ours", teacher_dir, latent_shards, tmp_path):
        result = jobs.run_job(spec)
        assert result["ok"], result["error"]
    check_fine_tune(tmp_path, "from-ours")
    assert DiT.from_pretrained(tmp_path / "from-ours/model/transformer").config.depth == DiT.load_config(teacher_dir / "transformer")["depth"]


def test_fine_tunes_a_pixart_sigma_pipeline_folder_and_resumes_exactly(pixart_pipeline_dir, latent_shards, tmp_path):
    """A diffusers folder trains in the PixArt profile (whatever ``model.architecture`` says), with
    its scheduler's shift for training and sampling; a bare transformer folder starts alike."""
    from diffusers import PixArtTransformer2DModel

    stock = PixArtTransformer2DModel.from_pretrained(pixart_pipeline_dir / "transformer")
    for init in (pixart_pipeline_dir, pixart_pipeline_dir / "transformer"):
        model = built(init, latent_shards, tmp_path)
        assert model.architecture == "pixart" and same_weights(model.transformer, stock)
        assert model.null_t5_mask.tolist() == [True]  # the encoding of "": one end-of-sequence token
    for spec in fine_tune_jobs("from-pixart", pixart_pipeline_dir, latent_shards, tmp_path):
        result = jobs.run_job(spec)
        assert result["ok"], result["error"]
    check_fine_tune(tmp_path, "from-pixart")
    ran = yaml.safe_load((tmp_path / "from-pixart/config.yaml").read_text())
    assert (ran["timesteps"]["shift"], ran["sampling"]["shift"]) == (SHIFT, SHIFT)
    exported = PixArtTransformer2DModel.from_pretrained(tmp_path / "from-pixart/model/transformer")
    assert exported.config.num_layers == stock.config.num_layers and not same_weights(exported, stock)


def refusal(capsys, latents: Path, out: Path, init: Path | str) -> str:
    """``pipeline.train`` with ``model.init=init``: exit code 2 and its one line."""
    from pipeline import train

    code = train.main([f"data.latents={latents}", f"output_dir={out}", f"model.init={init}", "deepspeed.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_what_cannot_start_a_run_is_one_line(pixart_pipeline_dir, latent_shards, tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    from pipeline.models.pixart import pixart_config

    assert "model.init: /no/such/model not found" in refusal(capsys, latent_shards, tmp_path, "/no/such/model")
    (tmp_path / "empty").mkdir()
    assert "is not a model folder" in refusal(capsys, latent_shards, tmp_path, tmp_path / "empty")
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                          pos_embed_max_size=8).save_pretrained(tmp_path / "sd3")
    err = refusal(capsys, latent_shards, tmp_path, tmp_path / "sd3")
    assert "SD3Transformer2DModel" in err and "pooled" in err and "context_embedder" in err
    for name, change, expected in [("wide", {"caption_channels": 32}, "T5 width is 64 but"),
                                   ("channels", {"in_channels": 16}, "latent channels is 4 but")]:
        config = {**pixart_config("PixArt-tiny", in_channels=4, sample_size=8, caption_channels=64), **change}
        PixArtTransformer2DModel(**config).save_pretrained(tmp_path / name)
        assert expected in refusal(capsys, latent_shards, tmp_path, tmp_path / name)
    other_vae = tmp_path / "other_vae"
    shutil.copytree(pixart_pipeline_dir, other_vae, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(pixart_pipeline_dir / "transformer", other_vae / "transformer", dirs_exist_ok=True)
    vae_config = json.loads((other_vae / "vae/config.json").read_text())
    (other_vae / "vae/config.json").write_text(json.dumps({**vae_config, "block_out_channels": [64, 128, 128]}))
    err = refusal(capsys, latent_shards, tmp_path, other_vae)
    assert "the latents' vae" in err and "block_out_channels=[32, 64, 64]" in err and "[64, 128, 128]" in err
