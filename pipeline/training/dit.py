"""The DiT recipe (``pipeline.train``): a text-conditioned DiT trained with rectified flow on latent
shards, on the training core (``pipeline.training.core``).

References: Peebles & Xie 2023 (DiT); Liu et al. 2022 (rectified flow); Esser et al. 2024 (SD3:
logit-normal timesteps). The loss and time convention are ``pipeline.diffusion.flow``'s.

Precision and parallelism (DESIGN.md §8): master weights, optimizer state and the EMA are fp32;
``mixed_precision`` bf16/fp16 is the compute dtype (accelerate's autocast, or DeepSpeed's 16-bit
module with its fp16 loss scaling); the model casts its inputs (``DiT._cast_inputs``); the loss
is computed in fp32. Each micro-batch's forward and backward run inside the accumulation context
(DDP all-reduces only at the boundary) and the LR schedule steps once per optimizer step, on any
world size. Under ZeRO-3 the EMA reads the parameters gathered one block at a time
(``pipeline.training.distributed.whole_parameters``) and keeps a full fp32 copy on every rank.
Sample grids draw from forked RNG streams and encode their fixed prompts once (the text encoders
are then released; the VAE is loaded per grid and released), so ``sampling.every`` never changes
the training trajectory or the memory that stays resident.

Validation (``validation.every`` > 0; ``pipeline.training.validation``): the rectified-flow loss of
held-out latents at the fixed times ``validation.bins`` with fixed noise and their own text (none
dropped), in the run's compute dtype, of the trained network (under ZeRO-3 every rank runs its
forwards, gathering as in training) or of the EMA; each rank runs its share and the sums are
all-reduced. Held out from ``data.latents`` (its last shard's first ``validation.count``
samples, which training then skips) or read from ``validation.latents``.

LoRA (``lora.rank`` > 0; ``pipeline.training.lora``): adapters are added to the built model before
the EMA copy and ``prepare``; the base is frozen (``lora.base_dtype``), the optimizer holds the
adapters only, and the EMA averages (and checkpoints) only them, gathered under ZeRO-3 without the
base. The export writes the EMA's adapter to ``RUN/lora/pytorch_lora_weights.safetensors``
(diffusers' LoRA format) and ``RUN/model`` with it fused into an fp32 copy: a plain DiT.

Models (``build_model``): our DiT, or PixArt-Σ (``model.architecture=pixart``: diffusers'
``PixArtTransformer2DModel`` behind our ``model(x, t, cond)`` contract, ``pipeline.models.pixart``;
it has no learned null, so its dropped rows read the T5 encoding of ``""``, which rank 0 encodes
once at build time and broadcasts), or the ``model.init`` checkpoint (``pipeline.models.pretrained``:
our exported folder, a PixArt-Σ folder; checked against the latents' encoders in ``located_meta``
before any work, its recorded shift adopted where the config leaves 1.0).

Classifier-free guidance: with probability ``p_uncond`` a sample's text is replaced by the
model's learned null condition (``cond["drop"]``: a learned null token instead of the T5/CLIP
tokens and a learned null vector instead of the pooled CLIP embedding). Sampling uses the same
null condition for the unconditional half.

Image conditioning (``model.image_condition``; Brooks et al. 2023, "InstructPix2Pix"; Black Forest
Labs 2025, "FLUX.1 Kontext"): the model reads each sample's source latent (``batch["src_latent"]``
of paired latents, checked before any work) as ``cond["image"]``. Dropout is three-way from one
uniform draw per row (:func:`condition`: text only with ``p_uncond``, the source image only with
``p_drop_image``, both with ``p_drop_both``), so a run draws as many random numbers per step as a
text-to-image one and resumes exactly. ``model.init`` of a text-to-image DiT widens it
(``pipeline.models.pretrained.with_image_condition``). Validation passes the held-out sources; the
sample grid draws the first ``sampling.sources`` samples of ``data.latents`` (their captions and
sources) with dual guidance, shown source | output.
"""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path

import torch

from pipeline.config import ConfigError, from_dict
from pipeline.data.images import tensor_to_images
from pipeline.data.latents import collate_latents, decode_latent_sample, latent_loader, latent_meta, shard_list
from pipeline.data.stream import held_out_split, read_first, read_held_out
from pipeline.figures.sheets import strips_sheet
from pipeline.data.remote import dataset_json_of
from pipeline.data.model_folder import export_model
from pipeline.figures.sheets import write_sheet
from pipeline.diffusion.flow import flow_loss, loss_by_t, resolve_shift, sample_timesteps
from pipeline.diffusion.samplers import sample
from pipeline.encoders import TextEncoders, TextEncodersConfig
from pipeline.encoders.locations import locate_encoders
from pipeline.encoders.vae import FrozenVAE, VAEConfig
from pipeline.encoders.t5 import FrozenT5, T5EncoderConfig
from pipeline.models.dit import build_dit, compile_blocks
from pipeline.models.dit import flops_per_sample as dit_flops
from pipeline.models.pixart import PixArt, build_pixart
from pipeline.models.pixart import flops_per_sample as pixart_flops
from pipeline.models.pretrained import check_latents, find_pretrained, load_pretrained
from pipeline.training.core import TrainerCore
from pipeline.training.dit_config import TrainConfig
from pipeline.training.distributed import compute_dtype, create_accelerator, deepspeed_plugin, dist_env, is_partitioned, whole_parameters
from pipeline.training.ema import EMA
from pipeline.training.lora import add_lora, fused_copy, save_adapter
from pipeline.training.optim import build_optimizer
from pipeline.training.preflight import ModelSpec, TrainingPlan, preflight, resume_target
from pipeline.training.tracking import Throughput, device_peak_tflops
from pipeline.training.validation import Unit, Validation, fixed_noise

PROG = "pipeline.train"
T_BUCKETS = 10
TEXT_TOKENS_FOR_FLOPS = 32  # a typical caption length; only the logged TFLOP/s depend on it


def build_model(cfg: TrainConfig, meta: dict) -> torch.nn.Module:
    """The trained network: the ``model.init`` checkpoint, or a fresh DiT / PixArt-Σ
    (``model.architecture``) sized for the latents and text encoders recorded in the latent
    dataset.json. Under ``torch.device("meta")`` (the dry run) only configs are read."""
    empty = torch.empty(()).device.type == "meta"
    m = cfg.model
    if m.init is not None:
        model = load_pretrained(find_pretrained(m.init), empty=empty, image_condition=m.image_condition)
    elif m.architecture == "pixart":
        model = fresh_pixart(cfg, meta)
    else:
        model = fresh_dit(cfg, meta)
    check_buckets(meta.get("buckets"), model.patch_size)
    if isinstance(model, PixArt) and not empty:
        model.set_null(*null_text(meta))
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def fresh_dit(cfg: TrainConfig, meta: dict) -> torch.nn.Module:
    """Our DiT of ``model.name``, its text widths those of the latents' encoders."""
    text = meta["text_encoders"]
    channels, height, _ = meta["latent_shape"]
    widths = {
        "text_dim": text["t5"]["width"] if text.get("t5") else 0,
        "clip_dim": text["clip"]["width"] if text.get("clip") else 0,
        "clip_token_dim": text["clip"]["token_width"] if text.get("clip") and text["clip"].get("return_tokens") else 0,
    }
    m = cfg.model
    options = {"qk_norm": m.qk_norm, "text_refiner_depth": m.text_refiner_depth, "text_attention": m.text_attention,
               "image_condition": m.image_condition, "adaln": m.adaln}
    return build_dit(m.name, in_channels=channels, sample_size=height, **options, **widths, **m.overrides)


def fresh_pixart(cfg: TrainConfig, meta: dict) -> PixArt:
    """PixArt-Σ of ``model.name`` reading the latents' T5 (their CLIP, if any, is not used)."""
    t5 = meta["text_encoders"].get("t5")
    if not t5:
        raise ConfigError(f"model.architecture=pixart reads T5 token embeddings, and the latents in {cfg.data.latents} have "
                          "none: encode them with text.t5")
    channels, height, _ = meta["latent_shape"]
    return build_pixart(cfg.model.name, in_channels=channels, sample_size=height, caption_channels=t5["width"], **cfg.model.overrides)


def null_text(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The T5 encoding of ``""`` (PixArtSigmaPipeline's negative prompt): (L0, D) and mask (L0,).
    Rank 0 loads the run's frozen T5 on the CPU for it and broadcasts the result (one T5 in memory
    per job, not per rank); a failure there is raised on every rank. RNG streams are left alone."""
    import torch.distributed as dist

    shared = dist.is_available() and dist.is_initialized()
    payload: list = [None]
    if not shared or dist.get_rank() == 0:
        try:
            with torch.random.fork_rng(devices=[]):
                t5 = FrozenT5(from_dict(T5EncoderConfig, meta["config"]["text"]["t5"]), "cpu")
                embeddings, mask = t5.encode([""])  # (1, L0, D), (1, L0)
            payload = [(embeddings[0], mask[0])]
            del t5
        except Exception as err:  # every rank raises it (the others would wait in the broadcast)
            payload = [err]
    if shared:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return payload[0]


def flops_per_sample(model: torch.nn.Module, tokens_text: int) -> float:
    """Forward FLOPs of one sample of either architecture (``pipeline.models.dit`` / ``.pixart``)."""
    return pixart_flops(model, tokens_text) if isinstance(model, PixArt) else dit_flops(model, tokens_text=tokens_text)


def located_meta(cfg: TrainConfig, prog: str) -> dict:
    """The latent folder's dataset.json with its encoders moved where ``encoders.*`` say and checked
    (``pipeline.encoders.locations``): a run whose encoders are missing stops before step 1."""
    meta = latent_meta(cfg.data.latents, cfg.data.meta)
    where = str(cfg.data.meta) if cfg.data.meta is not None else dataset_json_of(cfg.data.latents)
    meta["config"] = locate_encoders(meta["config"], cfg.encoders, where)
    given = cfg.encoders.given()
    if given and dist_env().is_main:
        moved = ", ".join(f"encoders.{name}={path}" for name, path in given.items())
        print(f"{prog}: encoders from {moved}, instead of where {where} says")
    if cfg.model.init is not None:
        adopt_init(cfg, meta, prog)
    if cfg.model.image_condition is not None and not meta.get("image_condition"):
        raise ConfigError(f"data.latents: {cfg.data.latents} holds no source latents (its dataset.json has no \"image_condition\"), "
                          f"which model.image_condition={cfg.model.image_condition} reads: encode paired image shards "
                          "(data_tools.pairs, then data_tools.encode)")
    return meta


def adopt_init(cfg: TrainConfig, meta: dict, prog: str) -> None:
    """``model.init`` found and checked against the latents before any work (one line when it does
    not fit); the shift it records replaces ``timesteps.shift`` / ``sampling.shift`` left at 1.0."""
    source = find_pretrained(cfg.model.init)
    check_latents(source, meta)
    taken = []
    recorded = source.config.get("image_condition")
    if recorded is not None and cfg.model.image_condition is None:  # a conditioned checkpoint stays one
        cfg.model.image_condition = recorded
        taken.append(f"model.image_condition={recorded}")
    for key, section in (("timesteps", cfg.timesteps), ("sampling", cfg.sampling)):
        value = (source.shift or {}).get(key)
        if value is not None and value != 1.0 and section.shift == 1.0:
            section.shift = value
            taken.append(f"{key}.shift={value}")
    if dist_env().is_main:
        kept = f"; {', '.join(taken)} from it" if taken else ""
        print(f"{prog}: model.init: the {source.architecture} transformer of {source.given}{kept}")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device; floats as float32, cast there (the loader keeps the stored
    fp16: half the bytes to move; the model then casts to its compute dtype)."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.float() if tensor.is_floating_point() else tensor


def check_buckets(buckets: dict | None, patch: int) -> None:
    """Every bucket's latent grid must cut into whole patches (one line naming the first that does not)."""
    for name, bucket in (buckets or {}).items():
        _, h, w = bucket["latent_shape"]
        if h % patch or w % patch:
            raise ConfigError(f"data.latents: bucket {name} is a {h}x{w} latent, not whole {patch}x{patch} patches of the "
                              f"model: encode again with bucket_step a multiple of the VAE factor × {patch}")


def text_condition(batch: dict, device: torch.device, image: bool = False) -> dict:
    """The model's ``cond`` from a latent batch: its text (and with ``image`` its source latent as
    ``cond["image"]``), none dropped (nothing drawn)."""
    cond = {k: to_device(v, device) for k, v in batch.items() if k in ("t5", "t5_mask", "clip", "clip_tokens", "clip_tokens_mask")}
    if image:
        cond["image"] = to_device(batch["src_latent"], device)  # (B, C, h, w)
    return cond


def condition(batch: dict, p_uncond: float, device: torch.device, p_drop_image: float = 0.0, p_drop_both: float = 0.0,
              image: bool = False) -> dict:
    """The model's ``cond`` from a latent batch with the dropout drawn: one uniform ``u`` per row.
    Text-to-image: ``u < p_uncond`` rows use the null text. With ``image`` (the source latent read):
    three-way (InstructPix2Pix) on the same draw, ``[0, p_uncond)`` the text alone dropped,
    ``[p_uncond, +p_drop_image)`` the source image alone (``cond["drop_image"]``: the null image),
    ``[.., +p_drop_both)`` both."""
    cond = text_condition(batch, device, image)
    u = torch.rand(batch["latent"].shape[0])  # (B,): one draw per row, whatever is dropped
    if not image:
        cond["drop"] = (u < p_uncond).to(device)
        return cond
    image_from, both_from, both_to = p_uncond, p_uncond + p_drop_image, p_uncond + p_drop_image + p_drop_both
    both = (u >= both_from) & (u < both_to)
    cond["drop"] = ((u < image_from) | both).to(device)
    cond["drop_image"] = (((u >= image_from) & (u < both_from)) | both).to(device)
    return cond


def latent_signature(meta: dict) -> dict:
    """What latents must share to be read by the same network: channels, VAE factors, text widths."""
    text = meta.get("text_encoders") or {}
    vae = meta.get("vae") or {}
    widths = {name: {k: v for k, v in (text.get(name) or {}).items() if k in ("width", "token_width", "return_tokens")} for name in ("t5", "clip")}
    return {"channels": meta["latent_shape"][0], "scaling_factor": vae.get("scaling_factor"), "shift_factor": vae.get("shift_factor"), **widths}


def accelerator_for(cfg: TrainConfig):
    """The ``Accelerator`` of a DiT stage: DeepSpeed from the filled template, or plain/DDP."""
    plugin = None
    if cfg.deepspeed.enabled:
        plugin = deepspeed_plugin(
            cfg.deepspeed.config_path,
            cfg.deepspeed.zero_stage,
            micro_batch=cfg.data.loader.batch_size,
            grad_accum=cfg.optim.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            precision=cfg.mixed_precision,
            world_size=dist_env().world_size,
        )
    return create_accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum, deepspeed_plugin=plugin)


def release_memory() -> None:
    """Return freed device memory (models used for a moment: encoders, the VAE) to the GPU: a full
    garbage collection (a reference cycle may hold a module) and CUDA's cache. Nothing on the CPU,
    where a model's memory goes with its last reference, and a full collection in a process holding
    torch, transformers and DeepSpeed costs ~0.3 s (twice per sample grid)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class Trainer(TrainerCore):
    """The DiT on latent shards: rectified-flow loss, EMA, sample grids, export."""

    prog = PROG

    def __init__(self, cfg: TrainConfig) -> None:
        self.meta = located_meta(cfg, self.prog)  # the encoders checked before any work
        world = dist_env().world_size  # before any collective: a plan that cannot run stops every rank alike
        preflight(cfg.data.latents, cfg.data.loader, world, deepspeed=cfg.deepspeed.enabled, zero_stage=cfg.deepspeed.zero_stage,
                  resume_from=resume_target(cfg), held_out=cfg.held_out)
        super().__init__(cfg, accelerator_for(cfg))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.build_model()
        self.lora = cfg.lora.rank > 0
        self.conditioned = getattr(model, "image_condition", None) is not None  # reads batch["src_latent"]
        if self.lora:
            add_lora(model, cfg.lora)  # the base frozen, the adapters trainable (before the copies and prepare)
        self.model_patch = model.patch_size
        self.flops = flops_per_sample(model, tokens_text=TEXT_TOKENS_FOR_FLOPS)
        self.ema = EMA(model, cfg.ema.decay, trainable_only=self.lora).to(self.accelerator.device)  # copied before prepare (ZeRO-3 partitions after it)
        self.build_averages(model)
        if cfg.model.compile:
            compile_blocks(model)  # after the copies: they stay plain modules
        optimizer, scheduler = build_optimizer(model.parameters(), cfg.optim, cfg.steps)  # trainable only; the schedule is ours to step
        self.schedules = {"scheduler": scheduler}
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        torch.manual_seed(cfg.seed * 1000 + self.accelerator.process_index)  # per-rank noise
        shards = shard_list(cfg.data.latents)
        sizes = self.shard_sizes(shards, self.meta)
        split = self.held_out_split(sizes)
        self.loader = latent_loader(shards, cfg.data.loader, self.accelerator.process_index, self.accelerator.num_processes, sizes, split)
        self.validation = self.build_validation(shards, split)
        tokens = math.prod(self.meta["latent_shape"][1:]) // self.model_patch**2  # image tokens of the default grid (buckets: about as many)
        self.meter = Throughput(self.flops, tokens, self.accelerator.num_processes, device_peak_tflops(cfg.logging))
        self.last_lr = cfg.optim.lr
        self.t_sums, self.t_counts = torch.zeros(T_BUCKETS), torch.zeros(T_BUCKETS)
        self._grid_cond: dict | None = None
        self._grid_sources: dict | None = None

    def build_model(self) -> torch.nn.Module:
        """The trained network (a subclass may start it from another model)."""
        return build_model(self.cfg, self.meta)

    def build_averages(self, model: torch.nn.Module) -> None:
        """More weight averages of the fresh ``model`` for a subclass (built before ``prepare``)."""

    def autocast(self):
        """Mixed precision for networks outside ``prepare`` (frozen teacher, target, EMA): the
        compute dtype of the run, fp32 weights."""
        dtype = compute_dtype(self.cfg.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ------------------------------------------------------------------ state

    def save_extra(self, folder: Path) -> None:
        self.ema.save(folder / "ema.safetensors")
        torch.save({"sums": self.t_sums, "counts": self.t_counts}, folder / "loss_by_t.pt")

    def load_extra(self, folder: Path) -> None:
        self.ema.load(folder / "ema.safetensors")
        buckets = torch.load(folder / "loss_by_t.pt", weights_only=True)
        self.t_sums, self.t_counts = buckets["sums"], buckets["counts"]

    # ------------------------------------------------------------------ steps

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample rectified-flow loss (B,) in fp32 and the times it was drawn at (B,)."""
        device = self.accelerator.device
        x0 = to_device(batch["latent"], device)  # (B, C, h, w)
        cfg = self.cfg
        cond = condition(batch, cfg.p_uncond, device, cfg.p_drop_image, cfg.p_drop_both, self.conditioned)
        t = sample_timesteps(x0.shape[0], self.cfg.timesteps, device=device, tokens=self.image_tokens(x0))
        return flow_loss(self.model, x0, cond, t, torch.randn_like(x0)), t

    def image_tokens(self, latents: torch.Tensor) -> int:
        """Image tokens of a batch's latent grid (buckets differ): h·w / patch²."""
        return latents.shape[-2] * latents.shape[-1] // self.model_patch**2

    def micro_step(self, batch: dict) -> torch.Tensor | None:
        """Forward and backward of one micro-batch inside the accumulation context, the optimizer
        step at the boundary; None (nothing applied) when the loss is not finite on some rank."""
        with self.accumulation(self.model):
            per_sample, t = self.loss(batch)  # (B,), (B,)
            loss = per_sample.mean()
            if not self.finite_everywhere(loss):
                return None
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.optimizer_step()
        self.record(t, per_sample, batch["latent"].shape[0])
        return loss.detach()

    def record(self, t: torch.Tensor, per_sample: torch.Tensor, rows: int) -> None:
        """A micro-batch's losses into the loss-by-t buckets, its rows into the throughput meter."""
        sums, counts = loss_by_t(t, per_sample.detach(), T_BUCKETS)
        self.t_sums += sums.cpu()
        self.t_counts += counts.cpu()
        self.meter.add(rows)

    def optimizer_step(self) -> None:
        """Clip, step, then advance the LR schedule once, unless the step was skipped on overflow
        (DeepSpeed steps inside ``backward``; its wrapper's ``step`` is a no-op and its clipping
        comes from the JSON)."""
        if self.cfg.optim.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used
        self.optimizer.step()
        if not self.step_was_skipped():
            self.schedules["scheduler"].step()
        self.optimizer.zero_grad()

    def after_optimizer_step(self) -> None:
        """The weight averages, from whole parameters (gathered by block under ZeRO-3); under LoRA
        only the adapters (the frozen base is neither gathered nor averaged)."""
        for group in whole_parameters(self.accelerator.unwrap_model(self.model), trainable_only=self.lora):
            self.average(group)

    def average(self, group: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Update every average from one group of whole parameters (a subclass adds its own)."""
        self.ema.update(group, self.cfg.ema.decay_at(self.step))

    # ------------------------------------------------------------------ validation

    def held_out_split(self, sizes: list[int]) -> list[int] | None:
        """Leading samples of each shard held out for validation (None: none, the stream as without it)."""
        count = self.cfg.held_out
        if not count:
            return None
        if count >= sum(sizes):
            raise ConfigError(f"validation.count={count} would hold out every one of the {sum(sizes)} samples of data.latents: "
                              "lower it, or give a separate set (validation.latents=FOLDER)")
        return held_out_split(sizes, count)

    def build_validation(self, shards: list[str], split: list[int] | None) -> Validation | None:
        """The held-out latents and this rank's share of their (sample, time) units; None when off."""
        v = self.cfg.validation
        if not v.every:
            return None
        if v.latents is None:
            samples = read_held_out(shards, split, decode_latent_sample)
        else:
            samples = self.separate_validation_set()
        if not samples:
            raise ConfigError(f"validation: no held-out latent could be read from {v.latents or self.cfg.data.latents}")
        network = self.validation_network()
        even = v.weights == "model" and is_partitioned(network)  # ZeRO-3: every rank runs as many forwards
        return Validation(v.every, samples, [tuple(s["latent"].shape) for s in samples], ("val_loss",), [f"t={t:.4g}" for t in v.times],
                          v.batch_size, self.accelerator.process_index, self.accelerator.num_processes, even)

    def separate_validation_set(self) -> list[dict]:
        """The first ``validation.count`` samples of ``validation.latents``, checked against the training latents."""
        v = self.cfg.validation
        other = latent_meta(v.latents)
        if latent_signature(other) != latent_signature(self.meta):
            raise ConfigError(f"validation.latents: {v.latents} was encoded otherwise than data.latents ({latent_signature(other)} "
                              f"against {latent_signature(self.meta)}): encode it with the same VAE and text encoders")
        return read_first(shard_list(v.latents), v.count, decode_latent_sample)

    def validation_network(self) -> torch.nn.Module:
        """What validation evaluates: the trained network (its bare module) or the EMA."""
        return self.ema.module if self.cfg.validation.weights == "ema" else self.accelerator.unwrap_model(self.model)

    def validation_batch(self, units: list[Unit]) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """Held-out units -> latents x0 (B, C, h, w), their text cond, fixed noise (B, C, h, w), times (B,)."""
        device, v = self.accelerator.device, self.cfg.validation
        batch = collate_latents([self.validation.samples[i] for i, _ in units])
        x0 = to_device(batch["latent"], device)
        noise = torch.stack([fixed_noise(v.seed, i, x0.shape[1:]) for i, _ in units]).to(device)
        t = torch.tensor([v.times[j] for _, j in units], device=device)
        return x0, text_condition(batch, device, self.conditioned), noise, t

    def validation_values(self, units: list[Unit]) -> torch.Tensor:
        """The rectified-flow loss of held-out units at their fixed times, (B, 1)."""
        x0, cond, noise, t = self.validation_batch(units)
        return flow_loss(self.validation_network(), x0, cond, t, noise)[:, None]

    @contextlib.contextmanager
    def validation_mode(self):
        """The evaluated network in eval mode, in the run's compute dtype."""
        network = self.validation_network()
        training = network.training
        network.eval()
        try:
            with self.autocast():
                yield
        finally:
            network.train(training)

    # ------------------------------------------------------------------ the core's hooks

    def on_fit_start(self) -> None:
        self.meter.restart()

    def metrics(self, running: list) -> dict:
        loss = torch.stack(running).mean().item()
        return {"loss": loss, "lr": self.last_lr, "skipped_steps": self.skipped, "overflow_steps": self.overflow_steps,
                **self.meter.report(), **self.loader.report()}

    def on_step(self) -> dict:
        if self.cfg.sampling.every and self.step % self.cfg.sampling.every == 0:
            self.sample_grid(f"step-{self.step:06d}")
        return {}

    def finish(self, tracker) -> None:
        """Export the EMA weights, draw the final grid and the loss-by-t plot."""
        super().finish(tracker)
        if self.is_main:
            from pipeline.figures.plots import plot_loss_by_t

            self.sample_grid("final")
            plot_loss_by_t(self.t_sums, self.t_counts, self.cfg.run_dir / "loss_by_t.png")
            print(f"{self.prog}: done at step {self.step}; model in {self.cfg.run_dir / 'model'}")

    # ------------------------------------------------------------------ outputs

    def export(self) -> Path:
        """The EMA network as a model folder; under LoRA also its adapter in diffusers' LoRA format
        (``RUN/lora/``), and the model folder holds a copy with the adapter fused: a plain DiT."""
        if not self.lora:
            return export_model(self.cfg.run_dir / "model", self.ema.module, self.meta, self.export_info(), self.cfg.export.encoders)
        save_adapter(self.cfg.run_dir / "lora", self.ema.module)  # the EMA is a whole copy (never partitioned)
        return export_model(self.cfg.run_dir / "model", fused_copy(self.ema.module), self.meta, self.export_info(), self.cfg.export.encoders)

    def export_info(self) -> dict:
        """What the model folder's ``info`` says beyond the encoders: the sampler and its defaults."""
        s, t = self.cfg.sampling, self.cfg.timesteps
        sampling = {"steps": s.steps, "guidance": s.guidance, "shift": s.shift}
        if self.conditioned:
            sampling["image_guidance"] = s.image_guidance
        info = {"sampler": "euler", "sampling": sampling,
                "timesteps": {"shift": t.shift, "shift_base_tokens": t.shift_base_tokens}, "buckets": self.meta.get("buckets")}
        if self.lora:  # what the fused weights hold (the adapter alone: RUN/lora/)
            info["lora"] = {"fused": True, "rank": self.cfg.lora.rank, "alpha": self.cfg.lora.resolved_alpha, "targets": self.cfg.lora.targets}
        return info

    def sample_grid(self, name: str) -> Path | None:
        """A captioned grid from the fixed prompts and seed with the EMA network (main process); an
        image-conditioned model's from the grid's samples (:meth:`grid_sources`), source | output.

        It draws from forked RNG streams, so training continues exactly as without it."""
        s, device = self.cfg.sampling, self.accelerator.device
        if not self.is_main or not (s.sources if self.conditioned else s.prompts):
            return None
        sources = self.grid_sources() if self.conditioned else None
        prompts = sources["caption"] if sources else s.prompts
        shape = list(sources["src_latent"].shape[1:]) if sources else self.meta["latent_shape"]
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), self.autocast():
            cond = {k: v.to(device) for k, v in self.grid_condition(prompts).items()}
            if sources:
                cond["image"] = sources["src_latent"].float().to(device)  # (B, C, h, w)
            noise = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(s.seed)).to(device)
            shift = resolve_shift(s.shift, self.image_tokens(noise), self.cfg.timesteps.shift_base_tokens)
            latents = sample(self.ema.module, self.export_info()["sampler"], cond, noise, s.steps, s.guidance, shift, s.seed,
                             image_guidance=s.image_guidance if sources else None)
            vae = FrozenVAE(from_dict(VAEConfig, self.meta["config"]["vae"]), device)  # loaded for this grid only
            images = tensor_to_images(vae.decode(latents))
            shown = tensor_to_images(vae.decode(cond["image"])) if sources else None
        del vae, cond
        release_memory()
        path = self.cfg.run_dir / "samples" / f"{name}.png"
        if shown is None:
            return write_sheet(images, prompts, path)
        strips_sheet([[source, image] for source, image in zip(shown, images)], prompts, path, gap=2)
        return path

    def grid_condition(self, prompts: list[str] | None = None) -> dict:
        """The grid's prompts (default: the fixed ones) encoded once, kept on the CPU; the text
        encoders are released after."""
        if self._grid_cond is None:
            text = TextEncoders(from_dict(TextEncodersConfig, self.meta["config"]["text"]), self.accelerator.device)
            self._grid_cond = {k: v.cpu() for k, v in text.encode(prompts or self.cfg.sampling.prompts).items()}
            del text
            release_memory()
        return self._grid_cond

    def grid_sources(self) -> dict:
        """An image-conditioned model's grid: the first ``sampling.sources`` samples of
        ``data.latents`` of the first one's shape, collated (captions, ``src_latent``); read once."""
        if self._grid_sources is None:
            samples = read_first(shard_list(self.cfg.data.latents), self.cfg.sampling.sources, decode_latent_sample)
            if not samples:
                raise ConfigError(f"sampling: no latent could be read from {self.cfg.data.latents} for the grid")
            shape = samples[0]["latent"].shape
            self._grid_sources = collate_latents([x for x in samples if x["latent"].shape == shape])
        return self._grid_sources


# ---------------------------------------------------------------------------- the dry run's plan


def plan(cfg: TrainConfig, prog: str = PROG) -> TrainingPlan:
    """This recipe for the dry run: one DiT, trained, with an fp32 EMA (built on ``meta``)."""
    with torch.device("meta"):
        model = build_model(cfg, latent_meta(cfg.data.latents, cfg.data.meta))
    spec = ModelSpec(cfg.model.name, model, trained=True, fp32_copies=("EMA",), gradient_checkpointing=cfg.model.gradient_checkpointing)
    return training_plan(cfg, prog, (spec,))


def training_plan(cfg: TrainConfig, prog: str, models: tuple[ModelSpec, ...]) -> TrainingPlan:
    """The parts of a ``TrainConfig`` (or a subclass) that every DiT stage's plan shares."""
    return TrainingPlan(
        prog=prog,
        latents=cfg.data.latents,
        loader=cfg.data.loader,
        grad_accum=cfg.optim.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        mixed_precision=cfg.mixed_precision,
        deepspeed=cfg.deepspeed.enabled,
        zero_stage=cfg.deepspeed.zero_stage,
        deepspeed_template=cfg.deepspeed.config_path if cfg.deepspeed.enabled else None,
        models=models,
        resume_from=resume_target(cfg),
    )
