"""Evaluation tasks: each turns a dataset into Problems (plain-text prompts) and grades completions.

``get_task("math500", max_new_tokens=2048)`` builds a task; options are the task dataclass's fields.
"""

from __future__ import annotations

import dataclasses

from qllm_evals.tasks.arith import ArithTask
from qllm_evals.tasks.base import Problem, Task, default_data_dir
from qllm_evals.tasks.gsm8k import GSM8KTask
from qllm_evals.tasks.humaneval import HumanEvalTask
from qllm_evals.tasks.math500 import Math500Task

TASKS: dict[str, type] = {
    "arith": ArithTask,
    "gsm8k": GSM8KTask,
    "math500": Math500Task,
    "humaneval": HumanEvalTask,
}


def get_task(name: str, **options) -> Task:
    """The task called ``name``, built with ``options`` (fields of its dataclass, e.g. max_new_tokens)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {name!r}; valid options: {', '.join(valid)}"
        )
    return cls(**options)


__all__ = [
    "TASKS",
    "ArithTask",
    "GSM8KTask",
    "HumanEvalTask",
    "Math500Task",
    "Problem",
    "Task",
    "default_data_dir",
    "get_task",
]
