"""The one error type for a bad evaluation setting: it knows which argument was wrong.

Library callers see ``"data_dir: ..."``; ``scripts/eval.py`` maps ``argument`` to its own flag (``--data-dir``),
so one check serves both and the script never repeats the runner's validation.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value for ``argument`` (a keyword of ``run_eval``/``EvalConfig``/``load_causal_lm``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message
