"""qllm_evals: model loading, metrics, tasks and the evaluation runner behind scripts/eval.py."""

from .models import DEFAULT_MODEL, chat_prompt_ids, left_pad, load_causal_lm

__all__ = ["DEFAULT_MODEL", "chat_prompt_ids", "left_pad", "load_causal_lm"]

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)
