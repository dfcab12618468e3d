"""QLLM as a ``LightningModule``: LM loss + coherence loss, AdamW (decay on matrices only), warmup + cosine to
the end of the training budget (steps or time), bits per byte on val/test, and generation in ``predict``.

Decoding settings are not the model's: ``predict`` receives them with each batch (``GenerationRequest``, built
by ``QLLMDataModule`` from ``--data.predict_*``)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from qllm_evals.metrics.bpb import BitsPerByte, nll_and_count

from .callbacks import training_timer
from .config import QLLMConfig
from .data import IGNORE_INDEX, GenerationRequest
from .lora import is_lora_parameter, mark_only_lora_trainable
from .model import QLLM


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float,
                  time_fraction: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the end of the budget.

    The decay's progress is the larger of the step budget's (``step`` of ``total_steps``; None: no step budget)
    and the time budget's (``time_fraction`` of ``max_time`` used), so a run stopped by either ends annealed.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps) if total_steps else 0.0
    progress = min(1.0, max(by_steps, time_fraction))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (linear weights, embeddings); biases, norms, phases, memory
    tokens and LoRA factors are not decayed. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not name.startswith("global_tokens") and not is_lora_parameter(name)
        (decay if is_matrix else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


class QLLMLitModule(L.LightningModule):
    def __init__(self, config: QLLMConfig | None = None, lr: float = 1e-3, min_lr_ratio: float = 0.1,
                 warmup_steps: int = 100, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 lora_only: bool = False, init_from: str | None = None, compile: bool = False):
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint's hyper-parameters
            config = QLLMConfig.from_dict(config)
        config = config or QLLMConfig()
        if lr <= 0:
            raise ValueError(f"--model.lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"--model.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"--model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if weight_decay < 0:
            raise ValueError(f"--model.weight_decay must be >= 0, got {weight_decay}")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": asdict(config), "lr": lr, "min_lr_ratio": min_lr_ratio,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "betas": list(betas), "lora_only": lora_only, "init_from": init_from,
                                   "compile": compile})
        self.config = config
        self.model = QLLM(config)
        if init_from:
            self.load_pretrained(init_from)
        if lora_only:
            mark_only_lora_trainable(self.model)
        self.val_bpb = BitsPerByte()
        self.test_bpb = BitsPerByte()
        # Kept out of the module tree (no duplicate "_compiled.*" keys in checkpoints).
        self.__dict__["_compiled"] = torch.compile(self.model) if compile else None

    def load_pretrained(self, path: str | Path) -> None:
        """Load a trained checkpoint's weights (Lightning .ckpt or a bare state dict); adapters stay fresh."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(("val_", "test_"))}
        own = self.model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state and not is_lora_parameter(k) and not k.endswith("lora_merged")]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected or mismatched:
            raise ValueError(f"--model.init_from {path}: checkpoint does not match the config (missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]})")
        self.model.load_state_dict(state, strict=False)

    def setup(self, stage: str) -> None:
        if stage == "predict":  # prompts only; their length is checked against the context when decoding
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(f"--data.seq_len={seq_len} exceeds --model.config.max_seq_len="
                             f"{self.config.max_seq_len} (the position table); make them equal")

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return (self._compiled or self.model)(input_ids, **kwargs)

    def _lm_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's scored bytes, and their number."""
        x, y = batch
        return nll_and_count(self(x).logits, y, IGNORE_INDEX)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        nll, count = self._lm_loss(batch)
        lm_loss = nll / count.clamp(min=1)
        coherence = self.model.coherence_loss()
        loss = lm_loss + self.config.coherence_weight * coherence
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/bpb", lm_loss / math.log(2), prog_bar=True)
        self.log("train/coherence", coherence)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        nll, count = self._lm_loss(batch)
        self.val_bpb.update(nll, count)

    def test_step(self, batch, batch_idx: int) -> None:
        nll, count = self._lm_loss(batch)
        self.test_bpb.update(nll, count)

    def _log_bpb(self, split: str, metric: BitsPerByte) -> None:
        if int(metric.byte_count) == 0 and not (torch.distributed.is_available()
                                                  and torch.distributed.is_initialized()):
            return  # e.g. the sanity check was skipped
        bpb = metric.compute()  # sums synced over processes: exact under DDP
        metric.reset()
        values = {f"{split}/bpb": bpb.float(), f"{split}/ppl_per_byte": (2.0 ** bpb).float(),
                  f"{split}/loss": (bpb * math.log(2)).float()}
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        # In a training run the curve's x is the optimizer step the model has taken (Lightning would log it one
        # lower); elsewhere (validate/test) Lightning's own logging is kept.
        self.log_dict(values, prog_bar=True, logger=not fitting)
        if fitting and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in values.items()}, step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._log_bpb("val", self.val_bpb)

    def on_test_epoch_end(self) -> None:
        self._log_bpb("test", self.test_bpb)

    def predict_step(self, request: GenerationRequest, batch_idx: int) -> list[str]:
        from .generation import generate_text

        texts = generate_text(self.model, request.prompts, sampler=request.sampler,
                              max_new_tokens=request.max_new_tokens, seed=request.seeds,
                              budget_flag="--data.predict_max_new_tokens")
        for prompt, text in zip(request.prompts, texts):
            self.print(f"=== {prompt!r}\n{prompt}{text}\n")  # rank 0 only
        return texts

    # --- the training budget -----------------------------------------------------------------------------
    def step_budget(self) -> int | None:
        """The run's optimizer steps (``max_steps``, else the epochs' worth), or None when unbounded."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        estimated = trainer.estimated_stepping_batches
        return int(estimated) if math.isfinite(estimated) else None

    def time_fraction(self) -> float:
        """Share of ``--trainer.max_time`` used so far, in [0, 1] (0 without a time budget); resumes included,
        since Lightning's Timer keeps its elapsed time in the checkpoint."""
        timer = training_timer(self.trainer)
        remaining = None if timer is None else timer.time_remaining("train")
        if remaining is None:
            return 0.0
        elapsed = timer.time_elapsed("train")
        duration = elapsed + remaining  # the Timer's budget (remaining goes negative past it)
        return min(1.0, elapsed / duration) if duration > 0 else 1.0

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.model, hp.lr, hp.weight_decay, tuple(hp.betas))
        total = self.step_budget()
        if total is None and training_timer(self.trainer) is None:
            raise ValueError("the learning-rate schedule needs a budget: pass --trainer.max_steps N, "
                             "--trainer.max_epochs N or --trainer.max_time DD:HH:MM:SS")
        warmup = min(hp.warmup_steps, max(total - 1, 0)) if total else hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio, self.time_fraction()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- exact resume: the random state travels with the checkpoint ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["qllm_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["qllm_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("qllm_rng")
        if rng is None or self._trainer is None or self.trainer.state.fn != "fit":
            return  # only a resumed fit continues the random stream (dropout); loading a model does not touch it
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def load_model(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> QLLM:
    """The bare ``QLLM`` (eval mode) from a ``qllm fit`` checkpoint, loaded with ``weights_only=True``."""
    state = torch.load(checkpoint, map_location=map_location, weights_only=True)
    config = QLLMConfig.from_dict(state["hyper_parameters"]["config"])
    model = QLLM(config)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.eval()


__all__ = ["QLLMLitModule", "build_optimizer", "load_model", "warmup_cosine"]
