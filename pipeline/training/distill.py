"""The consistency-distillation recipe (``pipeline.distill``): a rectified-flow teacher into a student
that samples in 1–4 steps, on the DiT recipe's machinery (``pipeline.training.dit``).

References: Song et al. 2023, "Consistency Models" (consistency distillation, Alg. 2); Luo et al.
2023, "Latent Consistency Models" (guidance-conditioned student, skipping-step teacher solver);
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (pseudo-Huber); Kim et
al. 2024, "Consistency Trajectory Models" (the denoising term beside the consistency loss).

- Teacher: the trained EMA DiT (frozen). Student: ``pipeline.models.student.student_from`` — the
  teacher plus a guidance-scale embedding whose output starts at zero.
- Consistency function ``f(x, t) = x − t·v_student(x, t, g)``: ``f(x, 0) = x`` exactly.
- Target network: an EMA of the student (``distill.target_decay``), the bootstrapping that keeps
  consistency training from collapsing. (The export EMA is separate: ``ema.decay``.)
- Loss: draw ``n`` from N intervals of the (shifted) grid, ``x_{t_{n+1}}`` from data + noise, one
  teacher ODE step (Euler or Heun) to ``t_n`` with classifier-free guidance at ``g ~ U[g_min,
  g_max]``, then ``d(f_student(x_{t_{n+1}}), f_target(x̂_{t_n}))`` with L2 or pseudo-Huber ``d``.

Validation (``validation.every`` > 0, as for the DiT: ``pipeline.training.validation``): this loss
on held-out latents with fixed noise, at the interval that ends at each of ``validation.bins``'
times and at the sampling guidance, for the student (or its EMA) against the target network.

Precision and parallelism: the student trains like the DiT (any precision, DDP or ZeRO-2/3). The
target network is an fp32 EMA copy of the student taken before ``prepare``, updated from the same
whole (under ZeRO-3: gathered block by block) parameters as the export EMA; the frozen teacher is
fp32 and replicated on every rank. Both run under autocast in the run's compute dtype.

Adversarial term (``distill.adversarial``, off at ``weight`` 0; ``pipeline.training.ladd``, LADD):
the student's ``x̂0`` of the consistency loss, re-noised, is judged by heads on the frozen teacher's
block features against the batch's re-noised latents; from ``start_step`` the loss is the
consistency loss plus ``weight``·the hinge generator loss (one backward), and at each window's
boundary the heads take ``d_steps`` updates of their own (plain autograd, own AdamW, gradients
all-reduced over the ranks). The logged line adds ``g_loss``, ``d_loss``, ``d_real``, ``d_fake``.

Denoising term (``distill.denoise_weight``, off at 0; CTM, Kim et al. 2024, its L_DSM): the training
loss adds ``denoise_weight``·``d(f_student(x_{t_{n+1}}), x̂0)``, the same prediction against ``x̂0``,
the batch's own latents (``denoise_target: data``, CTM's real-data term) or the teacher's guided
one-step x0-prediction ``x_{t_{n+1}} − t_{n+1}·v_teacher`` (``teacher``: the Euler step's own
velocity, no extra evaluation). Validation reads the consistency loss alone.

Fine-tuning (``distill.student_init``): an exported student's weights replace the fresh copy of the
teacher (the target network and the export EMA start from them).

The run ends with the student exported; comparing it with the teacher is the evaluation layer's
(``python -m pipeline.compare``, ``pipeline.evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.config import ConfigError
from pipeline.diffusion.flow import resolve_shift, shift_time
from pipeline.diffusion.guidance import guided_velocity
from pipeline.diffusion.samplers import consistency_fn
from pipeline.models.dit import DiT
from pipeline.models.student import load_teacher, student_from
from pipeline.training.consistency import CTSection, distance
from pipeline.training.dit import Trainer, condition, to_device, training_plan
from pipeline.training.dit_config import SamplingConfig, TrainConfig
from pipeline.training.ema import EMA
from pipeline.training.ladd import AdversarialSection, Discriminator, Heads, resolve_blocks
from pipeline.training.preflight import ModelSpec, TrainingPlan
from pipeline.training.validation import Unit

PROG = "pipeline.distill"


@dataclass(kw_only=True)
class DistillSection:
    mode: Literal["cd", "ct"] = "cd"  # cd: distil the teacher; ct: consistency training, no teacher (ct section)
    intervals: int = 32  # N: the discretisation of [0, 1] the teacher steps on
    shift: float | Literal["auto"] = 1.0  # resolution shift of that grid; auto: SD3's, per batch from its tokens
    solver: Literal["euler", "heun"] = "euler"
    guidance_min: float = 2.0  # g ~ U[min, max], given to the student as an input
    guidance_max: float = 6.0
    target_decay: float = 0.95  # EMA of the student used as the target network (paper: 0.95;
    # slower, 0.98-0.99, gave better 4-step samples on the demo: configs/distill_demo.yaml)
    loss: Literal["l2", "l1", "pseudo_huber"] = "pseudo_huber"
    huber_c: float | None = None  # None: 0.00054·sqrt(d) (iCT)
    adversarial: AdversarialSection = field(default_factory=AdversarialSection)  # LADD's term (pipeline.training.ladd)
    consistency_weight: float = 1.0  # the consistency loss's weight beside the adversarial term; 0: LADD alone (as its paper)
    student_init: Path | None = None  # an exported student folder to continue from (fine-tune); None: the teacher's copy
    denoise_weight: float = 0.0  # CTM's denoising term beside the consistency loss: weight·d(f_student(x_t), x̂0); 0: off
    denoise_target: Literal["data", "teacher"] = "data"  # x̂0: the batch's own latent, or the teacher's guided one-step x0

    def __post_init__(self) -> None:
        if self.intervals < 1 or not 0 <= self.target_decay < 1:
            raise ValueError("intervals must be >= 1 and target_decay in [0, 1)")
        if self.denoise_weight < 0:
            raise ValueError(f"denoise_weight must be >= 0 (got {self.denoise_weight})")
        if not 1 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 1 <= guidance_min <= guidance_max (got {self.guidance_min}, {self.guidance_max})")


@dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    teacher: Path | None = None  # an exported model folder (pipeline.train); distill.mode=cd needs it, ct reads none
    distill: DistillSection = field(default_factory=DistillSection)
    ct: CTSection = field(default_factory=CTSection)  # distill.mode=ct: the teacher-free recipe's own settings
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=4, guidance=4.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill.mode == "cd" and self.teacher is None:
            raise ValueError("teacher: distill.mode=cd distils a teacher: give its model folder (teacher=runs/NAME/model)")
        if self.distill.mode == "ct" and self.teacher is not None:
            raise ValueError(f"teacher={self.teacher}: distill.mode=ct trains without a teacher (start from a checkpoint "
                             "with model.init instead)")
        if self.distill.consistency_weight < 0 or (self.distill.consistency_weight != 1 and not self.distill.adversarial.enabled):
            raise ValueError(f"distill.consistency_weight={self.distill.consistency_weight}: weighs the consistency loss against the "
                             "adversarial term (distill.adversarial.weight > 0); must be >= 0")
        if self.distill.mode == "ct" and self.distill.adversarial.enabled:
            raise ValueError("distill.adversarial.weight: the adversarial term reads the teacher's features: distill.mode=cd only")
        if self.distill.mode == "ct" and self.distill.denoise_weight:
            raise ValueError("distill.denoise_weight: distill.mode=ct has the term already (its targets at r = 0 are the data); "
                             "distill.mode=cd only")


class Distiller(Trainer):
    """The DiT recipe's machinery with the consistency-distillation loss."""

    cfg: DistillConfig
    prog = PROG

    def __init__(self, cfg: DistillConfig) -> None:
        self.teacher = load_teacher(cfg.teacher)
        mode = self.teacher.config.get("image_condition")
        if mode is not None:  # before any work: the loss has no source image to give it
            raise ConfigError(f"teacher: {cfg.teacher} is image-conditioned (image_condition={mode}); consistency distillation "
                              "takes a text-to-image teacher")
        resolve_blocks(cfg.distill.adversarial, self.teacher.config["depth"])  # a bad block index: one line, before any work
        super().__init__(cfg)
        self.teacher.to(self.accelerator.device)
        a = cfg.distill.adversarial
        self.ladd = Discriminator(a, self.teacher, self.autocast, self.accelerator.device) if a.enabled else None
        self.adversarial_running: list[dict[str, torch.Tensor]] = []  # since the last logged line
        self.uniform_grid = torch.linspace(0.0, 1.0, cfg.distill.intervals + 1, device=self.accelerator.device)

    def time_grid(self, x0: torch.Tensor) -> torch.Tensor:
        """The N + 1 distillation times for this batch's grid (shifted; ``auto`` per bucket)."""
        shift = resolve_shift(self.cfg.distill.shift, self.image_tokens(x0), self.cfg.timesteps.shift_base_tokens)
        return shift_time(self.uniform_grid, shift)

    def build_averages(self, model: torch.nn.Module) -> None:
        self.target = EMA(model, self.cfg.distill.target_decay).to(self.accelerator.device)  # the fresh student: the teacher + zero guidance

    def build_model(self) -> torch.nn.Module:
        student = student_from(self.teacher)
        if self.cfg.distill.student_init is not None:
            start = DiT.from_pretrained(Path(self.cfg.distill.student_init) / "transformer")
            student.load_state_dict(start.state_dict())  # strict: a student of this teacher's architecture
        return student

    def teacher_step(self, x: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, cond: dict,
                     g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided ODE step of the frozen teacher from ``t_hi`` down to ``t_lo``, and its guided
        velocity at ``(x, t_hi)`` (both (B, C, h, w))."""
        dt = (t_lo - t_hi).reshape(-1, 1, 1, 1)
        v = guided_velocity(self.teacher, x, t_hi, cond, g)
        x_euler = x + dt * v
        if self.cfg.distill.solver == "euler":
            return x_euler, v
        return x + dt * 0.5 * (v + guided_velocity(self.teacher, x_euler, t_lo, cond, g)), v

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per_sample, t_hi, _ = self.consistency_terms(self.model, *self.draws(batch))
        return per_sample, t_hi

    def draws(self, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training batch's latents x0 (B, C, h, w), text cond (none dropped), noise, intervals n (B,)
        and guidance g (B,), drawn in this order from the training streams."""
        d, device = self.cfg.distill, self.accelerator.device
        x0 = to_device(batch["latent"], device)  # (B, C, h, w)
        rows = x0.shape[0]
        cond = condition(batch, 0.0, device)
        n = torch.randint(0, d.intervals, (rows,), device=device)
        noise = torch.randn_like(x0)
        g = d.guidance_min + (d.guidance_max - d.guidance_min) * torch.rand(rows, device=device)
        return x0, cond, noise, n, g

    def consistency_loss(self, student: torch.nn.Module, x0: torch.Tensor, cond: dict, noise: torch.Tensor, n: torch.Tensor,
                         g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``d(f_student(x_{t_{n+1}}), f_target(x̂_{t_n}))`` per sample (B,) and ``t_{n+1}`` (B,): interval
        ``n`` (B,) of this batch's grid, noise (B, C, h, w), guidance ``g`` (B,)."""
        return self.consistency_terms(student, x0, cond, noise, n, g, denoise=False)[:2]

    def consistency_terms(self, student: torch.nn.Module, x0: torch.Tensor, cond: dict, noise: torch.Tensor, n: torch.Tensor,
                          g: torch.Tensor, denoise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`consistency_loss`'s values, plus ``denoise_weight``·``d(f_student(x_{t_{n+1}}), x̂0)``
        when ``denoise`` (training; CTM's denoising term), and the student's prediction
        ``f_student(x_{t_{n+1}})`` (B, C, h, w), with its graph (the adversarial term's negatives)."""
        d = self.cfg.distill
        grid = self.time_grid(x0)
        t_lo, t_hi = grid[n], grid[n + 1]
        x_hi = (1 - t_hi.view(-1, 1, 1, 1)) * x0 + t_hi.view(-1, 1, 1, 1) * noise
        with torch.no_grad(), self.autocast():
            x_lo, v_teacher = self.teacher_step(x_hi, t_hi, t_lo, cond, g)
            target = consistency_fn(self.target.module, x_lo, t_lo, {**cond, "guidance": g})
        prediction = consistency_fn(student, x_hi, t_hi, {**cond, "guidance": g})
        per_sample = distance(prediction, target, d.loss, d.huber_c)
        if d.denoise_weight and denoise:
            x0_hat = x0 if d.denoise_target == "data" else x_hi - t_hi.view(-1, 1, 1, 1) * v_teacher
            per_sample = per_sample + d.denoise_weight * distance(prediction, x0_hat, d.loss, d.huber_c)
        return per_sample, t_hi, prediction

    def micro_step(self, batch: dict) -> torch.Tensor | None:
        """The DiT's micro-step (consistency loss alone) or, with the adversarial term on, the
        consistency loss plus ``weight``·G from ``start_step`` in one backward, the window's fakes
        and reals kept from the heads' start, and at the boundary the student's optimizer step
        followed by the heads' ``d_steps`` updates. Logs the consistency loss."""
        if self.ladd is None:
            return super().micro_step(batch)
        a = self.cfg.distill.adversarial
        with self.accumulation(self.model):
            x0, cond, *rest = self.draws(batch)
            per_sample, t, prediction = self.consistency_terms(self.model, x0, cond, *rest)  # (B,), (B,), (B, C, h, w)
            consistency = per_sample.mean()
            loss = self.cfg.distill.consistency_weight * consistency
            stats, weights = {}, (t >= a.min_t).float()  # (B,): the rows that are negatives
            if self.step >= a.start_step:
                g_loss = self.ladd.generator_loss(prediction, cond, weights)
                loss = loss + a.weight * g_loss
                stats = {"g_loss": g_loss.detach()}
            if not self.finite_everywhere(loss):
                return None
            self.accelerator.backward(loss)
            if self.step >= a.d_start:
                self.ladd.remember(prediction, x0, cond, weights)
            if self.accelerator.sync_gradients:
                self.optimizer_step()
                if self.step >= a.d_start:
                    stats.update(self.ladd.update())
        self.adversarial_running.append(stats)
        self.record(t, per_sample, batch["latent"].shape[0])
        return consistency.detach()

    def metrics(self, running: list) -> dict:
        """The DiT's line, plus the adversarial term's means since the last one (those that ran)."""
        line = super().metrics(running)
        for key in ("g_loss", "d_loss", "d_real", "d_fake"):
            values = [s[key] for s in self.adversarial_running if key in s]
            if values:
                line[key] = torch.stack(values).mean().item()
        self.adversarial_running.clear()
        return line

    def validation_values(self, units: list[Unit]) -> torch.Tensor:
        """The consistency loss of held-out units, (B, 1): fixed noise, the interval whose upper end
        is the first grid point at or above the bin's time (``t_{n+1} = t`` when ``t·N`` is whole),
        and the sampling guidance (clamped into the trained range)."""
        d = self.cfg.distill
        x0, cond, noise, t = self.validation_batch(units)
        n = (t * d.intervals - 1e-4).ceil().long().clamp(1, d.intervals) - 1  # (B,); the margin: 0.3·10 in fp32 is 3.0000001
        g = torch.full_like(t, min(max(self.cfg.sampling.guidance, d.guidance_min), d.guidance_max))
        return self.consistency_loss(self.validation_network(), x0, cond, noise, n, g)[0][:, None]

    def average(self, group: list[tuple[str, torch.nn.Parameter]]) -> None:
        super().average(group)
        self.target.update(group)

    def save_extra(self, folder: Path) -> None:
        super().save_extra(folder)
        self.target.save(folder / "target.safetensors")
        if self.ladd is not None:
            self.ladd.save(folder)

    def load_extra(self, folder: Path) -> None:
        super().load_extra(folder)
        self.target.load(folder / "target.safetensors")
        if self.ladd is not None:
            self.ladd.load(folder)

    def export_info(self) -> dict:
        s, d = self.cfg.sampling, self.cfg.distill
        return {
            "kind": "consistency_student",
            "sampler": "consistency",
            "teacher": str(self.cfg.teacher),
            "sampling": {"steps": s.steps, "guidance": s.guidance, "shift": s.shift},
            "guidance_range": [d.guidance_min, d.guidance_max],
            **{k: v for k, v in super().export_info().items() if k in ("timesteps", "buckets")},
        }


def plan(cfg: DistillConfig, prog: str = PROG) -> TrainingPlan:
    """This recipe for the dry run: the student (trained; the export EMA and the target network are
    fp32 EMA copies of it) and the frozen fp32 teacher, read from its config.json (built on ``meta``)."""
    config = DiT.load_config(Path(cfg.teacher) / "transformer")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        teacher = DiT(**config)
        student = DiT(**{**config, "guidance_embed": True})
    specs = (
        ModelSpec("student", student, trained=True, fp32_copies=("EMA", "target network"),
                  gradient_checkpointing=cfg.model.gradient_checkpointing),
        ModelSpec("teacher", teacher, trained=False, frozen_bytes=4),
    )
    a = cfg.distill.adversarial
    if a.enabled:  # the discriminator's heads: trained, fp32, replicated (their AdamW outside DeepSpeed)
        blocks = resolve_blocks(a, config["depth"])
        with torch.device("meta"):
            heads = Heads(config["hidden_size"], len(blocks), a.head_width, config.get("clip_dim", 0) if a.text else 0)
        specs = (*specs, ModelSpec("LADD heads", heads, trained=True))
    return training_plan(cfg, prog, specs)
