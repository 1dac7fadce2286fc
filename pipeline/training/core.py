"""The one training core every recipe runs on (DESIGN.md §6): run folder, resume, atomic
checkpoints of every piece of state, and the micro-batch / optimizer-step loop with its progress
bar, logging and checkpoint schedule.

A recipe (``training.dit``, ``training.distill``, ``training.autoencoder``) subclasses
:class:`TrainerCore` and provides, before ``fit``:

- its networks and optimizers prepared on ``self.accelerator`` (their weights, optimizer states
  and every rank's RNG states are what ``accelerator.save_state`` writes);
- ``self.loader``, a resumable ``pipeline.data.stream.ShardLoader`` (its position is saved per
  rank) and ``self.schedules``, the LR schedules by name (stepped by the recipe once per
  optimizer step, saved here with ``weights_only``-loadable state);
- ``micro_step(batch)``: forward and backward of one micro-batch inside
  :meth:`accumulation`, the optimizer steps at the window's boundary; it returns what to log
  (tensors) or ``None`` to drop a micro-batch whose loss was not finite on some rank;
- optional hooks: ``after_optimizer_step`` (weight averages), ``metrics`` (the logged line),
  ``on_step`` (sample grids, evaluations), ``save_extra`` / ``load_extra``, ``train_state`` /
  ``load_train_state`` (more counters) and ``export``;
- optionally ``self.validation`` (``pipeline.training.validation.Validation``: the held-out set
  and this rank's share) with ``validation_values(units)`` and ``validation_mode()``: every
  ``every`` steps and at the last, each rank runs its share, the sums are all-reduced once and
  the main process logs them; at the end it plots them (``RUN/val_loss.png``).

A window whose optimizer step was skipped on overflow (fp16: the loss scaler found inf/nan
gradients; :meth:`TrainerCore.step_was_skipped`) advances nothing: not the step counter, not the
EMA, not the logging or checkpoint schedule (and the recipe leaves its LR schedule alone). It is
counted in ``overflow_steps`` (the train state, and the logged line beside ``skipped_steps``).

One resume rule (``Checkpoints.resume_folder``), one checkpoint mechanism, one data position.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import ConfigError, save_config, to_dict
from pipeline.data.remote import SourceError
from pipeline.data.sizes import CACHE_FILE, sizes_once
from pipeline.encoders.common import EncoderLoadError
from pipeline.training.checkpoint import Checkpoints, load_tensors, read_train_state, save_tensors, write_train_state
from pipeline.training.distributed import shutdown
from pipeline.training.preflight import PlanError
from pipeline.training.tracking import Tracker


class TrainerCore:
    """A training run's machinery; see the module docstring for what a recipe adds."""

    prog = "pipeline.training"  # the command's name in messages and the progress bar

    def __init__(self, cfg, accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.is_main = accelerator.is_main_process
        self.checkpoints = Checkpoints(cfg.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.schedules: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.loader = None
        self.validation = None  # a Validation the recipe sets (None: off)
        self.step, self.micro, self.bad_steps, self.skipped, self.overflow_steps = 0, 0, 0, 0, 0
        self.running: list = []  # what micro_step returned since the last logged line

    # ------------------------------------------------------------------ state

    def save(self) -> Path:
        """Checkpoint every piece of state, atomically (``Checkpoints.save``)."""

        def write(folder: Path) -> None:
            self.accelerator.save_state(str(folder / "accelerate"), safe_serialization=True)
            (folder / f"data_rank{self.accelerator.process_index}.json").write_text(json.dumps(self.loader.state_dict()))
            if self.is_main:
                for name, schedule in self.schedules.items():
                    save_tensors(schedule.state_dict(), folder / f"{name}.pt")
                self.save_extra(folder)
                write_train_state(folder, self.train_state())

        return self.checkpoints.save(self.step, write, self.is_main, self.accelerator.wait_for_everyone)

    def resume(self) -> None:
        """Continue from the checkpoint ``checkpoint.resume`` names, as if never stopped."""
        folder = self.checkpoints.resume_folder(self.cfg.checkpoint.resume)
        if folder is None:
            return
        self.accelerator.load_state(str(folder / "accelerate"))
        self.loader.load_state_dict(json.loads((folder / f"data_rank{self.accelerator.process_index}.json").read_text()))
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(load_tensors(folder / f"{name}.pt"))
            for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr()):
                group["lr"] = lr  # the schedule's LR for the next step, whatever the optimizer state carried
        self.load_extra(folder)
        self.load_train_state(read_train_state(folder))
        self.accelerator.print(f"{self.prog}: resumed from {folder} at step {self.step}")

    def shard_sizes(self, shards: list[str], meta: dict | None = None) -> list[int]:
        """Samples per shard, found once for the run: by the main process (from ``meta``'s
        ``shard_samples``, the stats files, or by reading; cached in the run folder for resumes) and
        broadcast, so no other rank reads a byte of it (``pipeline.data.sizes``)."""
        from accelerate.utils import broadcast_object_list

        def share(value):
            return broadcast_object_list([value], from_process=0)[0] if self.accelerator.num_processes > 1 else value

        return sizes_once(shards, self.cfg.run_dir / CACHE_FILE, self.is_main, share, meta)

    def train_state(self) -> dict:
        """The counters a checkpoint keeps (``train_state.json``); a recipe may add its own."""
        return {"step": self.step, "bad_steps": self.bad_steps, "skipped": self.skipped, "overflow_steps": self.overflow_steps}

    def load_train_state(self, state: dict) -> None:
        """Restore :meth:`train_state`'s counters (those a checkpoint lacks start at 0)."""
        self.step, self.bad_steps = state["step"], state.get("bad_steps", 0)
        self.skipped, self.overflow_steps = state.get("skipped", 0), state.get("overflow_steps", 0)

    def save_extra(self, folder: Path) -> None:
        """More state for a recipe to checkpoint (main process)."""

    def load_extra(self, folder: Path) -> None:
        """Restore what :meth:`save_extra` wrote."""

    # ------------------------------------------------------------------ steps

    def accumulation(self, *models):
        """accelerate's accumulation context with its window counted from ours, so a dropped
        micro-batch does not shift it: DDP all-reduces only inside the window's last micro-batch."""
        self.accelerator.step = self.micro
        return self.accelerator.accumulate(*models)

    def finite_everywhere(self, loss: torch.Tensor) -> bool:
        """All ranks agree whether this micro-batch's loss is finite (one sync per micro-batch)."""
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def micro_step(self, batch: dict):
        raise NotImplementedError

    def step_was_skipped(self) -> bool:
        """Whether the optimizer step that ended this window was skipped on overflow: fp16's loss
        scaler found inf/nan gradients (accelerate's ``optimizer_step_was_skipped``; under DeepSpeed
        its optimizer's ``overflow``, its engine having stepped inside ``backward``). Gradients are
        all-reduced before the check, so every rank answers alike."""
        return self.accelerator.optimizer_step_was_skipped

    def after_optimizer_step(self) -> None:
        """Work after each optimizer step (weight averages)."""

    def handle_bad_step(self) -> None:
        self.bad_steps += 1
        self.skipped += 1
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"{self.prog}: {self.bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                "Lower optim.lr, raise optim.warmup_steps or check the data."
            )

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        """Resume, then micro-batches until ``cfg.steps`` optimizer steps, then :meth:`finish`."""
        cfg = self.cfg
        if self.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, cfg.run_dir / "config.yaml")
        self.resume()
        tracker = Tracker(cfg.run_dir, cfg.logging, to_dict(cfg), cfg.run, enabled=self.is_main)
        self.on_fit_start()
        with tqdm(total=cfg.steps, initial=self.step, desc=self.prog, disable=not self.is_main, unit="step") as bar:
            for batch in self.loader:
                if self.step >= cfg.steps:
                    break
                out = self.micro_step(batch)
                if out is None:
                    self.handle_bad_step()
                    continue
                self.bad_steps, self.micro = 0, self.micro + 1
                self.running.append(out)
                if self.micro < cfg.optim.grad_accum:
                    continue
                self.micro = 0
                if self.step_was_skipped():  # nothing advances but the counter
                    self.overflow_steps += 1
                    continue
                self.step += 1
                self.after_optimizer_step()
                bar.update()
                self.end_of_step(tracker)
        self.finish(tracker)

    def on_fit_start(self) -> None:
        """Just before the first batch (after resume): start meters."""

    def end_of_step(self, tracker: Tracker) -> None:
        """The logged line, the recipe's per-step work, and checkpoints, on their schedules."""
        cfg, metrics = self.cfg, {}
        if self.step % cfg.logging.every == 0 or self.step == cfg.steps:
            metrics = self.metrics(self.running)
            self.running.clear()
        metrics.update(self.on_step())
        if self.validation is not None and self.validation.due(self.step, cfg.steps):
            metrics.update(self.validate())
        if metrics:
            tracker.log(self.step, metrics)
        if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
            self.save()

    def metrics(self, running: list) -> dict:
        """The logged line from what ``micro_step`` returned since the last one."""
        return {}

    def on_step(self) -> dict:
        """A recipe's work after each optimizer step; returns more metrics for this step's line."""
        return {}

    def validate(self) -> dict:
        """The held-out metrics: this rank's share, all-reduced (every rank calls it at the same step)."""
        with self.validation_mode():
            totals = self.validation.run(self.validation_values, self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return self.validation.metrics(totals)

    def validation_values(self, units: list[tuple[int, int]]) -> torch.Tensor:
        """The quantities ``self.validation.names`` of held-out units ``(sample, bin)``, (B, K)."""
        raise NotImplementedError

    def validation_mode(self):
        """The context validation runs in (networks in eval mode, autocast)."""
        return contextlib.nullcontext()

    def finish(self, tracker: Tracker) -> None:
        """Wait for every rank; the main process exports and plots the validation loss."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.export()
            if self.validation is not None:
                from pipeline.figures.plots import plot_validation_loss

                plot_validation_loss(self.cfg.run_dir / "metrics.jsonl", self.cfg.run_dir / "val_loss.png")
        tracker.close()

    def export(self) -> None:
        """Write the run's product (main process)."""

    def close(self) -> None:
        """Wait for every rank and tear the process group down (the end of a command)."""
        shutdown(self.accelerator)


def run_training(trainer_cls: type[TrainerCore], cfg, prog: str) -> int:
    """Build and fit a trainer; one line and an exit code for what a user can fix."""
    try:
        trainer = trainer_cls(cfg)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    except PlanError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, SourceError) as e:  # a data folder or URL that is not there or not readable
        print(f"{prog}: data error: {e}", file=sys.stderr)
        return 2
    except EncoderLoadError as e:  # an encoder the latents name is not where they say (encoders.* moves it)
        print(f"{prog}: encoder error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except FloatingPointError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        trainer.close()
    return 0
