"""Image-conditioned DiT (``model.image_condition``): InstructPix2Pix's channel concat (Brooks et al.
2023; Flux Control) and FLUX.1 Kontext's sequence concat.

Unit level: a text-to-image DiT widened with zero channels (``model.init`` + ``concat``) gives the
teacher's outputs for any source; ``sequence`` appends the source's tokens on their own (offset)
positions and predicts the noisy ones only, and the source matters once the zero-initialised layers
are perturbed; a dropped source is the zero latent; the three-way dropout hits its rates from one
draw per row (a text-to-image run draws as before); dual guidance equals its three separate calls
and, at ``s_I = 1``, plain guidance with the source kept; FLOPs count the widened embedding and
the doubled sequence.

Runs (``paired_latents``): the one-process cell of ``jobs.COND_CELLS`` (the teacher widened, bf16,
accumulation 2, three-way dropout, validation on held-out sources, a final source | output grid)
resumes exactly; its model folder records the mode and degradations, holds the EMA, and
``TextToImage.generate(images=...)`` from it equals the EMA's own samples; ``pipeline.edit`` on it
gives the same image; a conditioned run on latents without sources is one line. The DDP and ZeRO-2
cells run in the 2-process launch (``tests/test_matrix.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.diffusion.guidance import guided_velocity
from pipeline.models.dit import DiT, build_dit, flops_per_sample
from pipeline.models.dit_layers import sincos_pos_embed_2d
from pipeline.models.pretrained import find_pretrained, load_pretrained
from pipeline.training.dit import condition
from tests import jobs

B = 3


def tiny(image_condition: str | None = None, perturb: bool = True, seed: int = 0) -> DiT:
    """A 2-block DiT with T5 and CLIP widths; ``perturb``: every weight random (a fresh DiT outputs zero)."""
    torch.manual_seed(seed)
    model = build_dit("DiT-tiny", depth=2, in_channels=4, sample_size=8, text_dim=32, clip_dim=16, image_condition=image_condition)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    return model.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    cond = {"t5": torch.randn(B, 5, 32, generator=g), "clip": torch.randn(B, 16, generator=g),
            "drop": torch.tensor([False, True, False]), "image": torch.randn(B, 4, 8, 8, generator=g)}
    return torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g), cond


# ---------------------------------------------------------------------------- the model


def test_a_widened_teacher_equals_the_teacher_for_any_source(tmp_path):
    """``model.init`` of a text-to-image folder with ``image_condition=concat``: the source's input
    channels are zero, so the output is the teacher's whatever the source (atol 1e-6)."""
    teacher = tiny()
    teacher.save_pretrained(tmp_path / "teacher")
    widened = load_pretrained(find_pretrained(str(tmp_path / "teacher")), image_condition="concat").eval()
    assert widened.config.image_condition == "concat" and widened.x_embedder.weight.shape[1] == 8
    assert torch.equal(widened.x_embedder.weight[:, :4], teacher.x_embedder.weight)
    assert widened.x_embedder.weight[:, 4:].abs().max() == 0
    x, t, cond = inputs()
    text = {k: v for k, v in cond.items() if k != "image"}
    with torch.no_grad():
        expected = teacher(x, t, text)
        for image in (cond["image"], 10 * torch.randn_like(x), torch.zeros_like(x)):
            assert torch.allclose(widened(x, t, {**text, "image": image}), expected, atol=1e-6, rtol=0)
    same = load_pretrained(find_pretrained(str(tmp_path / "teacher")), image_condition="sequence")  # no widening: the same weights
    assert same.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in same.state_dict().items())
    widened.save_pretrained(tmp_path / "conditioned")
    with pytest.raises(ConfigError, match="image_condition=concat"):
        load_pretrained(find_pretrained(str(tmp_path / "conditioned")), image_condition="sequence")


def test_a_fresh_conditioned_model_outputs_zero_and_ignores_its_source():
    for mode in ("concat", "sequence"):
        model = tiny(mode, perturb=False)
        x, t, cond = inputs()
        assert model(x, t, cond).abs().max() == 0, mode
    assert tiny("concat", perturb=False).x_embedder.weight[:, 4:].abs().max() == 0


def test_sequence_appends_the_source_on_offset_positions_and_predicts_the_noisy_tokens():
    model = tiny("sequence")
    x, t, cond = inputs()
    out = model(x, t, cond)
    assert out.shape == x.shape
    other = model(x, t, {**cond, "image": torch.randn_like(x)})
    assert (out - other).abs().max() > 1e-3, "the source's tokens do not reach the output"
    # The source's positions are the grid below the image's: rows gh..2gh-1 of a 2gh-row table.
    table = model._pos_embed(4, 4, torch.float32, torch.device("cpu"), row_offset=4)[0]
    assert torch.allclose(table, sincos_pos_embed_2d(128, 8, 4)[16:], atol=1e-6)
    assert not torch.allclose(table, model._pos_embed(4, 4, torch.float32, torch.device("cpu"))[0])


@pytest.mark.parametrize("mode", ["concat", "sequence"])
def test_a_dropped_source_is_the_zero_latent(mode):
    model = tiny(mode)
    x, t, cond = inputs()
    drop = torch.tensor([True, False, True])
    zeroed = cond["image"].clone()
    zeroed[drop] = 0
    assert torch.equal(model(x, t, {**cond, "drop_image": drop}), model(x, t, {**cond, "image": zeroed}))
    assert not torch.allclose(model(x, t, cond), model(x, t, {**cond, "image": zeroed}))


def test_sources_are_checked():
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="no image_condition"):
        tiny()(x, t, cond)
    with pytest.raises(ValueError, match=r"cond\['image'\].*required"):
        tiny("concat")(x, t, {k: v for k, v in cond.items() if k != "image"})
    with pytest.raises(ValueError, match="x's shape"):
        tiny("concat")(x, t, {**cond, "image": cond["image"][:, :, :4]})
    with pytest.raises(ValueError, match="image_condition must be"):
        tiny("channels")


def test_flops_count_the_widened_embedding_and_the_doubled_sequence():
    base = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=4, sample_size=8)
    D, n, C, p, hm = 64, 16, 4, 2, 256
    text_only = flops_per_sample(base, tokens_text=0)
    assert flops_per_sample({**base, "image_condition": "concat"}, 0) - text_only == 2 * n * C * p * p * D
    block = lambda tokens: 4 * tokens * D * D + 2 * tokens * D * hm + 6 * D * D + 2 * tokens * tokens * D
    sequence = 2 * (2 * n * C * p * p * D + 2 * block(2 * n) + 2 * D * D + n * D * p * p * C)
    assert flops_per_sample({**base, "image_condition": "sequence"}, 0) == sequence
    assert text_only == 2 * (n * C * p * p * D + 2 * block(n) + 2 * D * D + n * D * p * p * C)


# ---------------------------------------------------------------------------- dropout and guidance


def test_three_way_dropout_rates_from_one_draw_per_row():
    rows = 200_000
    batch = {"latent": torch.zeros(rows, 1), "src_latent": torch.zeros(rows, 4, 2, 2), "clip": torch.zeros(rows, 2)}
    torch.manual_seed(0)
    plain = condition(batch, 0.05, torch.device("cpu"))
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    cond = condition(batch, 0.05, torch.device("cpu"), 0.05, 0.05, image=True)
    assert torch.equal(torch.rand(1), after_plain), "a conditioned step draws more random numbers than a text-to-image one"
    text, image = cond["drop"], cond["drop_image"]
    rates = [(text & ~image).float().mean(), (image & ~text).float().mean(), (text & image).float().mean()]
    assert all(abs(rate - 0.05) < 0.003 for rate in rates), rates  # standard error 0.0005
    assert torch.equal(text & ~image, plain["drop"]), "the text-only drop is not the text-to-image draw"
    assert torch.equal(cond["image"], batch["src_latent"]) and "image" not in plain and "drop_image" not in plain
    torch.manual_seed(0)
    none = condition(batch, 0.05, torch.device("cpu"), image=True)
    assert torch.equal(none["drop"], plain["drop"]) and not none["drop_image"].any()


@pytest.mark.parametrize("mode", ["concat", "sequence"])
def test_dual_guidance_is_its_three_calls_in_one(mode):
    """``v_u + s_T (v_both − v_img) + s_I (v_img − v_u)``; at s_I = 1, plain guidance with the source kept."""
    model = tiny(mode)
    x, t, cond = inputs()
    cond = {k: v for k, v in cond.items() if k != "drop"}
    s_t, s_i = 4.0, 1.5
    with torch.no_grad():
        v_both = model(x, t, cond)
        v_img = model(x, t, {**cond, "drop": torch.ones(B, dtype=torch.bool)})
        v_u = model(x, t, {**cond, "drop": torch.ones(B, dtype=torch.bool), "drop_image": torch.ones(B, dtype=torch.bool)})
        expected = v_u + s_t * (v_both - v_img) + s_i * (v_img - v_u)
        assert torch.allclose(guided_velocity(model, x, t, cond, s_t, s_i), expected, atol=1e-5)
        rows = torch.tensor([1.0, 4.0, 7.5])
        per_row = guided_velocity(model, x, t, cond, rows, torch.tensor([1.5, 1.5, 2.0]))
        assert torch.allclose(per_row[2], (v_u + 7.5 * (v_both - v_img) + 2.0 * (v_img - v_u))[2], atol=1e-5)
        plain = v_img + s_t * (v_both - v_img)
        assert torch.allclose(guided_velocity(model, x, t, cond, s_t, 1.0), plain, atol=1e-5)
        assert torch.equal(guided_velocity(model, x, t, cond, s_t, 1.0), guided_velocity(model, x, t, cond, s_t))


def test_the_diffusers_pipeline_refuses_a_conditioned_student():
    from pipeline.inference.diffusers_pipeline import LatentDiffusionPipeline

    with pytest.raises(ValueError, match="image-conditioned transformer samples with euler"):
        LatentDiffusionPipeline(tiny("concat"), None, None, sampler="consistency")


def test_config_checks():
    from pipeline.training.dit_config import ModelConfig, TrainConfig

    with pytest.raises(ValueError, match="must be < 1"):
        TrainConfig(model=ModelConfig(image_condition="concat"), p_uncond=0.5, p_drop_image=0.3, p_drop_both=0.2)
    with pytest.raises(ValueError, match="needs model.image_condition"):
        TrainConfig(p_drop_image=0.05)
    with pytest.raises(ValueError, match="DiT option"):
        ModelConfig(architecture="pixart", name="PixArt-tiny", image_condition="concat")


def test_a_conditioned_run_on_latents_without_sources_is_one_line(latent_shards, tmp_path, capsys):
    from pipeline import train

    code = train.main([f"data.latents={latent_shards}", f"output_dir={tmp_path}", "model.image_condition=concat",
                       "deepspeed.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "data.latents" in err and "image_condition" in err, err


# ---------------------------------------------------------------------------- a run, its export, inference

ONE = ("one", "bf16", 2)
NAME = "cond-" + jobs.cell_name(*ONE)


@pytest.fixture(scope="module")
def one_process_cond_run(paired_latents, teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cond-one")
    extra = ("validation.every=2", "validation.count=8", "validation.bins=2", "validation.batch_size=8", "sampling.sources=2")
    for spec in jobs.cond_jobs(*ONE, paired_latents, teacher_dir, out, grid=True, extra=extra):
        (out / f"{spec['name']}.rank0.json").write_text(json.dumps(jobs.run_job(spec)))
    return out


def test_one_process_conditioned_run_resumes_exactly_and_exports(one_process_cond_run, paired_latents):
    from tests.test_matrix import check_export_is_the_ema, check_run_and_resume, metrics

    out = one_process_cond_run
    check_run_and_resume(out, NAME, 1)
    check_export_is_the_ema(out / NAME)
    lines = metrics(out / NAME)
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4]
    assert (out / NAME / "samples/final.png").is_file()
    index = json.loads((out / NAME / "model/model_index.json").read_text())
    degradations = json.loads((paired_latents / "dataset.json").read_text())["image_condition"]["degradations"]
    assert index["info"]["image_condition"] == {"mode": "concat", "degradations": degradations}
    assert index["info"]["sampling"]["image_guidance"] == 1.5
    transformer = json.loads((out / NAME / "model/transformer/config.json").read_text())
    assert transformer["image_condition"] == "concat"


def test_generate_from_the_export_equals_the_ema_and_edit_runs_it(one_process_cond_run, paired_image_shards, tmp_path):
    """``TextToImage.from_folder`` of the export with ``images=`` gives the images a pipeline holding
    the checkpoint's EMA gives (bit for bit); without sources it is one clear error; ``pipeline.edit
    --image SRC`` gives generate's image for that source."""
    from PIL import Image
    from safetensors.torch import load_file

    from pipeline.inference.edit_cli import main as edit_main
    from pipeline.inference.pipeline import TextToImage

    run = one_process_cond_run / NAME
    pipe = TextToImage.from_folder(run / "model")
    assert pipe.image_condition["mode"] == "concat"
    shard = sorted(paired_image_shards.glob("*.tar"))[0]
    import tarfile

    with tarfile.open(shard) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.endswith(".src.png"))[:2]
        images = [Image.open(tar.extractfile(name)).convert("RGB") for name in names]
        images = [im.copy() for im in images]
    prompts = ["a large red circle at the center on a white background", "a small blue square at the top left"]
    out, _ = pipe.generate(prompts, steps=3, guidance=3.0, seed=5, images=images, image_guidance=1.5)
    ema = DiT.from_config(pipe.transformer.config)
    ema.load_state_dict(load_file(str(run / f"checkpoints/step-{jobs.CELL_STEPS:06d}/ema.safetensors")))
    reference = TextToImage(ema, pipe.vae, pipe.text, pipe.latent_shape, image_condition=pipe.image_condition)
    expected, _ = reference.generate(prompts, steps=3, guidance=3.0, seed=5, images=images, image_guidance=1.5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, expected))
    plain, _ = pipe.generate(prompts, steps=3, guidance=3.0, seed=5, images=images, image_guidance=1.0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, plain)), "image_guidance changed nothing"
    with pytest.raises(ValueError, match="image-conditioned.*images="):
        pipe.generate(prompts, steps=2)
    images[0].save(tmp_path / "src.png")
    assert edit_main(["--model", str(run / "model"), "--image", str(tmp_path / "src.png"), "--prompt", prompts[0], "--steps", "3",
                      "--guidance", "3.0", "--image-guidance", "1.5", "--seed", "5", "--output", str(tmp_path / "out.png")]) == 0
    alone, _ = pipe.generate(prompts[:1], steps=3, guidance=3.0, seed=5, images=images[:1], image_guidance=1.5)  # the CLI's batch
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(alone[0]))
    assert edit_main(["--model", str(run / "model"), "--image", str(tmp_path / "src.png"), "--strength", "0.5",
                      "--output", str(tmp_path / "bad.png")]) == 2


def test_the_exported_diffusers_pipeline_samples_what_generate_samples(one_process_cond_run, paired_image_shards):
    """``LatentDiffusionPipeline.from_pretrained`` of a conditioned export, given ``image=``, follows
    ``TextToImage``'s dual-guided Euler from the same noise and sources; without ``image=`` (or with
    a negative prompt) it is one clear line."""
    import tarfile

    from PIL import Image

    from pipeline.inference.diffusers_pipeline import LatentDiffusionPipeline
    from pipeline.inference.pipeline import TextToImage

    folder = one_process_cond_run / NAME / "model"
    ours, theirs = TextToImage.from_folder(folder), LatentDiffusionPipeline.from_pretrained(folder)
    with tarfile.open(sorted(paired_image_shards.glob("*.tar"))[0]) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.endswith(".src.png"))[:2]
        images = [Image.open(tar.extractfile(name)).convert("RGB").copy() for name in names]
    prompts = ["a large red circle at the center on a white background", "a small blue square at the top left"]
    noise = ours.noise_per_image([5, 6])
    sources = ours.encode_sources(images, images[0].size)
    expected = ours.latents(prompts, 4, 3.0, 1.0, [5, 6], noise, sources, 2.0)
    got = theirs(prompts, num_inference_steps=4, guidance_scale=3.0, latents=noise, image=images, image_guidance_scale=2.0,
                 output_type="latent").images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    plain = theirs(prompts, num_inference_steps=4, guidance_scale=3.0, latents=noise, image=images, image_guidance_scale=1.0,
                   output_type="latent").images
    assert (plain - got).abs().max() > 5e-5  # the image guidance is applied (the tiny run barely reads its source)
    with pytest.raises(ValueError, match="give image=, one source per prompt"):
        theirs(prompts, num_inference_steps=2)
    with pytest.raises(ValueError, match="negative prompt"):
        theirs(prompts, num_inference_steps=2, image=images, negative_prompt="x")


def test_distilling_a_conditioned_teacher_is_one_line_before_any_work(one_process_cond_run, paired_latents, tmp_path, capsys):
    from pipeline import distill

    teacher = one_process_cond_run / NAME / "model"
    code = distill.main([f"teacher={teacher}", f"data.latents={paired_latents}", f"output_dir={tmp_path}", "deepspeed.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "image-conditioned" in err and "teacher" in err, err
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing was started
