"""Low-rank adapters (Hu et al. 2021) for fine-tuning a trained QLLM.

W x + (alpha / r) * B A x with A [r, in] Kaiming-initialised and B [out, r] zero-initialised, so an adapter
starts as an exact no-op and the fine-tune begins from the pretrained function.

``splits=S`` gives each of S equal slices of the output its own rank-r adapter (A [S*r, in], B [out, r] read as S
blocks [out/S, r]): a fused q/k/v projection with separate q, k and v adapters, as the original qllm2 had.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias`` names, so full-rank checkpoints load into it) plus an adapter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int, alpha: float,
                 dropout: float = 0.0, splits: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if splits < 1 or out_features % splits:
            raise ValueError(f"LoRA splits must be >= 1 and divide out_features={out_features}, got {splits}")
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.splits = splits
        self.lora_A = nn.Parameter(torch.empty(splits * r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A buffer rather than a bool so a checkpoint of a merged layer is not merged a second time on load.
        self.register_buffer("lora_merged", torch.tensor(False))
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        if self.splits == 1:
            return (self.lora_B @ self.lora_A) * self.scaling
        blocks_B = self.lora_B.view(self.splits, -1, self.r)  # [S, out/S, r]
        blocks_A = self.lora_A.view(self.splits, self.r, -1)  # [S, r, in]
        return (blocks_B @ blocks_A).reshape(self.out_features, self.in_features) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not bool(self.lora_merged):
            low = F.linear(self.lora_dropout(x), self.lora_A)  # [..., S*r]
            if self.splits == 1:
                update = F.linear(low, self.lora_B)
            else:  # slice s of the output reads only its own r columns of the low-rank code
                low = low.unflatten(-1, (self.splits, self.r))
                update = torch.einsum("...sr,sor->...so", low, self.lora_B.view(self.splits, -1, self.r))
                update = update.flatten(-2)
            out = out + update * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (idempotent); the forward pass then costs what a plain Linear does."""
        if not bool(self.lora_merged):
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.lora_merged.fill_(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        if bool(self.lora_merged):
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.lora_merged.fill_(False)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the merged function."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.data.copy_(self.weight.data)
        if self.bias is not None:
            linear.bias.data.copy_(self.bias.data)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, splits={self.splits}"


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name.rsplit(".", 1)[-1]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter whose own name is not a LoRA name; returns the number of trainable values.

    The original's filter also froze the MLP, the norms and the head at random init when pretraining; here
    this is only for fine-tuning a trained checkpoint, and it raises if the model has no adapters at all.
    """
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError("lora_only=True but the model has no LoRA parameters: set config.lora_r >= 1")
    return trainable


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` by the equivalent plain ``nn.Linear`` (in place)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.to_linear())
    return model
