"""Bits per byte as a torchmetrics metric.

It keeps two sums, total negative log-likelihood (nats) and number of predicted bytes, and divides only in
``compute()``; under DDP torchmetrics sums both states over processes first, so the result is the exact
corpus value however the batches were split (an average of per-batch averages would not be).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class BitsPerByte(Metric):
    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("byte_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, byte_count: torch.Tensor | int) -> None:
        """Add a batch's summed NLL in nats and the number of predictions it covers."""
        # Out of place: states reset under inference_mode are inference tensors, which refuse in-place updates.
        self.nll_sum = self.nll_sum + torch.as_tensor(nll_sum, dtype=torch.float64,
                                                      device=self.nll_sum.device).detach()
        self.byte_count = self.byte_count + torch.as_tensor(byte_count, dtype=torch.long,
                                                            device=self.byte_count.device)

    def compute(self) -> torch.Tensor:
        if int(self.byte_count) == 0:
            raise ValueError("BitsPerByte.compute(): no bytes were scored (empty validation/test split?)")
        return self.nll_sum / self.byte_count / math.log(2)


def perplexity_per_byte(bits_per_byte: torch.Tensor | float) -> torch.Tensor:
    """exp(nats per byte) = 2 ** bits per byte."""
    return torch.as_tensor(2.0, dtype=torch.float64) ** torch.as_tensor(bits_per_byte, dtype=torch.float64)


def nll_and_count(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-byte NLL (float32 softmax) and the number of scored targets."""
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()
