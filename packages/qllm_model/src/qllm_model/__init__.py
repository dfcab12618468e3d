"""QLLM: a byte-level causal LM (phase rotator, global memory tokens, LoRA) trained with PyTorch Lightning."""

from .config import QLLMConfig
from .model import QLLM, CausalSelfAttention, PhaseRotator, QLLMCache, QLLMOutput
from .tokenizer import ByteTokenizer

__all__ = ["QLLM", "QLLMConfig", "QLLMCache", "QLLMOutput", "PhaseRotator", "CausalSelfAttention",
           "ByteTokenizer"]
