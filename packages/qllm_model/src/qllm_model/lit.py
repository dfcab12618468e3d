"""QLLM as a ``LightningModule``: LM loss + coherence loss, AdamW (decay on matrices only), warmup + cosine,
bits per byte on val/test, and generation in ``predict``."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from .config import QLLMConfig
from .data import IGNORE_INDEX
from .lora import is_lora_parameter, mark_only_lora_trainable
from .metrics import BitsPerByte, nll_and_count
from .model import QLLM


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
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
                 lora_only: bool = False, init_from: str | None = None, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, compile: bool = False):
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
        # Decoding settings stay out of the saved hyper-parameters: LightningCLI re-applies a checkpoint's
        # hyper-parameters over the command line, which would pin `qllm predict` to the training-time values.
        self.generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                           "top_p": top_p, "seed": seed}
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
        self.log_dict({f"{split}/bpb": bpb.float(), f"{split}/ppl_per_byte": (2.0 ** bpb).float(),
                       f"{split}/loss": (bpb * math.log(2)).float()}, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._log_bpb("val", self.val_bpb)

    def on_test_epoch_end(self) -> None:
        self._log_bpb("test", self.test_bpb)

    def predict_step(self, batch: list[str], batch_idx: int) -> list[str]:
        from .generation import generate_text

        settings = dict(self.generation)
        seed = settings.pop("seed")
        per_batch = getattr(getattr(self.trainer, "datamodule", None), "eval_batch_size", len(batch))
        first_row = batch_idx * per_batch  # row seeds continue across batches: seed + prompt index
        texts = generate_text(self.model, batch, seed=[seed + first_row + i for i in range(len(batch))], **settings)
        for prompt, text in zip(batch, texts):
            self.print(f"=== {prompt!r}\n{prompt}{text}\n")  # rank 0 only
        return texts

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.model, hp.lr, hp.weight_decay, tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else int(self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, max(total - 1, 0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_model(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> QLLM:
    """The bare ``QLLM`` (eval mode) from a ``qllm fit`` checkpoint, loaded with ``weights_only=True``."""
    state = torch.load(checkpoint, map_location=map_location, weights_only=True)
    config = QLLMConfig.from_dict(state["hyper_parameters"]["config"])
    model = QLLM(config)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.eval()


__all__ = ["QLLMLitModule", "build_optimizer", "load_model", "warmup_cosine"]
