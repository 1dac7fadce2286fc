"""pipeline.models.dit: zero init, registry sizes, other resolutions, padding and null-condition
invariances (with and without the text refiner, with cross and joint text attention), save/load,
activation checkpointing, FLOPs, the joint (MMDiT) block against diffusers' reference, PixArt-α's
adaLN-single (``adaln="single"``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import DIT_CONFIGS, DiT, build_dit, count_parameters, flops_per_sample
from pipeline.models import dit_layers
from pipeline.models.dit_layers import SDPA_MIN_SCORES, attention

TEXT_DIM, CLIP_DIM, CLIP_TOKEN_DIM = 16, 12, 8
# DiT paper, Table 4 (class-conditional, learned sigma): parameters in millions.
PAPER_PARAMS_M = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


def tiny(**overrides) -> DiT:
    """A very small DiT with every kind of conditioning (seeded)."""
    cfg = dict(
        in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4,
        text_dim=TEXT_DIM, clip_dim=CLIP_DIM, clip_token_dim=CLIP_TOKEN_DIM,
    )
    torch.manual_seed(0)
    return DiT(**{**cfg, **overrides})


def perturbed(model: DiT) -> DiT:
    """Every weight moved off its init (the zero-initialised ones included), so outputs are non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None] < torch.tensor(lengths)[:, None]  # (B, total)


def inputs(h: int = 8, w: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Batch of 3: full text, partial text, no T5 tokens at all (mask all False)."""
    g = torch.Generator().manual_seed(seed)
    cond = {
        "t5": torch.randn(3, 5, TEXT_DIM, generator=g),
        "t5_mask": lengths_mask([5, 2, 0], 5),
        "clip": torch.randn(3, CLIP_DIM, generator=g),
        "clip_tokens": torch.randn(3, 4, CLIP_TOKEN_DIM, generator=g),
        "clip_tokens_mask": lengths_mask([4, 3, 0], 4),
    }
    return torch.randn(3, 4, h, w, generator=g), torch.rand(3, generator=g), cond


def pad(cond: dict[str, torch.Tensor], key: str, extra: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Append ``extra`` padding tokens (random values, mask False) to cond[key]."""
    g = torch.Generator().manual_seed(seed)
    tokens = cond[key]
    junk = torch.randn(tokens.shape[0], extra, tokens.shape[2], generator=g) * 100
    mask = torch.cat([cond[f"{key}_mask"], torch.zeros(tokens.shape[0], extra, dtype=torch.bool)], dim=1)
    return {**cond, key: torch.cat([tokens, junk], dim=1), f"{key}_mask": mask}


@pytest.fixture(params=[0, 2], ids=["plain", "refiner"])
def refiner(request: pytest.FixtureRequest) -> int:
    """Run a test without and with the text refiner (``text_refiner_depth``)."""
    return request.param


@pytest.fixture(params=["cross", "joint"])
def text_attention(request: pytest.FixtureRequest) -> str:
    """Run a test with both kinds of block: cross-attention (PixArt-α) and joint attention (SD3 MMDiT)."""
    return request.param


def test_fresh_model_outputs_exactly_zero(refiner: int, text_attention: str):
    x, t, cond = inputs()
    model = tiny(qk_norm=True, guidance_embed=True, text_refiner_depth=refiner, text_attention=text_attention)
    out = model(x, t, {**cond, "guidance": torch.full((3,), 4.0), "drop": torch.tensor([False, True, False])})
    assert out.shape == x.shape and torch.all(out == 0)
    plain = build_dit("DiT-tiny", sample_size=8)  # no text at all
    assert torch.all(plain(x, t, {}) == 0)


def test_fresh_blocks_are_identities(text_attention: str):
    """adaLN-Zero: zero gates (and zero cross-attention output) make every new block the identity
    (a joint block on both streams); zero residual outputs make every new refiner layer the identity."""
    model = tiny(qk_norm=True, text_refiner_depth=2, text_attention=text_attention, depth=3)
    seen = []

    def unchanged(module, args, out) -> None:
        if isinstance(out, tuple):  # a joint block: (image tokens, text tokens)
            seen.append(torch.equal(out[0], args[0]) and torch.equal(out[1], args[2]))
        else:
            seen.append(torch.equal(out, args[0]))

    for block in [*model.blocks, *model.text_refiner]:
        block.register_forward_hook(unchanged)
    x, t, cond = inputs()
    model(x, t, cond)
    assert seen == [True] * (len(model.blocks) + len(model.text_refiner))


@pytest.mark.parametrize("name", ["DiT-tiny", "DiT-S/2"])
def test_registry_sizes_run(name: str):
    model = perturbed(build_dit(name, sample_size=8, text_dim=TEXT_DIM, clip_dim=CLIP_DIM))
    x, t, cond = inputs()
    cond = {k: cond[k] for k in ("t5", "t5_mask", "clip")}
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def cross_attention_params(hidden: int, depth: int, text_dim: int) -> int:
    """Per block: pre-LayerNorm 2D, q D²+D, kv 2D²+2D, out D²+D; T5 Linear + LayerNorm; null token D."""
    return depth * (4 * hidden * hidden + 6 * hidden) + text_dim * hidden + 3 * hidden + hidden


def test_parameter_counts_match_the_dit_paper():
    for name, paper_m in PAPER_PARAMS_M.items():
        with torch.device("meta"):
            plain = build_dit(name)
            text = build_dit(name, text_dim=4096)
        cfg = DIT_CONFIGS[name]
        # The paper's models also hold a 1001-class embedding table and a learned-sigma output.
        assert abs(count_parameters(plain) / 1e6 - paper_m) / paper_m < 0.02, (name, count_parameters(plain))
        expected = count_parameters(plain) + cross_attention_params(cfg["hidden_size"], cfg["depth"], 4096)
        assert count_parameters(text) == expected
    with torch.device("meta"):
        meta_tiny = build_dit("DiT-tiny")
    assert count_parameters(meta_tiny) == count_parameters(build_dit("DiT-tiny"))  # meta and real agree


def test_other_resolutions_and_bad_sizes(text_attention: str):
    model = perturbed(tiny(text_attention=text_attention))
    for h, w in [(8, 12), (16, 16), (4, 2)]:
        x, t, cond = inputs(h, w)
        with torch.no_grad():
            out = model(x, t, cond)
        assert out.shape == (3, 4, h, w) and torch.isfinite(out).all()
    x, t, cond = inputs(7, 8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(x, t, cond)


@pytest.fixture(params=["matmul", "sdpa"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both attention paths: plain matmuls (short CPU sequences) and SDPA (elsewhere)."""
    if request.param == "sdpa":
        monkeypatch.setattr(dit_layers, "SDPA_MIN_SCORES", 0)
    return request.param


def test_padding_tokens_do_not_change_the_output(attention_path: str, refiner: int, text_attention: str):
    """With joint attention, padded text positions are updated in every block but stay masked
    keys in the next one (depth 3: they pass through two full joint blocks)."""
    model = perturbed(tiny(qk_norm=True, text_refiner_depth=refiner, text_attention=text_attention, depth=3))
    x, t, cond = inputs()
    with torch.no_grad():
        ref = model(x, t, cond)
        padded = model(x, t, pad(pad(cond, "t5", 3), "clip_tokens", 2))
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ref).all()  # the text-less row attends to the null token


def test_full_masks_equal_no_masks(refiner: int, text_attention: str):
    model = perturbed(tiny(text_refiner_depth=refiner, text_attention=text_attention))
    x, t, cond = inputs()
    full = {**cond, "t5_mask": lengths_mask([5] * 3, 5), "clip_tokens_mask": lengths_mask([4] * 3, 4)}
    bare = {k: v for k, v in cond.items() if not k.endswith("_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, full), model(x, t, bare), atol=1e-5, rtol=1e-5)


def test_dropped_rows_ignore_their_text(attention_path: str, refiner: int, text_attention: str):
    model = perturbed(tiny(text_refiner_depth=refiner, text_attention=text_attention, depth=3))
    x, t, cond = inputs()
    drop = torch.tensor([True, False, True])
    _, _, other = inputs(seed=7)  # different text, pooled vectors and token values for every row
    other = {**other, "t5_mask": lengths_mask([1, 2, 5], 5), "clip_tokens_mask": lengths_mask([2, 3, 4], 4)}
    with torch.no_grad():
        a = model(x, t, {**cond, "drop": drop})
        b = model(x, t, {**other, "drop": drop})
        kept = model(x, t, cond)
    torch.testing.assert_close(a[drop], b[drop], atol=1e-6, rtol=0)
    assert not torch.allclose(a[~drop], b[~drop])  # the kept row does see its text
    assert not torch.allclose(a[0], kept[0])  # dropping changes the output
    torch.testing.assert_close(a[1], kept[1], atol=1e-5, rtol=1e-5)  # and only for dropped rows


def test_no_text_tokens_at_all_is_finite(attention_path: str, refiner: int, text_attention: str):
    model = perturbed(tiny(text_refiner_depth=refiner, text_attention=text_attention))
    x, t, cond = inputs()
    empty = {**cond, "t5": cond["t5"][:, :0], "t5_mask": cond["t5_mask"][:, :0]}
    empty = {**empty, "clip_tokens": cond["clip_tokens"][:, :0], "clip_tokens_mask": cond["clip_tokens_mask"][:, :0]}
    with torch.no_grad():
        assert torch.isfinite(model(x, t, empty)).all()
        bare = {k: v for k, v in empty.items() if not k.endswith("_mask")}
        assert torch.isfinite(model(x, t, bare)).all()


def test_guidance_embedding_changes_the_output():
    model = perturbed(tiny(guidance_embed=True))
    x, t, cond = inputs()
    with torch.no_grad():
        low = model(x, t, {**cond, "guidance": torch.full((3,), 1.0)})
        high = model(x, t, {**cond, "guidance": torch.full((3,), 5.0)})
    assert not torch.allclose(low, high)
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, cond)


def test_cond_errors_are_clear():
    model = tiny()
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="unknown cond keys"):
        model(x, t, {**cond, "t5mask": cond["t5_mask"]})
    with pytest.raises(ValueError, match="'t5'"):
        model(x, t, {k: v for k, v in cond.items() if k != "t5"})
    with pytest.raises(ValueError, match="'clip'"):
        model(x, t, {**cond, "clip": torch.zeros(3, CLIP_DIM + 1)})


def test_save_pretrained_round_trip(tmp_path, text_attention: str):
    model = perturbed(tiny(qk_norm=True, guidance_embed=True, gradient_checkpointing=True, text_attention=text_attention))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_dim"] == TEXT_DIM and config["qk_norm"] is True and "gradient_checkpointing" not in config
    assert config["text_attention"] == text_attention
    loaded = DiT.from_pretrained(tmp_path).eval()
    x, t, cond = inputs()
    cond = {**cond, "guidance": torch.full((3,), 3.0), "drop": torch.tensor([False, True, False])}
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_configs_from_before_text_attention_load_as_cross(tmp_path):
    """A checkpoint saved before the option existed (no ``text_attention`` in its config) loads
    with cross-attention blocks and gives the same output."""
    model = perturbed(tiny(qk_norm=True))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DiT.from_pretrained(tmp_path).eval()
    assert loaded.config.text_attention == "cross" and isinstance(loaded.blocks[0], dit_layers.DiTBlock)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_gradient_checkpointing_gives_the_same_gradients(text_attention: str):
    x, t, cond = inputs()
    cond = {**cond, "drop": torch.tensor([False, True, False])}

    def grads(model: DiT) -> dict[str, torch.Tensor]:
        model.train().zero_grad()
        model(x, t, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = perturbed(tiny(text_attention=text_attention))
    plain = grads(model)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert tiny(gradient_checkpointing=True, text_attention=text_attention).is_gradient_checkpointing


def test_attention_paths_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (6, 5, 5))
    mask = lengths_mask([5, 2], 5)[:, None, None, :]  # (B, 1, 1, S)
    assert 6 * 5 < SDPA_MIN_SCORES  # the matmul path
    weights = torch.randn(2, 4, 6, 8, generator=g)
    for m in (None, mask):
        grads = []
        for fn in (attention, lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3])):
            leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
            out = fn(*leaves, m)
            (out * weights).sum().backward()
            grads.append([out.detach(), *(leaf.grad for leaf in leaves)])
        for ours, expected in zip(*grads):
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_flops_per_sample():
    xl = DIT_CONFIGS["DiT-XL/2"]
    # DiT paper: DiT-XL/2 at 256² (32² latents) is 118.6 GFLOPs counted as multiply-accumulates.
    assert abs(flops_per_sample(xl, 0) / 2 / 1e9 - 118.6) < 1.2
    for cfg in (xl, {**DIT_CONFIGS["DiT-S/2"], "text_dim": 4096}):
        small = flops_per_sample({**cfg, "sample_size": 32}, 64)
        large = flops_per_sample({**cfg, "sample_size": 64}, 64)
        assert small > 0 and 4.0 <= large / small <= 5.0  # ~4× tokens, plus a little quadratic attention
    model = tiny()
    assert flops_per_sample(model, 16) == flops_per_sample(dict(model.config), 16) > flops_per_sample(model, 0)
    D, L = 32, 16  # two refiner layers: 4 projections, scores + values and a 4×-wide MLP over L tokens
    refined = flops_per_sample({**model.config, "text_refiner_depth": 2}, L) - flops_per_sample(model, L)
    assert refined == 2 * 2 * (4 * L * D * D + 2 * L * L * D + 2 * L * D * 4 * D)


def test_flops_per_sample_joint():
    """Joint blocks: both streams' projections, MLPs and modulations and (L + N)² attention; the
    last block has only the text k / v and shift / scale, and N image queries."""
    model = tiny(text_attention="joint", depth=3)
    assert flops_per_sample(model, 16) == flops_per_sample(dict(model.config), 16)
    D, L, n, depth, mlp = 32, 16, 16, 3, 4 * 32  # sample 8, patch 2: 16 image tokens
    image = 4 * n * D * D + 2 * n * D * mlp + 6 * D * D  # qkv + out, MLP, adaLN
    text = 4 * L * D * D + 2 * L * D * mlp + 6 * D * D
    last = image + 2 * L * D * D + 2 * D * D + 2 * n * (n + L) * D  # text kv, text shift / scale, N queries
    blocks = (depth - 1) * (image + text + 2 * (n + L) ** 2 * D) + last
    rest = n * 4 * 4 * D + L * TEXT_DIM * D + 2 * D * D + n * D * 4 * 4  # patch embed, text proj, final layer
    assert flops_per_sample(model, L) == 2 * (blocks + rest)
    cross = {**model.config, "text_attention": "cross"}
    assert flops_per_sample(model, L) > flops_per_sample(cross, L)


def test_pos_interpolation_spans_the_base_grid_at_any_size():
    """PixArt-α: positions scaled by base / grid on each axis; the default grid is unchanged."""
    plain = dit_layers.sincos_pos_embed_2d(32, 4, 4)
    assert torch.equal(dit_layers.sincos_pos_embed_2d(32, 4, 4, base=4), plain)
    wide = dit_layers.sincos_pos_embed_2d(32, 2, 8, base=4)  # (16, 32): rows at 0, 2; columns at 0, 0.5, ..., 3.5
    assert torch.allclose(wide.view(2, 8, 32)[1, 2], plain.view(4, 4, 32)[2, 1])  # row 1 -> 2, column 2 -> 1
    model = DiT(sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, pos_interpolation=True)
    assert model._pos_embed(2, 8, torch.float32, torch.device("cpu")).shape == (1, 16, 32)
    x = torch.randn(2, 4, 4, 16)
    assert torch.equal(model(x, torch.rand(2)), torch.zeros_like(x))  # a fresh model still outputs zero


def test_word_order_is_read_where_the_model_attends_over_the_text(text_attention: str):
    """With a refiner or joint blocks, swapping two text tokens changes the output (positions tell
    words apart); with plain cross-attention, a set operation over the keys, nothing changes."""
    x, t, cond = inputs()
    swapped = {**cond, "t5": cond["t5"][:, [1, 0, 2, 3, 4]]}
    for depth, changes in ((0, text_attention == "joint"), (2, True)):
        model = perturbed(tiny(text_refiner_depth=depth, text_attention=text_attention))
        with torch.no_grad():
            a, b = model(x, t, cond)[0], model(x, t, swapped)[0]
        assert torch.allclose(a, b, atol=1e-5) is not changes, depth


def test_a_refiner_needs_text():
    with pytest.raises(ValueError, match="text_refiner_depth needs text tokens"):
        DiT(in_channels=4, sample_size=8, hidden_size=32, depth=1, num_heads=4, text_refiner_depth=1)


def test_text_attention_errors():
    with pytest.raises(ValueError, match="text_attention must be one of 'cross', 'joint'"):
        tiny(text_attention="mmdit")
    with pytest.raises(ValueError, match="joint.*needs text tokens"):
        DiT(in_channels=4, sample_size=8, hidden_size=32, depth=1, num_heads=4, clip_dim=CLIP_DIM, text_attention="joint")
    tiny(text_dim=0, text_attention="joint")  # CLIP tokens alone are text enough


@pytest.mark.parametrize("depth", [1, 3])
def test_the_last_joint_block_updates_only_the_image(depth: int):
    """SD3's ``context_pre_only``: the last block's text stream supplies keys and values only, so it
    holds a kv Linear, its k-norm and a shift / scale modulation, and nothing unused (DDP)."""
    model = perturbed(tiny(text_attention="joint", qk_norm=True, depth=depth)).train()
    full = {n.split(".")[0] for n, _ in model.blocks[0].text.named_parameters()} if depth > 1 else None
    last = model.blocks[-1].text
    assert {n for n, _ in last.named_parameters()} == {
        "kv.weight", "kv.bias", "k_norm.weight", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"
    }
    assert last.adaLN_modulation[-1].out_features == 2 * 32  # shift and scale, no gates
    assert depth == 1 or full == {"qkv", "q_norm", "k_norm", "proj", "mlp", "adaLN_modulation"}
    x, t, cond = inputs()
    context = []
    model.blocks[-1].register_forward_hook(lambda module, args, out: context.append(out[1] is args[2]))
    model(x, t, {**cond, "drop": torch.tensor([False, True, False])}).square().mean().backward()
    assert context == [True]  # the text stream leaves the last block untouched
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert unused == []


def diffusers_state_dict(block: dit_layers.JointBlock, last: bool) -> dict[str, torch.Tensor]:
    """Our joint block's weights under diffusers' ``JointTransformerBlock`` names."""
    image, text = block.image, block.text
    state = {"attn.norm_q.weight": image.q_norm.weight, "attn.norm_k.weight": image.k_norm.weight}
    state["attn.norm_added_k.weight"] = text.k_norm.weight
    fused = [(image.qkv, ("to_q", "to_k", "to_v"))]
    fused.append((text.kv, ("add_k_proj", "add_v_proj")) if last else (text.qkv, ("add_q_proj", "add_k_proj", "add_v_proj")))
    for linear, names in fused:
        for name, weight, bias in zip(names, linear.weight.chunk(len(names)), linear.bias.chunk(len(names))):
            state |= {f"attn.{name}.weight": weight, f"attn.{name}.bias": bias}
    same = {"attn.to_out.0": image.proj, "norm1.linear": image.adaLN_modulation[1]}
    same |= {"ff.net.0.proj": image.mlp.fc1, "ff.net.2": image.mlp.fc2}
    if not last:
        state["attn.norm_added_q.weight"] = text.q_norm.weight
        same |= {"attn.to_add_out": text.proj, "norm1_context.linear": text.adaLN_modulation[1]}
        same |= {"ff_context.net.0.proj": text.mlp.fc1, "ff_context.net.2": text.mlp.fc2}
    for name, linear in same.items():
        state |= {f"{name}.weight": linear.weight, f"{name}.bias": linear.bias}
    if last:  # diffusers' AdaLayerNormContinuous splits its output as (scale, shift), ours as (shift, scale)
        for kind in ("weight", "bias"):
            shift, scale = getattr(text.adaLN_modulation[1], kind).chunk(2)
            state[f"norm1_context.linear.{kind}"] = torch.cat([scale, shift])
    return state


@pytest.mark.parametrize("last", [False, True])
def test_joint_block_matches_the_diffusers_mmdit_block(last: bool):
    """Same maths as diffusers' ``JointTransformerBlock`` (SD3) with per-head RMS qk-norm, once the
    weights are copied over; the last block as its ``context_pre_only`` (no mask: it takes none)."""
    from diffusers.models.attention import JointTransformerBlock

    D, H = 32, 4
    torch.manual_seed(0)
    ours = perturbed(dit_layers.JointBlock(D, H, 4.0, qk_norm=True, last=last))
    ref = JointTransformerBlock(D, H, D // H, context_pre_only=last, qk_norm="rms_norm").eval()
    missing, unexpected = ref.load_state_dict(diffusers_state_dict(ours, last), strict=False)
    # diffusers keeps a text query projection in its last block; what it computes is thrown away.
    text_query = {"attn.add_q_proj.weight", "attn.add_q_proj.bias", "attn.norm_added_q.weight"}
    assert unexpected == [] and set(missing) == (text_query if last else set())
    g = torch.Generator().manual_seed(3)
    x, context, c = torch.randn(2, 16, D, generator=g), torch.randn(2, 5, D, generator=g), torch.randn(2, D, generator=g)
    with torch.no_grad():
        x_ours, context_ours = ours(x, c, context)
        context_ref, x_ref = ref(x, context, c)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
    if last:
        assert context_ref is None and context_ours is context
    else:
        torch.testing.assert_close(context_ours, context_ref, atol=1e-5, rtol=1e-5)


def test_inference_refines_only_the_kept_rows_and_agrees_with_training(text_attention: str):
    """Under no_grad, dropped rows skip the refiner (guidance's null half); with gradients every
    row is refined. Both give the same output."""
    model = perturbed(tiny(text_refiner_depth=2, text_attention=text_attention))
    x, t, cond = inputs()
    cond = {**cond, "drop": torch.tensor([False, True, False])}
    calls = []
    model.text_refiner[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        inference = model(x, t, cond)
    training = model(x, t, cond)
    assert calls == [2, 3]
    torch.testing.assert_close(inference, training.detach(), atol=1e-5, rtol=1e-5)


def test_reusing_text_computes_the_context_once_per_distinct_text(text_attention: str):
    """Inside ``reusing_text`` the text context (projections, refiner, null rows) of a text seen before
    is reused, bit for bit the same output; a new text, a changed value in a reused buffer, or
    leaving the block computes it again; with autograd it is never reused."""
    model = perturbed(tiny(text_refiner_depth=2, text_attention=text_attention))
    x, t, cond = inputs()
    cond = {**cond, "drop": torch.tensor([False, True, False])}
    other = inputs(seed=3)[2]
    calls, kv_calls = [], []
    model.text_refiner[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    if text_attention == "cross":  # a cross-attention block's keys and values are computed once too
        model.blocks[1].cross_attn.kv.register_forward_hook(lambda module, args, out: kv_calls.append(1))
    with torch.no_grad():
        plain = [model(x, t * s, cond) for s in (1.0, 0.5)]
        calls.clear(), kv_calls.clear()
        with model.reusing_text():
            reused = [model(x, t * s, {k: v.clone() for k, v in cond.items()}) for s in (1.0, 0.5)]  # equal values, new tensors
            assert calls == [2] and len(kv_calls) == (text_attention == "cross")  # the kept rows, once for both steps
            model(x, t, other)
            model(x, t, cond)
            assert calls == [2, 3]  # the other text once; the first still remembered
            buffer = inputs(seed=4)[2]
            model(x, t, buffer)
            buffer["t5"][0, 0] += 1.0  # the caller reuses its buffer with a new value
            changed = model(x, t, buffer)
            assert calls == [2, 3, 3, 3]
        model(x, t, cond)
        assert calls == [2, 3, 3, 3, 2]  # outside the block: computed every time
        torch.testing.assert_close(changed, model(x, t, buffer), atol=0, rtol=0)
    for a, b in zip(plain, reused):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with model.reusing_text():
        model(x, t, cond).sum().backward()  # gradients flow through the text: no memo
        model(x, t, cond).sum().backward()
    assert calls[-2:] == [3, 3] and model.t5_proj.linear.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# adaLN-single (PixArt-α §2.3): one shared modulation MLP plus a (6, D) table per block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaln", ["block", "single"])
def test_adaln_fresh_blocks_are_identities_and_the_output_zero(adaln: str):
    """Zero-initialised modulation (and tables) keep adaLN-Zero: every new block is the identity,
    with guidance and pooled CLIP feeding the conditioning, and the model's output is zero."""
    model = tiny(adaln=adaln, guidance_embed=True, qk_norm=True, depth=3)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(torch.equal(out, args[0])))
    x, t, cond = inputs()
    out = model(x, t, {**cond, "guidance": torch.full((3,), 4.0)})
    assert seen == [True] * 3 and out.shape == x.shape and torch.all(out == 0)


def test_adaln_single_holds_one_shared_modulation():
    """No per-block or final modulation MLP; the (6, D) and (2, D) tables; a perturbed model's
    output has the input's shape, is finite and depends on t through the shared MLP."""
    model = tiny(adaln="single", depth=3)
    assert model.adaln_single[-1].out_features == 6 * 32
    assert all(not hasattr(block, "adaLN_modulation") and block.scale_shift_table.shape == (6, 32) for block in model.blocks)
    assert not hasattr(model.final_layer, "adaLN_modulation") and model.final_layer.scale_shift_table.shape == (2, 32)
    model = perturbed(model)
    x, t, cond = inputs()
    with torch.no_grad():
        out = model(x, t, cond)
        other = model(x, t.flip(0), cond)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, other)


def test_adaln_single_parameter_count_matches_pixart_at_the_b2_shape():
    """At DiT-B/2's width and heads with 4 blocks and 768-wide text (benchmarks/dit_vs_pixart.py):
    adaLN-single brings our DiT to within 2% of diffusers' PixArt, where per-block adaLN is 26% over."""
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        ours = {adaln: DiT(in_channels=4, sample_size=32, patch_size=2, hidden_size=768, depth=4, num_heads=12,
                           text_dim=768, adaln=adaln) for adaln in ("block", "single")}
        pixart = PixArtTransformer2DModel(
            sample_size=32, in_channels=4, out_channels=4, patch_size=2, num_layers=4, attention_head_dim=64,
            num_attention_heads=12, cross_attention_dim=768, caption_channels=768, norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
    theirs = count_parameters(pixart)
    assert abs(count_parameters(ours["single"]) / theirs - 1) < 0.02
    assert count_parameters(ours["block"]) / theirs > 1.2
    D, depth = 768, 4  # per-block adaLN Linear D -> 6D, final D -> 2D; against one D -> 6D and the tables
    saved = depth * (6 * D * D + 6 * D) + (2 * D * D + 2 * D) - (6 * D * D + 6 * D) - depth * 6 * D - 2 * D
    assert count_parameters(ours["block"]) - count_parameters(ours["single"]) == saved


def test_adaln_single_save_pretrained_round_trip(tmp_path):
    model = perturbed(tiny(adaln="single", guidance_embed=True, qk_norm=True))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["adaln"] == "single"
    loaded = DiT.from_pretrained(tmp_path).eval()
    assert loaded.adaln_single is not None
    x, t, cond = inputs()
    cond = {**cond, "guidance": torch.full((3,), 3.0), "drop": torch.tensor([False, True, False])}
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_configs_from_before_adaln_load_per_block(tmp_path):
    """A checkpoint saved before the option existed (no ``adaln`` in its config) loads with
    per-block adaLN and gives the same output."""
    model = perturbed(tiny())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["adaln"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DiT.from_pretrained(tmp_path).eval()
    assert loaded.config.adaln == "block" and loaded.adaln_single is None
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_adaln_single_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    x, t, cond = inputs()
    cond = {**cond, "drop": torch.tensor([False, True, False])}  # every parameter gets a gradient

    def run(model: DiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train().zero_grad()
        out = model(x, t, cond)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = perturbed(tiny(adaln="single"))
    out, plain = run(model)
    model.enable_gradient_checkpointing()
    out_ckpt, checkpointed = run(model)
    assert torch.equal(out_ckpt, out)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_adaln_errors():
    with pytest.raises(ValueError, match="adaln must be one of 'block', 'single', got 'bogus'"):
        tiny(adaln="bogus")
    with pytest.raises(ValueError, match='adaln="single" needs text_attention="cross"'):
        tiny(adaln="single", text_attention="joint")


def test_flops_per_sample_adaln_single():
    """One shared c -> 6D modulation instead of one per block and the final layer's c -> 2D."""
    model = tiny(depth=3)
    D, depth = 32, 3
    single = flops_per_sample({**model.config, "adaln": "single"}, 16)
    assert flops_per_sample(model, 16) - single == 2 * ((depth - 1) * 6 * D * D + 2 * D * D)
    assert single == flops_per_sample(tiny(depth=3, adaln="single"), 16)


def test_qk_norm_reaches_the_cross_attention_keys():
    """With ``qk_norm`` the cross-attention's keys are RMS-normed too (on every path: the memo's
    precomputed keys and values included): its k-norm's weight moves the output."""
    model = perturbed(tiny(qk_norm=True))
    x, t, cond = inputs()
    with torch.no_grad():
        before = model(x, t, cond)
        with model.reusing_text():
            assert torch.equal(model(x, t, cond), before)
        model.blocks[0].cross_attn.k_norm.weight.mul_(3.0)
        assert (model(x, t, cond) - before).abs().max() > 1e-3
