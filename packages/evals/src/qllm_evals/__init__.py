"""qllm_evals: model loading, metrics, tasks and the evaluation runner behind scripts/eval.py."""

from .errors import ConfigError
from .models import DEFAULT_MODEL, chat_prompt_ids, left_pad, load_causal_lm, model_identity, resolve_device

__all__ = ["DEFAULT_MODEL", "ConfigError", "chat_prompt_ids", "left_pad", "load_causal_lm", "model_identity",
           "resolve_device"]

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)
