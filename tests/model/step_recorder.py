"""A callback for the resume tests: one JSON line per optimizer step (batch hash, learning rate, loss), flushed at
once so that a run killed with SIGKILL leaves every step it finished on disk. Loaded by class path from
training subprocesses (tests/model is put on their PYTHONPATH)."""

from __future__ import annotations

import hashlib
import json
import time

from lightning.pytorch.callbacks import Callback


class StepRecorder(Callback):
    def __init__(self, path: str, delay: float = 0.0):
        self.path, self.delay = path, delay  # delay: seconds per step, so that a kill lands where the test wants
        self._lr = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this batch's step uses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "lr": self._lr,
                  "loss": float(outputs["loss"]).hex(), "batch": hashlib.sha1(x.numpy().tobytes()).hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        time.sleep(self.delay)
