"""Consistency training without a teacher (``pipeline.distill distill.mode=ct``): the DiT recipe's
machinery (``pipeline.training.dit``) with the consistency-training loss.

References: Song et al. 2023, "Consistency Models" (consistency training, Alg. 3); Song & Dhariwal
2023, "Improved Techniques for Training Consistency Models" (iCT: no EMA target, pseudo-Huber, the
doubling of N); Geng et al. 2024, "Consistency Models Made Easy" (ECT: start from a pretrained
diffusion model, the ``r(t)`` mapping with its stages). The curricula and their settings are
``pipeline.training.consistency.CTSection`` (the ``ct:`` section).

- Model: the DiT the Trainer builds (``model.*``, fresh) or the ``model.init`` checkpoint (ECT: a
  rectified-flow model; then the run starts exactly at it). Nothing loads a teacher.
- Consistency function ``f(x, t) = x − t·v_θ(x, t)`` (``f(x, 0) = x`` exactly). No guidance input:
  text is dropped with ``p_uncond`` as for the DiT, and the export samples with the consistency
  sampler under classifier-free guidance on the velocity (two evaluations per step).
- Loss: one noise ε gives ``x_t = (1 − t)x0 + tε`` and ``x_r = (1 − r)x0 + rε``, ``r < t`` from the
  curriculum; ``w(t, r)·d(f_θ(x_t, t), sg(f_target(x_r, r)))`` with ``d`` of ``distill.loss``.
  ``r = 0`` makes the target the data itself.
- Target (``ct.target``): ``stopgrad``, the trained network itself under ``torch.no_grad`` (the
  same prepared module as the student forward: under DDP / ZeRO-3 it runs like any forward, no
  gradient and no all-reduce; the DiT has no dropout, so no mask need be shared), or ``ema``, an
  fp32 EMA copy of it at ``distill.target_decay`` taken before ``prepare`` and updated from the
  same whole (ZeRO-3: gathered block by block) parameters as the export EMA, checkpointed.

Validation (``validation.every`` > 0): this loss on held-out latents with fixed noise at each of
``validation.bins``' times, ``r`` from the curriculum at the current step (iCT: the interval whose
upper end is the first grid point at or above the bin's time), for the evaluated network (or its
EMA) against the target (``stopgrad``: the evaluated network itself). Values at different stages
use different gaps, so they compare within a stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.diffusion.flow import interpolate, resolve_shift, sample_timesteps, shift_time
from pipeline.diffusion.samplers import consistency_fn
from pipeline.data.latents import latent_meta
from pipeline.training.consistency import distance
from pipeline.training.distill import PROG, DistillConfig
from pipeline.training.dit import Trainer, build_model, condition, to_device, training_plan
from pipeline.training.ema import EMA
from pipeline.training.preflight import ModelSpec, TrainingPlan
from pipeline.training.validation import Unit


class ConsistencyTrainer(Trainer):
    """The DiT recipe's machinery with the teacher-free consistency-training loss."""

    cfg: DistillConfig
    prog = PROG

    def __init__(self, cfg: DistillConfig) -> None:
        self.target: EMA | None = None
        super().__init__(cfg)
        if self.conditioned:  # model.init of an image-conditioned checkpoint: the loss has no source image
            raise ConfigError("model.init: an image-conditioned model; distill.mode=ct trains a text-to-image model")

    # ------------------------------------------------------------------ networks

    def build_averages(self, model: torch.nn.Module) -> None:
        if self.cfg.ct.target == "ema":
            self.target = EMA(model, self.cfg.distill.target_decay).to(self.accelerator.device)

    def target_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """The target beside ``network`` (the trained one, or the one validation evaluates)."""
        return network if self.target is None else self.target.module

    # ------------------------------------------------------------------ the curriculum

    def ict_grid(self, x0: torch.Tensor) -> torch.Tensor:
        """iCT's grid at this step: ``N(k)`` times from 0 to 1 (shifted by ``distill.shift``)."""
        intervals = self.cfg.ct.ict_intervals(self.step, self.cfg.steps)
        shift = resolve_shift(self.cfg.distill.shift, self.image_tokens(x0), self.cfg.timesteps.shift_base_tokens)
        return shift_time(torch.linspace(0.0, 1.0, intervals + 1, device=x0.device), shift)

    def times(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, r)`` (B,) each for a batch: drawn (``t`` None) or for the given times (validation)."""
        ct, rows = self.cfg.ct, x0.shape[0]
        if t is None and not (ct.curriculum == "ict" and ct.index == "uniform"):
            t = sample_timesteps(rows, self.cfg.timesteps, device=x0.device, tokens=self.image_tokens(x0))
        if ct.curriculum == "ect":
            return t, ct.ect_r(t, self.step)
        grid = self.ict_grid(x0)
        if t is None:  # index: uniform
            n = torch.randint(0, len(grid) - 1, (rows,), device=x0.device)
        else:  # the interval whose upper end is the first grid point at or above t
            n = (torch.searchsorted(grid, t.contiguous() - 1e-6) - 1).clamp(0, len(grid) - 2)
        return grid[n + 1], grid[n]

    # ------------------------------------------------------------------ the loss

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        x0 = to_device(batch["latent"], device)  # (B, C, h, w)
        cond = condition(batch, self.cfg.p_uncond, device)
        t, r = self.times(x0)
        noise = torch.randn_like(x0)
        return self.consistency_loss(self.model, self.target_network(self.model), x0, cond, noise, t, r), t

    def consistency_loss(self, network: torch.nn.Module, target: torch.nn.Module, x0: torch.Tensor, cond: dict,
                         noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``w(t, r)·d(f_network(x_t, t), sg(f_target(x_r, r)))`` per sample (B,): x0 and noise
        (B, C, h, w), the same noise at both times; ``t``, ``r`` (B,)."""
        d = self.cfg.distill
        with torch.no_grad(), self.autocast():
            goal = consistency_fn(target, interpolate(x0, noise, r), r, cond)  # r = 0: x0 exactly
        prediction = consistency_fn(network, interpolate(x0, noise, t), t, cond)
        weight = self.cfg.ct.weight(t, r, self.step, self.cfg.steps)
        return weight * distance(prediction, goal, d.loss, d.huber_c)

    def validation_values(self, units: list[Unit]) -> torch.Tensor:
        """The consistency-training loss of held-out units at the bins' times, (B, 1)."""
        x0, cond, noise, t = self.validation_batch(units)
        t, r = self.times(x0, t)
        network = self.validation_network()
        return self.consistency_loss(network, self.target_network(network), x0, cond, noise, t, r)[:, None]

    # ------------------------------------------------------------------ state and export

    def average(self, group: list[tuple[str, torch.nn.Parameter]]) -> None:
        super().average(group)
        if self.target is not None:
            self.target.update(group)

    def save_extra(self, folder: Path) -> None:
        super().save_extra(folder)
        if self.target is not None:
            self.target.save(folder / "target.safetensors")

    def load_extra(self, folder: Path) -> None:
        super().load_extra(folder)
        if self.target is not None:
            self.target.load(folder / "target.safetensors")

    def export_info(self) -> dict:
        s = self.cfg.sampling
        return {
            "kind": "consistency_training",
            "sampler": "consistency",
            "sampling": {"steps": s.steps, "guidance": s.guidance, "shift": s.shift},
            "consistency_training": {**self.cfg.ct.describe(), "loss": self.cfg.distill.loss},
            **{k: v for k, v in super().export_info().items() if k in ("timesteps", "buckets")},
        }


def plan_ct(cfg: DistillConfig, prog: str = PROG) -> TrainingPlan:
    """This recipe for the dry run: one DiT (fresh or ``model.init``), trained, with its fp32 EMA
    (and the EMA target with ``ct.target=ema``); no teacher (built on ``meta``)."""
    with torch.device("meta"):
        model = build_model(cfg, latent_meta(cfg.data.latents, cfg.data.meta))
    copies = ("EMA", "target network") if cfg.ct.target == "ema" else ("EMA",)
    spec = ModelSpec(cfg.model.name if cfg.model.init is None else "model", model, trained=True, fp32_copies=copies,
                     gradient_checkpointing=cfg.model.gradient_checkpointing)
    return training_plan(cfg, prog, (spec,))
