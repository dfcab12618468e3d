"""QLLM: a byte-level causal LM (phase rotator, global memory tokens, LoRA) trained with PyTorch Lightning."""

from .config import QLLMConfig
from .model import QLLM, CausalSelfAttention, PhaseRotator, QLLMCache, QLLMOutput
from .tokenizer import ByteTokenizer

__all__ = ["QLLM", "QLLMConfig", "QLLMCache", "QLLMOutput", "PhaseRotator", "CausalSelfAttention",
           "ByteTokenizer"]

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)
