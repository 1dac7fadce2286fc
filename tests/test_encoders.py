"""pipeline.encoders: frozen VAE / T5 / CLIP round-trips through their real loaders, and
data_tools.make_encoders (deterministic tiny text encoders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import sentencepiece as spm
import torch
from diffusers import AutoencoderKL

from data_tools import make_encoders
from pipeline.config import ConfigError, from_dict, load_config
from pipeline.encoders import (
    ClipEncoderConfig,
    EncoderLoadError,
    FrozenCLIP,
    FrozenT5,
    FrozenVAE,
    T5EncoderConfig,
    TextEncoders,
    TextEncodersConfig,
    VAEConfig,
    resolve_dtype,
)

SHORT = "a red circle"
LONG = "a small red circle at the top left and a large green square at the center on a light blue background"


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae(tiny_vae_dir: Path) -> FrozenVAE:
    return FrozenVAE(VAEConfig(path=str(tiny_vae_dir)))


@pytest.fixture(scope="module")
def raw_vae(tiny_vae_dir: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_vae_dir).eval()


def test_vae_encode_normalises_with_the_recorded_factors(vae, raw_vae):
    x = images()
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downsample) == (0.5, 0.1, 4, 4)
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (raw - 0.1) * 0.5, rtol=0, atol=1e-6)
    info = vae.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["scaling_factor"] == 0.5 and info["shift_factor"] == 0.1 and info["downsample"] == 4
    assert frozen(vae)


def test_vae_decode_inverts_the_normalisation_and_clamps(vae, raw_vae):
    z = vae.encode(images())
    out = vae.decode(z)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        expected = raw_vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(images(size=30))


def test_vae_config_factors_take_precedence(tiny_vae_dir, raw_vae):
    vae = FrozenVAE(VAEConfig(path=str(tiny_vae_dir), scaling_factor=2.0, shift_factor=0.0))
    x = images()
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(vae.encode(x), raw * 2.0, rtol=0, atol=1e-6)
    assert vae.describe()["scaling_factor"] == 2.0 and vae.describe()["shift_factor"] == 0.0


def test_vae_subfolder_and_missing_shift_factor(tiny_vae_dir, tmp_path):
    shutil.copytree(tiny_vae_dir, tmp_path / "pipe" / "vae")
    config_file = tmp_path / "pipe" / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    del config["shift_factor"]  # as in SD VAEs: no shift -> 0.0
    config_file.write_text(json.dumps(config))
    vae = FrozenVAE(VAEConfig(path=str(tmp_path / "pipe"), subfolder="vae"))
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.0)
    assert vae.describe()["subfolder"] == "vae"
    assert vae.encode(images()).shape == (2, 4, 8, 8)


def test_vae_sampling_the_posterior_follows_the_generator(tiny_vae_dir, vae):
    sampler = FrozenVAE(VAEConfig(path=str(tiny_vae_dir), sample_posterior=True))
    x = images()
    first = sampler.encode(x, generator=torch.Generator().manual_seed(3))
    again = sampler.encode(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, vae.encode(x))


def test_vae_load_errors_name_the_path(tmp_path):
    with pytest.raises(EncoderLoadError, match="missing-vae"):
        FrozenVAE(VAEConfig(path=str(tmp_path / "missing-vae")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="empty"):
        FrozenVAE(VAEConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="scaling_factor"):
        from_dict(VAEConfig, {"path": "x", "scaling_factor": 0})


# ----------------------------------------------------------------------------- T5


@pytest.fixture(scope="module")
def t5(tiny_text_encoders_dir: Path) -> FrozenT5:
    return FrozenT5(T5EncoderConfig(path=str(tiny_text_encoders_dir / "t5")))


def test_t5_mask_marks_real_tokens_and_padding_is_zero(t5):
    emb, mask = t5.encode([SHORT, LONG])
    lengths = [len(t5.tokenizer(text).input_ids) for text in (SHORT, LONG)]  # words + </s>
    assert lengths[0] < lengths[1]
    assert emb.shape == (2, lengths[1], t5.width) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0]:].any()
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    assert t5.width == 64 and frozen(t5)


def test_t5_embeddings_do_not_depend_on_the_batch(t5):
    alone, alone_mask = t5.encode([SHORT])
    batch, _ = t5.encode([LONG, SHORT, "a cross"])
    n = int(alone_mask.sum())
    torch.testing.assert_close(batch[1, :n], alone[0, :n], rtol=0, atol=1e-5)


def test_t5_truncates_to_max_length(tiny_text_encoders_dir):
    short = FrozenT5(T5EncoderConfig(path=str(tiny_text_encoders_dir / "t5"), max_length=5))
    emb, mask = short.encode([LONG, SHORT])
    assert emb.shape[1] == 5 and mask[0].all()
    with pytest.raises(TypeError):
        short.encode(LONG)  # a bare string is not a batch


def test_t5_tokenizer_keeps_caption_words_whole(t5, tiny_text_encoders_dir):
    for word in make_encoders.caption_words():
        assert len(t5.tokenizer.tokenize(word)) == 1, word
    ids = t5.tokenizer(LONG).input_ids
    assert ids[-1] == t5.tokenizer.eos_token_id == 1 and t5.tokenizer.pad_token_id == 0
    assert t5.tokenizer.unk_token_id not in ids and len(ids) == len(LONG.split()) + 1
    sp = spm.SentencePieceProcessor(model_file=str(tiny_text_encoders_dir / "t5" / "spiece.model"))
    for text in (LONG, "A photograph of a Zebra, eating 42 apples!"):
        assert sp.encode(text) + [1] == t5.tokenizer(text).input_ids


def test_t5_load_errors_name_the_path(tmp_path):
    with pytest.raises(EncoderLoadError, match="no-t5-here"):
        FrozenT5(T5EncoderConfig(path=str(tmp_path / "no-t5-here")))
    with pytest.raises(ConfigError, match="max_length"):
        from_dict(T5EncoderConfig, {"path": "x", "max_length": 0})


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tiny_text_encoders_dir: Path) -> Path:
    return tiny_text_encoders_dir / "clip"


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> FrozenCLIP:
    return FrozenCLIP(ClipEncoderConfig(path=str(clip_dir), return_tokens=True))


def test_clip_pooled_and_tokens(clip):
    out = clip.encode([SHORT, LONG])
    lengths = [len(clip.tokenizer.encode(text)) + 2 for text in (SHORT, LONG)]  # + start, end
    assert out["pooled"].shape == (2, 64) and out["pooled"].dtype == torch.float32
    assert out["tokens"].shape == (2, max(lengths), clip.token_width) and out["tokens"].dtype == torch.float32
    mask = out["tokens_mask"]
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert (out["tokens"][~mask] == 0).all()
    alone = clip.encode([SHORT])
    torch.testing.assert_close(out["tokens"][0, : lengths[0]], alone["tokens"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["pooled"][0], alone["pooled"][0], rtol=0, atol=1e-5)
    assert (clip.width, clip.token_width) == (64, 64)
    assert clip.model.visual is None and frozen(clip)


def test_clip_stops_at_the_longest_caption_as_open_clip_would_over_the_whole_context(clip):
    """The tower runs over the batch's longest caption only (causal mask): open_clip's full-context
    ``encode_text`` gives the same pooled vector."""
    ids = clip.tokenizer([SHORT, LONG])  # (2, C)
    assert int(clip._lengths(ids).max()) < ids.shape[1]  # there is padding to skip
    pooled, tokens = clip._forward(ids)
    assert tokens.shape[1] == int(clip._lengths(ids).max())
    torch.testing.assert_close(pooled, clip.model.encode_text(ids), rtol=0, atol=1e-5)


TOKENIZER_CASES = [
    SHORT, LONG, "", "   ", "A  Big\tRED\ncircle", "it's a dog's life, isn't it? they'll've", "IT'S", "x2 = 3.14 + 10^6!!",
    "rock & roll", "rock &amp; roll", "&lt;b&gt;", "caf\u00e9 na\u00efve", "\u201cquoted\u201d", "\u00c3\u00a9 mojibake",
    "\uff21\uff22 wide", "\ufb01ne ligature", "line\r\nbreak", "tab\x0bvertical", "bell\x07 and \x1b[31mred", "<start_of_text>",
    "a <end_of_text> b", "emoji \U0001f600 ok", "--- ___ ...", "lots " * 100, "a" * 300,
]


def test_clip_tokenizer_gives_open_clips_ids(clip, monkeypatch):
    """The fast tokenizer (``pipeline.encoders.clip_tokens``) is what the encoder uses, and its ids
    are open_clip's, plain ASCII and every case it hands back to open_clip, truncation included."""
    from pipeline.encoders import clip_tokens
    from pipeline.encoders.clip_tokens import ClipTokenizer

    assert isinstance(clip.tokenizer, ClipTokenizer)
    reference = open_clip.get_tokenizer(f"local-dir:{clip.cfg.path}")
    rng = __import__("random").Random(0)
    alphabet = "abcXYZ019 '.,!?-&;\t\n"
    cases = TOKENIZER_CASES + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(300)]
    assert torch.equal(clip.tokenizer(cases), reference(cases))
    assert torch.equal(clip.tokenizer(cases, context_length=16), reference(cases, context_length=16))
    assert torch.equal(clip.tokenizer(SHORT), reference(SHORT))
    assert clip.tokenizer(cases).shape == (len(cases), clip.context_length)
    monkeypatch.setattr(clip_tokens, "_MAX_WORDS", 3)  # a bounded word cache, emptied when full: the same ids
    small = ClipTokenizer(reference)
    assert torch.equal(small(cases[:40]), reference(cases[:40])) and len(small._words) <= 3


def test_clip_is_deterministic_across_loads_and_tokens_are_optional(clip_dir, clip):
    plain = FrozenCLIP(ClipEncoderConfig(path=str(clip_dir)))
    out = plain.encode([SHORT, LONG])
    assert set(out) == {"pooled"}
    torch.testing.assert_close(out["pooled"], clip.encode([SHORT, LONG])["pooled"], rtol=0, atol=0)


def test_clip_model_name_with_checkpoint(clip_dir, tmp_path):
    config = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    checkpoint = clip_dir / "open_clip_model.safetensors"
    by_name = FrozenCLIP(ClipEncoderConfig(model="tiny-test-clip", checkpoint=str(checkpoint)))
    by_path = FrozenCLIP(ClipEncoderConfig(path=str(clip_dir)))
    torch.testing.assert_close(by_name.encode([LONG])["pooled"], by_path.encode([LONG])["pooled"])
    assert by_name.describe()["checkpoint"] == str(checkpoint)
    with pytest.raises(EncoderLoadError, match="nope.safetensors"):
        FrozenCLIP(ClipEncoderConfig(model="tiny-test-clip", checkpoint=str(tmp_path / "nope.safetensors")))


def test_clip_config_and_load_errors(tmp_path):
    for bad in ({}, {"path": "a", "model": "ViT-L-14"}, {"model": "ViT-L-14"}, {"path": "a", "checkpoint": "b"}):
        with pytest.raises(ConfigError):
            from_dict(ClipEncoderConfig, bad)
    with pytest.raises(EncoderLoadError, match="no-clip-here"):
        FrozenCLIP(ClipEncoderConfig(path=str(tmp_path / "no-clip-here")))
    (tmp_path / "no-config").mkdir()
    with pytest.raises(EncoderLoadError, match="open_clip_config.json"):
        FrozenCLIP(ClipEncoderConfig(path=str(tmp_path / "no-config")))


def test_clip_folder_without_weights_is_an_error(clip_dir, tmp_path):
    (tmp_path / "no-weights").mkdir()
    shutil.copy(clip_dir / "open_clip_config.json", tmp_path / "no-weights")
    with pytest.raises(EncoderLoadError, match="no-weights"):
        FrozenCLIP(ClipEncoderConfig(path=str(tmp_path / "no-weights")))


# ----------------------------------------------------------------------------- TextEncoders


def test_text_encoders_per_config(tiny_text_encoders_dir):
    cfg = load_config(TextEncodersConfig, tiny_text_encoders_dir / "encoders.yaml")
    both = TextEncoders(cfg).encode([SHORT, LONG])
    assert set(both) == {"t5", "t5_mask", "clip"}
    assert both["t5"].shape[:2] == both["t5_mask"].shape and both["clip"].shape == (2, 64)

    t5_only = TextEncoders(TextEncodersConfig(t5=cfg.t5))
    assert set(t5_only.encode([SHORT])) == {"t5", "t5_mask"}
    assert t5_only.describe()["clip"] is None and t5_only.describe()["t5"]["width"] == 64

    cfg.clip.return_tokens = True
    clip_only = TextEncoders(TextEncodersConfig(clip=cfg.clip))
    assert set(clip_only.encode([SHORT])) == {"clip", "clip_tokens", "clip_tokens_mask"}
    assert clip_only.describe()["t5"] is None

    clip_only.train()  # a parent switching to train mode must not unfreeze the encoders
    assert not clip_only.clip.training and not clip_only.clip.model.training

    with pytest.raises(ConfigError, match="at least one"):
        from_dict(TextEncodersConfig, {})


def test_bf16_compute_gives_float32_outputs(tiny_text_encoders_dir, tiny_vae_dir, t5, clip):
    text = TextEncoders(TextEncodersConfig(
        t5=T5EncoderConfig(path=str(tiny_text_encoders_dir / "t5"), dtype="bf16"),
        clip=ClipEncoderConfig(path=str(tiny_text_encoders_dir / "clip"), dtype="bf16", return_tokens=True)))
    out = text.encode([SHORT, LONG])
    assert all(v.dtype == torch.float32 for k, v in out.items() if not k.endswith("mask"))
    assert next(text.t5.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out["t5"], t5.encode([SHORT, LONG])[0], rtol=0.1, atol=0.1)
    torch.testing.assert_close(out["clip"], clip.encode([SHORT, LONG])["pooled"], rtol=0.1, atol=0.1)
    vae = FrozenVAE(VAEConfig(path=str(tiny_vae_dir), dtype="bf16"))
    z = vae.encode(images())
    assert z.dtype == torch.float32 and vae.decode(z).dtype == torch.float32
    assert resolve_dtype("fp16") == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("fp8")


# ----------------------------------------------------------------------------- make_encoders


def test_make_encoders_is_deterministic(tiny_text_encoders_dir, tmp_path):
    assert make_encoders.main(["--output", str(tmp_path / "again"), "--seed", "0"]) == 0
    files = sorted(p.relative_to(tiny_text_encoders_dir) for p in tiny_text_encoders_dir.rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"t5/model.safetensors", "t5/tokenizer.json", "t5/spiece.model",
                                       "clip/open_clip_model.safetensors", "clip/open_clip_config.json",
                                       "encoders.yaml"}
    for name in files:
        if name != Path("encoders.yaml"):  # holds the (different) absolute paths
            assert (tmp_path / "again" / name).read_bytes() == (tiny_text_encoders_dir / name).read_bytes(), name
    cfg = load_config(TextEncodersConfig, tmp_path / "again" / "encoders.yaml")
    assert cfg.t5.path == str((tmp_path / "again" / "t5").resolve())


def test_make_encoders_trains_the_tokenizer_on_given_captions(tiny_text_encoders_dir, tmp_path):
    (tmp_path / "captions" / "deeper").mkdir(parents=True)
    for i in range(50):
        (tmp_path / "captions" / "deeper" / f"{i:03d}.txt").write_text("a zebra under a rainbow\n")
    out = tmp_path / "out"
    shutil.copytree(tiny_text_encoders_dir, out)  # rewritten in place, nothing stale kept
    assert make_encoders.main(["--output", str(out), "--captions", str(tmp_path / "captions")]) == 0
    t5 = FrozenT5(T5EncoderConfig(path=str(out / "t5")))
    assert t5.tokenizer.tokenize("zebra rainbow") == ["\u2581zebra", "\u2581rainbow"]
    with pytest.raises(SystemExit):
        make_encoders.main(["--output", str(out), "--captions", str(tmp_path / "missing")])
