"""LoRA fine-tuning (``pipeline.training.lora``, ``lora.*`` of ``pipeline.train``).

Unit level: the target presets resolve to the expected linears; bad targets, ranks and types are
one config line; the adapter file in diffusers' LoRA format loads back with
``load_lora_adapter`` into a plain DiT and gives the same outputs; the fused copy gives the
adapter's outputs and is a plain DiT.

Runs (the matrix's cells with adapters on a trained base, ``jobs.lora_jobs``): one process in fp32
(with adapter dropout) and in bf16 with a bf16 base, here; 2-process DDP (bf16 base), ZeRO-2 and
ZeRO-3 in bf16 with accumulation 2 in the one launch (``launched_jobs``). Each: the loss is finite,
the resumed run logs the same losses and ends with the same EMA adapters bit for bit; the base is
bit-identical to the folder it came from (the one-process checkpoints; the fused export's
untargeted weights everywhere); only adapters are trained and averaged; the export is
``RUN/lora/pytorch_lora_weights.safetensors`` holding the EMA's adapters (non-zero ``lora_B``,
under ZeRO-3 too) and ``RUN/model``, a plain DiT equal to base + (alpha / r)·B·A.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from pipeline.config import ConfigError, load_config
from pipeline.data.model_folder import read_model_info
from pipeline.models.dit import DiT, build_dit
from pipeline.training import lora
from pipeline.training.dit_config import LoraConfig, TrainConfig
from tests import jobs
from tests.test_matrix import check_run_and_resume

ONE_PROCESS_CELLS = {  # name: (mode, precision, accum, extra overrides)
    "lora-one-no-accum1": ("one", "no", 1, ("lora.dropout=0.1",)),
    "lora-one-bf16-accum2": ("one", "bf16", 2, ("lora.base_dtype=bf16",)),
}
RANK, ALPHA = 4, 8.0  # jobs.LORA


def tiny(joint: bool = False) -> DiT:
    """A 2-block DiT with text whose weights are all random (a fresh DiT outputs exactly zero)."""
    torch.manual_seed(0)
    model = build_dit("DiT-tiny", depth=2, in_channels=4, sample_size=8, text_dim=32, clip_dim=16,
                      text_attention="joint" if joint else "cross")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    cond = {"t5": torch.randn(2, 5, 32, generator=g), "clip": torch.randn(2, 16, generator=g)}
    return torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), cond


def with_random_adapter(model: DiT, targets: str | list[str] = "attention_mlp") -> DiT:
    """``model`` with a rank-4 adapter whose B is random too (a fresh B is zero: no effect)."""
    lora.add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.05)
    return model


# ---------------------------------------------------------------------------- targets and config


def test_presets_resolve_to_the_expected_linears():
    model = tiny()
    attention = {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj")}
    mlp = {f"blocks.{i}.mlp.{m}" for i in (0, 1) for m in ("fc1", "fc2")}
    ada = {f"blocks.{i}.adaLN_modulation.1" for i in (0, 1)}
    assert set(lora.target_modules(model, "attention")) == attention
    assert set(lora.target_modules(model, "attention_mlp")) == attention | mlp
    assert set(lora.target_modules(model, "all_linear")) == attention | mlp | ada
    assert set(lora.target_modules(model, "blocks:1-1")) == {n for n in attention | mlp | ada if n.startswith("blocks.1.")}
    assert lora.target_modules(model, ["fc2", "final_layer.linear"]) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "final_layer.linear"]
    joint = set(lora.target_modules(tiny(joint=True), "attention"))  # the last block's text stream has only k/v
    assert joint == {"blocks.0.image.qkv", "blocks.0.image.proj", "blocks.0.text.qkv", "blocks.0.text.proj",
                     "blocks.1.image.qkv", "blocks.1.image.proj", "blocks.1.text.kv"}


@pytest.mark.parametrize("override, named", [
    ("lora.rank=-1", "rank must be >= 0"),
    ("lora.rank=2.5", "lora.rank"),
    ("lora.targets=attn", "targets must be one of"),
    ("lora.targets=blocks:3-1", "targets must be one of"),
    ("lora.targets=[]", "targets must be a non-empty list"),
    ("lora.base_dtype=fp16", "lora.base_dtype"),
    ("lora.alpha=0", "alpha must be > 0"),
    ("lora.dropout=1", "dropout must be in"),
    ("lora.rnk=4", "unknown key 'lora.rnk'"),
])
def test_a_bad_lora_setting_is_one_line(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["lora.rank=4", override])
    assert named in str(err.value) and "\n" not in str(err.value)


def test_base_dtype_needs_a_rank():
    with pytest.raises(ConfigError, match="needs rank > 0"):
        load_config(TrainConfig, None, ["lora.base_dtype=bf16"])


@pytest.mark.parametrize("targets, named", [(["nosuch"], "lora.targets=['nosuch']"), ("blocks:1-5", "lora.targets=blocks:1-5")])
def test_targets_matching_nothing_in_the_model_are_one_line(targets, named):
    with pytest.raises(ConfigError) as err:
        lora.target_modules(tiny(), targets)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_run_whose_targets_match_nothing_stops_with_one_line(latent_shards, tmp_path, capsys):
    from pipeline import train

    args = [f"data.latents={latent_shards}", f"output_dir={tmp_path}", "deepspeed.enabled=false", "lora.rank=4", "lora.targets=[nosuch]"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline.train: config error: lora.targets=['nosuch'] selects no nn.Linear") and "\n" not in err


# ---------------------------------------------------------------------------- the file and fusing


def test_the_adapter_file_loads_back_into_a_plain_dit(tmp_path):
    """diffusers' format: ``transformer.``-prefixed lora_A / lora_B keys, the config in
    ``lora_adapter_metadata``; ``load_lora_adapter`` on a plain copy of the base gives the same outputs."""
    base = tiny()
    model = with_random_adapter(copy.deepcopy(base))
    path = lora.save_adapter(tmp_path, model)
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    targets = lora.target_modules(base, "attention_mlp")
    assert sorted(keys) == sorted(f"transformer.{m}.lora_{ab}.weight" for m in targets for ab in "AB")
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (RANK, ALPHA)
    assert sorted(meta["transformer.target_modules"]) == sorted(targets)
    x, t, cond = inputs()
    with torch.no_grad():
        expected = model(x, t, cond)
        base.load_lora_adapter(tmp_path, weight_name=lora.WEIGHT_NAME, adapter_name="trained")
        assert torch.equal(base(x, t, cond), expected)
        base.disable_lora()
        assert not torch.equal(base(x, t, cond), expected)  # the adapter does something


def test_the_fused_copy_is_a_plain_dit_with_the_adapters_output(tmp_path):
    model = with_random_adapter(tiny())
    fused = lora.fused_copy(model)
    assert set(fused.state_dict()) == set(tiny().state_dict())  # no lora key, no base_layer
    x, t, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, cond), model(x, t, cond), rtol=1e-5, atol=1e-5)
    fused.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = DiT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, cond), fused(x, t, cond))


def test_the_ema_averages_only_the_adapters():
    from pipeline.training.ema import EMA

    model = with_random_adapter(tiny())
    ema = EMA(model, 0.5, trainable_only=True)
    assert set(ema._params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in ema._params)


# ---------------------------------------------------------------------------- runs


def base_state(teacher: Path) -> dict[str, np.ndarray]:
    return load_file(str(teacher / "transformer/diffusion_pytorch_model.safetensors"))


def check_lora_run(out: Path, name: str, teacher: Path, base_dtype: str = "fp32") -> None:
    """The export: the adapter file holds the EMA's adapters (lora_B non-zero) and the model folder
    is a plain DiT equal to the base with (alpha / r)·B·A added to the targeted weights, every other
    weight bit-identical to the base. The EMA checkpoint holds adapters only."""
    run = out / name
    ema = load_file(str(run / f"checkpoints/step-{jobs.CELL_STEPS:06d}/ema.safetensors"))
    assert ema and all(".lora_" in k for k in ema)
    adapter = load_file(str(run / "lora" / lora.WEIGHT_NAME))
    assert {k.removeprefix("transformer.").replace(".weight", ".default.weight") for k in adapter} == set(ema)
    for key, value in adapter.items():
        assert np.array_equal(value, ema[key.removeprefix("transformer.").replace(".weight", ".default.weight")]), key
    assert all(np.abs(v).max() > 0 for k, v in adapter.items() if ".lora_B" in k), "an adapter's B stayed zero"
    base, exported = base_state(teacher), load_file(str(run / "model/transformer/diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(base)
    if base_dtype == "bf16":
        base = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in base.items()}
    targeted = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in adapter if ".lora_A" in k}
    for key, value in base.items():
        module = key.rsplit(".", 1)[0]
        if module in targeted and key.endswith(".weight"):
            a, b = adapter[f"transformer.{module}.lora_A.weight"], adapter[f"transformer.{module}.lora_B.weight"]
            np.testing.assert_allclose(exported[key], value + (ALPHA / RANK) * b @ a, rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(exported[key], value), key
    info = read_model_info(run / "model")["lora"]
    assert info == {"fused": True, "rank": RANK, "alpha": ALPHA, "targets": "attention_mlp"}


@pytest.fixture(scope="module")
def one_process_lora_runs(latent_shards, teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-one")
    for mode, precision, accum, extra in ONE_PROCESS_CELLS.values():
        for spec in jobs.lora_jobs(mode, precision, accum, latent_shards, teacher_dir, out, extra=extra, grid=precision == "bf16"):
            (out / f"{spec['name']}.rank0.json").write_text(json.dumps(jobs.run_job(spec)))
    return out


def base_dtype_of(name: str) -> str:
    """The ``lora.base_dtype`` a LoRA cell ran with."""
    extra = ONE_PROCESS_CELLS[name][3] if name in ONE_PROCESS_CELLS else jobs.LORA_EXTRA.get(tuple(name.split("-")[1:3]), ())
    return "bf16" if "lora.base_dtype=bf16" in extra else "fp32"


@pytest.mark.parametrize("name", list(ONE_PROCESS_CELLS))
def test_one_process_lora_trains_only_adapters_and_resumes_exactly(name, one_process_lora_runs, teacher_dir):
    """Also: the trained weights' frozen base is bit-identical to the folder it came from (in the
    base's dtype), and the resumed run ends with the same adapters bit for bit."""
    from safetensors.torch import load_file as load_tensors

    out, base_dtype = one_process_lora_runs, base_dtype_of(name)
    check_run_and_resume(out, name, 1)
    check_lora_run(out, name, teacher_dir, base_dtype)
    assert (out / name / "samples/final.png").is_file() == (ONE_PROCESS_CELLS[name][1] == "bf16")  # a grid from the EMA's adapters
    final = f"checkpoints/step-{jobs.CELL_STEPS:06d}/accelerate/model.safetensors"
    weights, resumed = (load_tensors(str(out / run / final)) for run in (name, f"{name}-resumed"))
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    frozen = {k.replace(".base_layer", ""): v for k, v in weights.items() if ".lora_" not in k}
    base = {k: torch.from_numpy(v) for k, v in base_state(teacher_dir).items()}
    assert frozen.keys() == base.keys()
    dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    assert all(frozen[k].dtype == dtype and torch.equal(frozen[k], base[k].to(dtype)) for k in base)
    assert all(v.dtype == torch.float32 for k, v in weights.items() if ".lora_" in k)  # the adapters stay fp32


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
@pytest.mark.parametrize("cell", jobs.LORA_CELLS, ids=["lora-" + jobs.cell_name(*c) for c in jobs.LORA_CELLS])
def test_lora_cell_trains_resumes_exactly_and_exports(cell, launched_jobs, teacher_dir):
    name = "lora-" + jobs.cell_name(*cell)
    check_run_and_resume(launched_jobs, name, 2)
    check_lora_run(launched_jobs, name, teacher_dir, base_dtype_of(name))
    if cell[0] == "ddp":  # the adapters' buckets are all-reduced on the window's last micro-batch only
        for result in jobs.results(launched_jobs, name):
            assert result["allreduce_micro"] and set(result["allreduce_micro"]) == {cell[2] - 1}, result["allreduce_micro"]


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_zero3_saves_the_whole_adapters(launched_jobs):
    """Under ZeRO-3 the adapters are partitioned: the EMA gathers them (only them) every step, and
    the file written from it holds non-zero lora_B equal to the EMA's, not the empty shards."""
    name = "lora-" + jobs.cell_name("zero3", "bf16", 2)
    run = launched_jobs / name
    ema = load_file(str(run / f"checkpoints/step-{jobs.CELL_STEPS:06d}/ema.safetensors"))
    adapter = load_file(str(run / "lora" / lora.WEIGHT_NAME))
    b = {k: v for k, v in adapter.items() if ".lora_B" in k}
    assert b and all(np.abs(v).max() > 0 for v in b.values())
    for key, value in b.items():
        assert np.array_equal(value, ema[key.removeprefix("transformer.").replace(".weight", ".default.weight")])


def test_a_model_without_the_adapter_mixin_is_one_line():
    """Only our DiT has diffusers' PeftAdapterMixin (a PixArt-Σ run with lora.rank > 0 stops here)."""
    with pytest.raises(ConfigError, match="takes no LoRA adapters"):
        lora.add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(rank=2, targets=["0"]))
