"""Typed configuration of ``pipeline.train`` (DiT + rectified flow), one dataclass per section.

Image conditioning (``model.image_condition``, ``p_drop_image``, ``p_drop_both``): Brooks et al. 2023,
"InstructPix2Pix" (§3.2.1: text, image and both dropped 5% of the time each, for dual guidance);
Black Forest Labs 2025, "FLUX.1 Kontext" (``sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config.source import Source
from pipeline.data.stream import LoaderConfig
from pipeline.diffusion.flow import TimestepConfig
from pipeline.encoders.locations import EncoderPaths
from pipeline.training.checkpoint import CheckpointConfig
from pipeline.training.optim import OptimConfig
from pipeline.training.tracking import LoggingConfig
from pipeline.training.validation import ValidationConfig


@dataclass(kw_only=True)
class ModelConfig:
    """The trained network. ``architecture``: our DiT (``pipeline.models.dit``) or diffusers'
    ``PixArtTransformer2DModel`` (PixArt-Σ, through ``pipeline.models.pixart``; T5 only, no CLIP,
    none of the DiT's text options). ``init``: start from a pretrained model instead of a fresh one
    (``pipeline.models.pretrained``): our exported model folder, a PixArt-Σ transformer or pipeline
    folder, or a hub id; the checkpoint then fixes the architecture and size (``name`` and
    ``overrides`` are not used) and its recorded shift replaces ``timesteps.shift`` /
    ``sampling.shift`` where those are left at 1.0. ``image_condition``: an image-to-image DiT
    reading each sample's source latent (paired latents, ``KEY.src_latent.npy``): ``concat`` on the
    channels (InstructPix2Pix, Flux Control; with ``init`` a text-to-image DiT, its patch embedding
    widened with zero weights so the run starts exactly at it) or ``sequence`` (FLUX.1 Kontext: the
    source's tokens appended to the noisy ones)."""

    architecture: Literal["dit", "pixart"] = "dit"
    name: str = "DiT-tiny"  # a key of pipeline.models.dit.DIT_CONFIGS (dit) or pipeline.models.pixart.PIXART_CONFIGS (pixart)
    init: str | None = None  # a pretrained model folder or hub id to start from (None: fresh weights)
    qk_norm: bool = False
    text_refiner_depth: int = 0  # transformer layers over the text tokens before the blocks read them (Lumina-Next, Sana)
    text_attention: Literal["cross", "joint"] = "cross"  # PixArt-α cross-attention, or SD3's joint (MMDiT) blocks
    image_condition: Literal["concat", "sequence"] | None = None  # None: text-to-image
    adaln: Literal["block", "single"] = "block"  # per-block modulation MLPs, or PixArt-α's adaLN-single (one shared MLP + per-block tables: ~22% fewer parameters at B/2)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (one compilation serves all blocks, one more per bucket shape); DDP or ZeRO-2, not ZeRO-3
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 4}

    def __post_init__(self) -> None:
        from pipeline.models.dit import DIT_CONFIGS
        from pipeline.models.pixart import PIXART_CONFIGS

        known = DIT_CONFIGS if self.architecture == "dit" else PIXART_CONFIGS
        if self.name not in known:
            raise ValueError(f"unknown {self.architecture} model '{self.name}' (known: {', '.join(known)})")
        dit_only = {"qk_norm": False, "text_refiner_depth": 0, "text_attention": "cross", "image_condition": None,
                    "adaln": "block"}
        for key, default in dit_only.items():
            if self.architecture == "pixart" and getattr(self, key) != default:
                raise ValueError(f"{key} is a DiT option: architecture=pixart (PixArt-Σ as diffusers builds it) has none")
        if self.init is not None and not str(self.init).strip():
            raise ValueError("init must name a model folder or hub id (or be null)")
        if self.text_refiner_depth < 0:
            raise ValueError(f"text_refiner_depth must be >= 0 (got {self.text_refiner_depth})")


@dataclass(kw_only=True)
class DataConfig:
    latents: Source = Path("runs/demo/latents")  # a latent-shard folder written by data_tools.encode, or its URL / a URL pattern
    meta: Source | None = None  # its dataset.json, when latents cannot name it (pipe: commands); None: the folder's
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # loader.batch_size is the per-device micro-batch


@dataclass(kw_only=True)
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: Literal[2, 3] = 2
    config: Path | None = None  # None: the package's ds_templates/zero{stage}.json; its "auto" fields are filled from this config

    @property
    def config_path(self) -> Path:
        from pipeline.training.distributed import deepspeed_template

        return self.config if self.config is not None else deepspeed_template(self.zero_stage)


@dataclass(kw_only=True)
class EMAConfig:
    """``decay`` is the EMA's ceiling. ``warmup_power`` > 0 ramps the decay up as
    ``1 − (1 + n)^−power`` over the n steps since ``start_step`` (diffusers' ``use_ema_warmup`` with
    ``inv_gamma`` 1): the average then spans a fixed fraction of the run, not a fixed number of
    steps, so a short run's export is not weighed down by its first, untrained weights."""

    decay: float = 0.9999
    start_step: int = 0  # before it the EMA copies the weights
    warmup_power: float = 0.0  # 0: a constant decay; 2/3 to 3/4 as in diffusers' EMA warmup

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1) (got {self.decay})")
        if not 0 <= self.warmup_power <= 1:
            raise ValueError(f"warmup_power must be in [0, 1] (got {self.warmup_power})")

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0: a plain copy)."""
        if step <= self.start_step:
            return 0.0
        if self.warmup_power == 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step - self.start_step) ** -self.warmup_power)


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA fine-tuning (Hu et al. 2021; ``pipeline.training.lora``): the base is frozen and low-rank
    adapters ``W + (alpha / rank)·B·A`` on the ``targets`` are trained (their optimizer state and
    EMA in fp32). ``rank`` 0 trains the whole model. ``targets``: a preset, ``attention`` (the q/k/v
    and output projections of self- and cross-attention in every block), ``attention_mlp`` (and
    the MLP's linears), ``all_linear`` (every nn.Linear in the blocks, adaLN's too),
    ``blocks:A-B`` (every nn.Linear of blocks A..B), or a list of module names (peft
    ``target_modules``: a name matches itself and any module whose name ends in ``.NAME``)."""

    rank: int = 0  # 0: off (full fine-tuning)
    alpha: float | None = None  # None: the rank (scale 1)
    dropout: float = 0.0  # on the adapters' input
    targets: str | list[str] = "attention"
    base_dtype: Literal["fp32", "bf16"] = "fp32"  # the frozen base's dtype; adapters stay fp32

    def __post_init__(self) -> None:
        from pipeline.training.lora import check_targets

        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0 = off; got {self.rank})")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.base_dtype != "fp32" and self.rank == 0:
            raise ValueError(f"base_dtype={self.base_dtype} needs rank > 0 (only a LoRA run has a frozen base)")
        check_targets(self.targets)

    @property
    def resolved_alpha(self) -> float:
        """``alpha``, or the rank when unset."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass(kw_only=True)
class SamplingConfig:
    """The grid drawn every ``every`` steps from fixed prompts and seed (0 = only at the end; no
    prompts: no grid at all, not even at the end). An image-conditioned model's grid holds the
    first ``sources`` samples of ``data.latents`` instead of the prompts (source | output, each with
    its own caption; 0: no grid), drawn with dual guidance ``guidance`` / ``image_guidance``."""

    every: int = 0
    prompts: list[str] = field(default_factory=lambda: ["a large red circle at the center on a white background"])
    steps: int = 50
    guidance: float = 4.0
    shift: float | Literal["auto"] = 1.0  # auto: SD3's resolution shift from the grid's tokens (timesteps.shift_base_tokens)
    seed: int = 0
    image_guidance: float = 1.5  # an image-conditioned model's source-image scale (InstructPix2Pix's s_I; 1: text guidance only)
    sources: int = 8  # an image-conditioned model's grid: this many samples of data.latents (their captions and sources)

    def __post_init__(self) -> None:
        if self.sources < 0:
            raise ValueError(f"sources must be >= 0 (got {self.sources})")


@dataclass(kw_only=True)
class ExportConfig:
    """The model folder written at the end (a diffusers pipeline folder, ``pipeline.data.model_folder``):
    ``encoders: copy`` puts the VAE and text encoders in it; ``reference`` records where they are
    instead (a T5-XXL of many GB), and loading finds them there."""

    encoders: Literal["copy", "reference"] = "copy"


@dataclass(kw_only=True)
class TrainConfig:
    run: str = "dit"  # the run folder is output_dir/run
    output_dir: Path = Path("runs")
    seed: int = 0
    steps: int = 1000  # optimizer steps
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    p_uncond: float = 0.1  # probability of training on the null condition (for guidance); with image_condition: text only dropped
    p_drop_image: float = 0.0  # image_condition: probability of the null source image alone (InstructPix2Pix: 0.05)
    p_drop_both: float = 0.0  # image_condition: probability of dropping text and source image (InstructPix2Pix: 0.05)
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderPaths = field(default_factory=EncoderPaths)  # where the VAE / T5 / CLIP are, if not where data.latents says
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: LoRA adapters on a frozen base
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out loss at fixed t (every: 0 = off)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1) (got {self.p_uncond})")
        for key in ("p_drop_image", "p_drop_both"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1) (got {value})")
            if value and self.model.image_condition is None:
                raise ValueError(f"{key}={value} drops the source image: it needs model.image_condition (concat or sequence)")
        if self.p_uncond + self.p_drop_image + self.p_drop_both >= 1:
            raise ValueError(f"p_uncond + p_drop_image + p_drop_both must be < 1 (got {self.p_uncond} + {self.p_drop_image} + "
                             f"{self.p_drop_both}): some rows must keep both conditions")
        if self.model.compile and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("model.compile does not work with deepspeed.zero_stage=3 (its parameter hooks run inside "
                             "every block); use ZeRO-2 or DDP, or model.compile=false")

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run

    @property
    def held_out(self) -> int:
        """Samples of ``data.latents`` the training stream leaves out for validation."""
        v = self.validation
        return v.count if v.every and v.latents is None else 0
