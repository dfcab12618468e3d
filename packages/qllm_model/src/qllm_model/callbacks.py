"""The training run's callbacks: the two checkpoint roles and progress lines a log file can hold.

- ``ResumeCheckpoint`` (``--checkpoint.*``), fault tolerance: ``last.ckpt`` every N optimizer steps and at every
  stop (``max_steps``, ``max_time``, SIGTERM, Ctrl-C), whether or not a validation has run. Written atomically
  (a temporary file, then a rename), so a kill during the write leaves the previous one intact.
- ``BestCheckpoint`` (``--best_checkpoint.*``): the model with the lowest ``val/bpb``, saved right after the
  validation that scored it, so its name carries its own score.
- ``ProgressLog`` (``--progress.*``): one line every N steps (step, train and val bits per byte, tokens/s, lr,
  elapsed, ETA) on stdout, readable in a terminal and in a redirected log (unlike a progress bar).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps and when training stops, for ``--ckpt_path last``.

    It monitors nothing, so it saves from step ``every_n_train_steps`` on (a monitored ModelCheckpoint would wait
    for the first validation). Stops it saves at: ``max_steps``; ``max_time`` (Lightning's Timer asks to stop);
    SIGTERM (Lightning records it; here the run saves and stops at the end of the current step); Ctrl-C (the first
    one asks for the same graceful stop, a second one interrupts at once without saving). A run killed with
    SIGKILL loses at most ``every_n_train_steps`` steps.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100):
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"--checkpoint.every_n_train_steps must be an integer >= 1, got {every_n_train_steps!r}")
        super().__init__(dirpath=dirpath, monitor=None, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=False,
                         enable_version_counter=False)
        self._interrupted = False
        self._previous_sigint: Any = None

    # --- Ctrl-C: the first one is a request to stop at the end of the step --------------------------------
    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C: give up on the graceful stop
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nCtrl-C: saving a checkpoint and stopping after this step (press again to abort without saving)",
              flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        local = self._interrupted or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:  # every process must stop (and save, a collective call) at the same step
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stop_requested(trainer):
            trainer.should_stop = True
        at_max_steps = 0 < trainer.max_steps <= trainer.global_step
        if (trainer.should_stop or at_max_steps) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: this role does not depend on validation (the best checkpoint does)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:  # e.g. the end of the last epoch
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # Under DDP, Lightning raises SIGTERMException on every process at the start of a step, i.e. between two
        # optimizer steps: the state is consistent, so it is saved. Any other exception (a second Ctrl-C
        # included) may have struck in the middle of an update, and the previous checkpoint is kept.
        if isinstance(exception, SIGTERMException) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        temporary = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, temporary)
        if trainer.is_global_zero:
            os.replace(temporary, filepath)
        trainer.strategy.barrier("qllm_resume_checkpoint")
        self._last_checkpoint_saved = filepath


class BestCheckpoint(ModelCheckpoint):
    """``best-step{step}-bpb{val/bpb}.ckpt``: the ``save_top_k`` models with the lowest ``monitor``.

    Saved only at the end of a validation, with the score that validation just computed (never a step-triggered
    save carrying an older score). ``save_top_k=0`` turns it off.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/bpb", save_top_k: int = 1):
        if not isinstance(save_top_k, int) or save_top_k < 0:
            raise ValueError(f"--best_checkpoint.save_top_k must be an integer >= 0, got {save_top_k!r}")
        super().__init__(dirpath=dirpath, monitor=monitor, mode="min", save_top_k=save_top_k,
                         filename="best-step{step}-" + monitor.rsplit("/", 1)[-1] + "{" + monitor + ":.4f}",
                         auto_insert_metric_name=False, save_last=False, every_n_epochs=1,
                         save_on_train_epoch_end=False, enable_version_counter=False)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Nothing: saved only after a validation."""

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        """Nothing: saved only after a validation."""


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


class ProgressLog(Callback):
    """Print ``step N/M | train bpb | val bpb | tokens/s | lr | elapsed | ETA`` every ``every_n_steps`` steps.

    Tokens are the bytes of every process's batches. The ETA is the sooner of the step budget (at the rate of the
    last interval) and the time budget.
    """

    def __init__(self, every_n_steps: int = 50):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"--progress.every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._start = self._mark = 0.0
        self._mark_step = 0
        self._tokens = 0
        self._last_val: float | None = None

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._mark = time.monotonic()
        self._mark_step, self._tokens = trainer.global_step, 0
        params = sum(p.numel() for p in pl_module.parameters())
        budget = f"{trainer.max_steps} steps" if trainer.max_steps > 0 else "no step limit"
        time_left = training_time_left(trainer)
        if time_left is not None:
            budget += f", {_clock(time_left)} of training time left"
        resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        self._print(trainer, f"training {params:,} parameters on {trainer.world_size} process(es): {budget}{resumed}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or step == self._mark_step:
            return
        now = time.monotonic()
        interval, steps = now - self._mark, step - self._mark_step
        rate = self._tokens / interval if interval > 0 else float("nan")
        eta = (trainer.max_steps - step) * interval / steps if trainer.max_steps > 0 and steps else float("inf")
        time_left = training_time_left(trainer)
        if time_left is not None:
            eta = min(eta, time_left)
        metrics = trainer.callback_metrics
        train = f"{float(metrics['train/bpb']):.3f}" if "train/bpb" in metrics else "?"
        val = f"{self._last_val:.4f}" if self._last_val is not None else "-"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        self._print(trainer, f"step {step}{total} | train bpb {train} | val bpb {val} | {rate:,.0f} tokens/s | "
                             f"lr {lr:.2e} | elapsed {_clock(now - self._start)} | ETA {_clock(eta)}")
        self._mark, self._mark_step, self._tokens = now, step, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/bpb" not in trainer.callback_metrics:
            return
        self._last_val = float(trainer.callback_metrics["val/bpb"])
        self._print(trainer, f"step {trainer.global_step}: val bpb {self._last_val:.4f}")


def training_timer(trainer: L.Trainer) -> Timer | None:
    """The Timer Lightning adds for ``--trainer.max_time`` (None without a time budget)."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def training_time_left(trainer: L.Trainer) -> float | None:
    """Seconds of ``--trainer.max_time`` left (negative past it), or None without a time budget."""
    timer = training_timer(trainer)
    return None if timer is None else timer.time_remaining("train")


__all__ = ["BestCheckpoint", "ProgressLog", "ResumeCheckpoint", "training_time_left", "training_timer"]
