"""``accelerate launch -m pipeline.train --config configs/X.yaml [section.key=value ...]``

Trains a DiT on latent shards with rectified flow (``pipeline.flow``), under accelerate with
DeepSpeed ZeRO-2 by default (ZeRO-3 as an option, plain DDP when DeepSpeed is off), an fp32
EMA, atomic checkpoints with the complete state (model, optimizer, LR schedule, EMA, step, RNG
states, data position) and exact resume, a guided sample grid every N steps, and at the end the
EMA weights exported as a ``from_pretrained`` model folder.

Precision and parallelism (DESIGN.md §8): master weights, optimizer state and the EMA are fp32;
``mixed_precision`` bf16/fp16 is the compute dtype (accelerate's autocast, or DeepSpeed's 16-bit
module with its fp16 loss scaling); the model casts its inputs (``DiT._cast_inputs``); the loss
is computed in fp32. Each micro-batch's forward and backward run inside the accumulation context
(DDP all-reduces only at the boundary) and the LR schedule steps once per optimizer step, on any
world size. Under ZeRO-3 the EMA reads the parameters gathered one block at a time
(``pipeline.distributed.whole_parameters``) and keeps a full fp32 copy on every rank.
Sample grids draw from forked RNG streams and encode their fixed prompts once (the text encoders
are then released; the VAE is loaded per grid and released), so ``sampling.every`` never changes
the training trajectory or the memory that stays resident.

Classifier-free guidance: with probability ``p_uncond`` a sample's text is replaced by the
model's learned null condition (``cond["drop"]``: a learned null token instead of the T5/CLIP
tokens and a learned null vector instead of the pooled CLIP embedding). Sampling uses the same
null condition for the unconditional half.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.planning import dry_run
from pipeline.training.checkpoint import Checkpoints, load_tensors, read_train_state, save_tensors, write_train_state
from pipeline.config import ConfigError, parse_cli, save_config, to_dict
from pipeline.data.latents import latent_loader, latent_meta
from pipeline.training.distributed import compute_dtype, create_accelerator, deepspeed_plugin, dist_env, shutdown, whole_parameters
from pipeline.training.ema import EMA
from pipeline.diffusion.flow import flow_loss, loss_by_t, sample_timesteps
from pipeline.models.dit import build_dit, compile_blocks, flops_per_sample
from pipeline.training.optim import build_optimizer
from pipeline.training.tracking import Throughput, Tracker, device_peak_tflops
from pipeline.training.dit_config import TrainConfig

PROG = "pipeline.train"
T_BUCKETS = 10
TEXT_TOKENS_FOR_FLOPS = 32  # a typical caption length; only the logged TFLOP/s depend on it


def build_model(cfg: TrainConfig, meta: dict):
    """The DiT sized for the latents and text encoders recorded in the latent dataset.json."""
    text = meta["text_encoders"]
    channels, height, _ = meta["latent_shape"]
    widths = {
        "text_dim": text["t5"]["width"] if text.get("t5") else 0,
        "clip_dim": text["clip"]["width"] if text.get("clip") else 0,
        "clip_token_dim": text["clip"]["token_width"] if text.get("clip") and text["clip"].get("return_tokens") else 0,
    }
    model = build_dit(cfg.model.name, in_channels=channels, sample_size=height, qk_norm=cfg.model.qk_norm, **widths, **cfg.model.overrides)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def condition(batch: dict, p_uncond: float, device: torch.device) -> dict:
    """The model's ``cond`` from a latent batch; rows drawn with ``p_uncond`` use the null condition."""
    cond = {k: v.to(device) for k, v in batch.items() if k in ("t5", "t5_mask", "clip", "clip_tokens", "clip_tokens_mask")}
    rows = batch["latent"].shape[0]
    cond["drop"] = (torch.rand(rows) < p_uncond).to(device)
    return cond


class Trainer:
    """One training run: build, resume, loop, checkpoint, export."""

    prog = PROG  # the command's name in messages and the progress bar

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.meta = cfg, latent_meta(cfg.data.latents)
        dry_run.preflight_for(cfg, dist_env().world_size)  # before any collective: a plan that cannot run stops every rank alike
        self.accelerator = self._accelerator()
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.build_model()
        self.flops = flops_per_sample(model, tokens_text=TEXT_TOKENS_FOR_FLOPS)
        self.ema = EMA(model, cfg.ema.decay).to(self.accelerator.device)  # copied before prepare (ZeRO-3 partitions after it)
        self.build_averages(model)
        if cfg.model.compile:
            compile_blocks(model)  # after the copies: they stay plain modules
        optimizer, self.scheduler = build_optimizer(model.parameters(), cfg.optim, cfg.steps)  # the schedule is ours to step
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        torch.manual_seed(cfg.seed * 1000 + self.accelerator.process_index)  # per-rank noise
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.loader = latent_loader(cfg.data.latents, cfg.data.loader, rank, world)
        self.checkpoints = Checkpoints(cfg.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.step, self.micro, self.bad_steps, self.skipped, self.last_lr = 0, 0, 0, 0, cfg.optim.lr
        self.t_sums, self.t_counts = torch.zeros(T_BUCKETS), torch.zeros(T_BUCKETS)
        self._grid_cond: dict | None = None

    def build_model(self) -> torch.nn.Module:
        """The trained network (a subclass may start it from another model)."""
        return build_model(self.cfg, self.meta)

    def build_averages(self, model: torch.nn.Module) -> None:
        """More weight averages of the fresh ``model`` for a subclass (built before ``prepare``)."""

    def _accelerator(self):
        cfg, plugin = self.cfg, None
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
        return create_accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum, deepspeed_plugin=plugin
        )

    def autocast(self):
        """Mixed precision for networks outside ``prepare`` (frozen teacher, target, EMA): the
        compute dtype of the run, fp32 weights."""
        dtype = compute_dtype(self.cfg.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ------------------------------------------------------------------ state

    def save(self) -> Path:
        """Checkpoint every piece of state; atomic (``pipeline.checkpoint``)."""

        def write(folder: Path) -> None:
            self.accelerator.save_state(str(folder / "accelerate"), safe_serialization=True)
            (folder / f"data_rank{self.accelerator.process_index}.json").write_text(json.dumps(self.loader.state_dict()))
            if self.is_main:
                self.ema.save(folder / "ema.safetensors")
                save_tensors(self.scheduler.state_dict(), folder / "scheduler.pt")
                torch.save({"sums": self.t_sums, "counts": self.t_counts}, folder / "loss_by_t.pt")
                self.save_extra(folder)
                write_train_state(folder, {"step": self.step, "bad_steps": self.bad_steps, "skipped": self.skipped})

        return self.checkpoints.save(self.step, write, self.is_main, self.accelerator.wait_for_everyone)

    def resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        folder = None if choice == "never" else (self.checkpoints.latest() if choice == "auto" else Path(choice))
        if folder is None:
            return
        self.accelerator.load_state(str(folder / "accelerate"))
        self.loader.load_state_dict(json.loads((folder / f"data_rank{self.accelerator.process_index}.json").read_text()))
        self.ema.load(folder / "ema.safetensors")
        self.scheduler.load_state_dict(load_tensors(folder / "scheduler.pt"))
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's LR for the next step, whatever the optimizer state carried
        buckets = torch.load(folder / "loss_by_t.pt", weights_only=True)
        self.t_sums, self.t_counts = buckets["sums"], buckets["counts"]
        self.load_extra(folder)
        state = read_train_state(folder)
        self.step, self.bad_steps, self.skipped = state["step"], state["bad_steps"], state["skipped"]
        self.accelerator.print(f"{self.prog}: resumed from {folder} at step {self.step}")

    def save_extra(self, folder: Path) -> None:
        """More state for a subclass to checkpoint (main process)."""

    def load_extra(self, folder: Path) -> None:
        """Restore what :meth:`save_extra` wrote."""

    # ------------------------------------------------------------------ steps

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """All ranks agree whether this micro-batch's loss is finite (one sync per micro-batch)."""
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample rectified-flow loss (B,) in fp32 and the times it was drawn at (B,)."""
        device = self.accelerator.device
        x0 = batch["latent"].to(device)  # (B, C, h, w)
        cond = condition(batch, self.cfg.p_uncond, device)
        t = sample_timesteps(x0.shape[0], self.cfg.timesteps, device=device)
        return flow_loss(self.model, x0, cond, t, torch.randn_like(x0)), t

    def micro_step(self, batch: dict) -> torch.Tensor | None:
        """Forward and backward of one micro-batch inside the accumulation context (no all-reduce
        before the boundary), then the optimizer step at the boundary; None (nothing applied) when
        the loss is not finite on some rank."""
        accelerator = self.accelerator
        accelerator.step = self.micro  # accelerate counts the window from ours: a dropped micro-batch does not shift it
        with accelerator.accumulate(self.model):
            per_sample, t = self.loss(batch)  # (B,), (B,)
            loss = per_sample.mean()
            if not self._finite_everywhere(loss):
                return None
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self.optimizer_step()
        sums, counts = loss_by_t(t, per_sample, T_BUCKETS)
        self.t_sums += sums.cpu()
        self.t_counts += counts.cpu()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step, then advance the LR schedule once (DeepSpeed steps inside ``backward``; its
        wrapper's ``step`` is a no-op and its clipping comes from the JSON)."""
        if self.cfg.optim.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def update_averages(self) -> None:
        """The weight averages after an optimizer step, from whole parameters (gathered by block under ZeRO-3)."""
        for group in whole_parameters(self.accelerator.unwrap_model(self.model)):
            self.average(group)

    def average(self, group: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Update every average from one group of whole parameters (a subclass adds its own)."""
        self.ema.update(group, 0.0 if self.step <= self.cfg.ema.start_step else None)

    def handle_bad_step(self) -> None:
        self.bad_steps += 1
        self.skipped += 1
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"{self.prog}: {self.bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                "Lower optim.lr, raise optim.warmup_steps or check the latents."
            )

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        cfg = self.cfg
        if self.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, cfg.run_dir / "config.yaml")
        self.resume()
        tracker = Tracker(cfg.run_dir, cfg.logging, to_dict(cfg), cfg.run, enabled=self.is_main)
        tokens = math.prod(self.meta["latent_shape"][1:]) // 4  # patch 2 -> h·w/4 image tokens
        meter = Throughput(self.flops, tokens, self.accelerator.num_processes, device_peak_tflops(cfg.logging))
        running = []
        with tqdm(total=cfg.steps, initial=self.step, desc=self.prog, disable=not self.is_main, unit="step") as bar:
            for batch in self.loader:
                if self.step >= cfg.steps:
                    break
                loss = self.micro_step(batch)
                if loss is None:
                    self.handle_bad_step()
                    continue
                self.bad_steps, self.micro = 0, self.micro + 1
                running.append(loss)
                meter.add(batch["latent"].shape[0])
                if self.micro < cfg.optim.grad_accum:
                    continue
                self.step, self.micro = self.step + 1, 0
                self.update_averages()
                bar.update()
                self.after_step(tracker, meter, running)
        self.finish(tracker)

    def after_step(self, tracker: Tracker, meter: Throughput, running: list) -> None:
        """Logging, sample grids and checkpoints on their schedules."""
        cfg = self.cfg
        if self.step % cfg.logging.every == 0 or self.step == cfg.steps:
            loss = torch.stack(running).mean().item()
            running.clear()
            metrics = {"loss": loss, "lr": self.last_lr, "skipped_steps": self.skipped, **meter.report()}
            metrics["epoch"] = self.loader.epoch()
            tracker.log(self.step, metrics)
        if cfg.sampling.every and self.step % cfg.sampling.every == 0:
            self.sample_grid(f"step-{self.step:06d}")
        if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
            self.save()

    def finish(self, tracker: Tracker) -> None:
        """Export the EMA weights, draw the final grid and the loss-by-t plot."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            from pipeline.reporting.plots import plot_loss_by_t

            self.export()
            self.sample_grid("final")
            plot_loss_by_t(self.t_sums, self.t_counts, self.cfg.run_dir / "loss_by_t.png")
            print(f"{self.prog}: done at step {self.step}; model in {self.cfg.run_dir / 'model'}")
        tracker.close()

    def close(self) -> None:
        """Wait for every rank and tear the process group down (the end of a command)."""
        shutdown(self.accelerator)

    # ------------------------------------------------------------------ outputs

    def export(self) -> Path:
        from pipeline.inference.pipeline import export_model

        return export_model(self.cfg.run_dir / "model", self.ema.module, self.meta, self.export_info())

    def export_info(self) -> dict:
        """What ``pipeline.json`` says beyond the encoders: the sampler and its defaults."""
        s = self.cfg.sampling
        return {"sampler": "euler", "sampling": {"steps": s.steps, "guidance": s.guidance, "shift": s.shift}}

    def sample_grid(self, name: str) -> Path | None:
        """A captioned grid from the fixed prompts and seed with the EMA network (main process).

        It draws from forked RNG streams, so training continues exactly as without it."""
        if not self.is_main:
            return None
        from pipeline.encoders.vae import FrozenVAE, VAEConfig
        from pipeline.config import from_dict
        from pipeline.sample import TextToImage
        from pipeline.data.sheets import write_grid

        s, device = self.cfg.sampling, self.accelerator.device
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), self.autocast():
            cond = {k: v.to(device) for k, v in self.grid_condition().items()}
            vae = FrozenVAE(from_dict(VAEConfig, self.meta["config"]["vae"]), device)  # loaded for this grid only
            pipe = TextToImage(self.ema.module, vae, None, self.meta["latent_shape"], self.export_info()["sampler"])
            images = pipe.images(pipe.sample(cond, pipe.noise(len(s.prompts), s.seed), s.steps, s.guidance, s.shift, s.seed))
        del pipe, vae, cond
        release_memory()
        return write_grid(images, s.prompts, self.cfg.run_dir / "samples" / f"{name}.png")

    def grid_condition(self) -> dict:
        """The fixed prompts encoded once, kept on the CPU; the text encoders are released after."""
        if self._grid_cond is None:
            from pipeline.config import from_dict
            from pipeline.encoders import TextEncoders, TextEncodersConfig

            text = TextEncoders(from_dict(TextEncodersConfig, self.meta["config"]["text"]), self.accelerator.device)
            self._grid_cond = {k: v.cpu() for k, v in text.encode(self.cfg.sampling.prompts).items()}
            del text
            release_memory()
        return self._grid_cond


def release_memory() -> None:
    """Return freed device memory (models used for a moment: encoders, the VAE)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(trainer_cls: type[Trainer], cfg: TrainConfig, prog: str) -> int:
    """Build and fit a trainer; one line and an exit code for what a user can fix."""
    try:
        trainer = trainer_cls(cfg)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    except dry_run.PlanError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    try:
        trainer.fit()
    except FloatingPointError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    dry, argv = dry_run.split_flags(argv)  # --dry-run [--world-size N]: print the launch plan and exit
    about = __doc__.split("\n\n")[0] + " With --dry-run [--world-size N]: print the launch plan and exit."
    cfg = parse_cli(TrainConfig, argv, PROG, description=about)
    if dry is not None:
        return dry_run.run_stage(cfg, dry, dry_run.plan_for_train, PROG)
    return run(Trainer, cfg, PROG)


if __name__ == "__main__":
    sys.exit(main())
