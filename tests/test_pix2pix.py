"""pipeline.train_pix2pix: the GAN losses by hand, the conditional PatchGAN's input, the U-Net
generator (shapes, skip connections, dropout, save/load), real training runs on paired shards
(cgan and l2 lower the L1 to the target; the exported generator and its report), the 5:1
discriminator ratio counted, exact resume, and one-line config errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline import train_pix2pix
from pipeline.models.autoencoder import PatchDiscriminator
from pipeline.models.translator import Translator, TranslatorConfig, build_translator
from pipeline.training.gan_losses import d_loss, g_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge D: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> 0.25; relu(1 - 2) = 0, relu(1 + 0) = 1 -> 0.5; halved
    assert d_loss("hinge", real, fake).item() == 0.5 * (0.25 + 0.5)
    assert g_loss("hinge", fake).item() == 1.0  # -mean(fake)
    bce_d = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-2.0) + softplus(0.0)) / 2)  # -log σ(real), -log(1 - σ(fake))
    assert d_loss("bce", real, fake).item() == pytest.approx(bce_d, rel=1e-6)
    assert g_loss("bce", fake).item() == pytest.approx((softplus(2.0) + softplus(0.0)) / 2, rel=1e-6)  # -log σ(fake)
    with pytest.raises(ValueError, match="hinge, bce"):
        g_loss("wgan", fake)


def test_non_saturating_loss_keeps_its_gradient_where_d_is_sure():
    """Goodfellow's point: where D rejects a fake with confidence (logit -10), ``log(1 - σ)``'s
    gradient vanishes but ``-log σ``'s is about -1."""
    logit = torch.tensor([-10.0], requires_grad=True)
    g_loss("bce", logit).backward()
    saturating = torch.tensor([-10.0], requires_grad=True)
    torch.log1p(-torch.sigmoid(saturating)).sum().backward()
    assert logit.grad.item() == pytest.approx(-1.0, abs=1e-4) and abs(saturating.grad.item()) < 1e-4


def test_conditional_discriminator_sees_source_and_image():
    torch.manual_seed(0)
    plain, conditional = PatchDiscriminator(8, 2), PatchDiscriminator(8, 2, in_channels=6)
    assert plain.net[0].weight.shape == (8, 3, 4, 4) and conditional.net[0].weight.shape == (8, 6, 4, 4)
    source, image = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    logits = conditional(torch.cat([source, image], 1))
    assert logits.shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6: one logit per patch
    other = conditional(torch.cat([torch.rand(2, 3, 32, 32), image], 1))
    assert not torch.allclose(logits, other)  # the same image judged against another source
    with pytest.raises(RuntimeError):
        conditional(image)


def tiny_generator(**extra) -> Translator:
    torch.manual_seed(0)
    cfg = TranslatorConfig(base_channels=8, depth=3, **extra)
    return build_translator(cfg, ["grayscale", "down4"])


def test_generator_shapes_dropout_and_errors():
    g = tiny_generator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert g(x).shape == (2, 3, 32, 32) and g(x).abs().max() < 1
    g.train()
    assert not torch.equal(g(x), g(x))  # dropout is the generator's noise while training
    out = g.translate(x)
    assert g.training and torch.equal(out, g.translate(x)) and not out.requires_grad  # eval inside, mode restored
    with pytest.raises(ValueError, match="multiples of 8"):
        g.translate(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError):
        TranslatorConfig(base_channels=12, norm_groups=8)


@pytest.mark.parametrize("source_skip", [True, False])
def test_skip_connections_carry_the_source_past_the_bottleneck(source_skip):
    """With the innermost encoder output zeroed, what reaches the output comes through the skip
    connections only (an encoder-decoder without them would give one image for every source): the
    output still follows the source, over the whole image."""
    g = tiny_generator(source_skip=source_skip, dropout=0.0).eval()
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    before = (g.translate(x) - g.translate(y)).abs().mean()
    g.down[-1].register_forward_hook(lambda module, args, out: torch.zeros_like(out))  # (B, 32, 4, 4) bottleneck -> 0
    change = (g.translate(x) - g.translate(y)).abs().amax(1)[0]  # (32, 32)
    assert (change > 1e-4).float().mean() > 0.9 and change.mean() > 0.1 * before
    assert g.head.in_channels == (8 + 3 if source_skip else 16)  # the source beside the decoder's features, or not


def test_save_and_load_give_the_same_translations(tmp_path):
    g = tiny_generator()
    g.save_pretrained(tmp_path / "generator", safe_serialization=True)
    loaded = Translator.from_pretrained(tmp_path / "generator")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert (tmp_path / "generator/diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(loaded.translate(x), g.translate(x))
    assert loaded.degradations == ["grayscale", "down4"] and loaded.config.depth == 3


# ---------------------------------------------------------------------------- real training runs


def args(shards, out, *extra):
    tiny = ["model.base_channels=8", "model.depth=3", "loss.disc_channels=8", "data.held_out=12", "data.loader.batch_size=8"]
    return [f"data.shards={shards}", f"output_dir={out}", "run=p2p", "eval_every=0", "logging.every=1", *tiny, *extra]


def metric_lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["cgan", "l2"])
def test_training_lowers_the_l1_and_exports_a_generator(paired_image_shards, tmp_path, kind):
    steps = 24
    extra = [f"loss.kind={kind}", f"steps={steps}", "optim.lr=3e-3", "eval_every=12", f"checkpoint.every={steps}"]
    assert train_pix2pix.main(args(paired_image_shards, tmp_path, *extra)) == 0
    run = tmp_path / "p2p"
    lines = metric_lines(run)
    first, last = lines[0]["l1"], np.mean([m["l1"] for m in lines[-4:]])
    assert last < 0.8 * first, (first, last)
    assert [m["step"] for m in lines if "val_loss" in m] == [12, 24]
    g = Translator.from_pretrained(run / "generator")
    assert g.degradations == ["grayscale", "down4"]
    report = json.loads((run / "eval.json").read_text())
    assert report["psnr_held_out"] == pytest.approx(held_out_psnr(g, paired_image_shards), abs=1e-4)
    assert report["held_out"] == 12 and set(report["by_degradation"]) == {"grayscale", "down4"}
    assert lines[-1]["psnr_held_out_64"] == pytest.approx(report["psnr_held_out"], abs=1e-4)  # all 12 held out, the final weights
    assert (run / "samples.png").exists()
    has_disc = (run / "checkpoints/step-000024/accelerate/model_1.safetensors").exists()
    assert has_disc == (kind == "cgan") and ("d_loss" in lines[-1]) == (kind == "cgan")


def held_out_psnr(g: Translator, shards) -> float:
    """PSNR of the exported generator's translations of the 12 held-out pairs, computed here."""
    from pipeline.data.latents import shard_list
    from pipeline.data.quality import psnr
    from pipeline.training.pix2pix import held_out_pairs

    pairs = held_out_pairs(shard_list(shards)[-1], 12, 32)
    return float(psnr(g.translate(pairs["source"]), pairs["image"]).mean())


def test_five_discriminator_updates_per_generator_update_and_exact_resume(paired_image_shards, tmp_path):
    """``loss.d_steps=5`` (WGAN's n_critic): 5 discriminator optimizer steps (and LR-schedule steps)
    per generator step; stopping at step 2 and resuming gives the uninterrupted run's weights."""
    same = ["loss.d_steps=5", "loss.gan=hinge", "checkpoint.every=2", "checkpoint.keep=5", "optim.warmup_steps=3"]
    assert train_pix2pix.main(args(paired_image_shards, tmp_path / "full", "steps=4", *same)) == 0
    assert train_pix2pix.main(args(paired_image_shards, tmp_path / "part", "steps=2", *same)) == 0
    assert train_pix2pix.main(args(paired_image_shards, tmp_path / "part", "steps=4", *same)) == 0
    full = tmp_path / "full/p2p"
    assert [m["d_updates"] for m in metric_lines(full)] == [5, 10, 15, 20]
    state = json.loads((full / "checkpoints/step-000004/train_state.json").read_text())
    assert (state["step"], state["d_updates"]) == (4, 20)
    sched_d = torch.load(full / "checkpoints/step-000004/sched_d.pt", weights_only=True)
    sched_g = torch.load(full / "checkpoints/step-000004/sched_g.pt", weights_only=True)
    assert (sched_g["last_epoch"], sched_d["last_epoch"]) == (4, 20)
    for name in ("accelerate/model.safetensors", "accelerate/model_1.safetensors"):  # the generator, the discriminator
        a, b = (load_file(str(tmp_path / d / "p2p/checkpoints/step-000004" / name)) for d in ("full", "part"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


def test_unconditional_discriminator_sees_the_image_alone(paired_image_shards, tmp_path):
    assert train_pix2pix.main(args(paired_image_shards, tmp_path, "steps=1", "loss.conditional=false", "checkpoint.every=1")) == 0
    disc = load_file(str(tmp_path / "p2p/checkpoints/step-000001/accelerate/model_1.safetensors"))
    assert disc["net.0.weight"].shape == (8, 3, 4, 4)


def test_unpaired_shards_and_bad_ratio_are_one_line(image_shards, tmp_path, capsys):
    assert train_pix2pix.main(args(image_shards, tmp_path, "steps=1")) == 2
    err = capsys.readouterr().err
    assert "config error: data.shards" in err and "not a paired image-shard folder" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        train_pix2pix.main(args(image_shards, tmp_path, "steps=1", "loss.d_steps=5", "optim.grad_accum=2"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "d_steps" in err and len(err.strip().splitlines()) == 1
