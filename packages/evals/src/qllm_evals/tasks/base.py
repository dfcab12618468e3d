"""The Task contract (docs/DESIGN.md, "Tasks") and the helpers every task shares: data files, subsets."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass
class Problem:
    """One evaluation item. ``prompt`` is plain text: the runner applies the chat template when the task says
    so."""

    task: str
    id: str
    prompt: str
    reference: str
    meta: dict = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str
    max_new_tokens: int  # the default generation budget for this task
    use_chat_template: bool

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]: ...

    def grade(
        self, problem: Problem, completion: str
    ) -> dict:  # {"correct": bool, "pred": str|None, "reason": str}
        ...


def default_data_dir() -> Path:
    """``$QLLM_SHARED_DATA``, else ``../shared/data`` next to the repository (or the working directory)."""
    if os.environ.get("QLLM_SHARED_DATA"):
        return Path(os.environ["QLLM_SHARED_DATA"])
    repo_root = Path(__file__).resolve().parents[5]  # packages/evals/src/qllm_evals/tasks/base.py
    candidates = [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def read_records(path: Path, required: tuple[str, ...]) -> list[tuple[str, dict]]:
    """Objects of a JSON list or a JSONL file, each with where it came from ("file:line" or "file[index]").

    A row that is not JSON, not an object, or lacks a ``required`` key raises ValueError naming file and line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, dict]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
        records = [(f"{path}[item {i}]", item) for i, item in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({error.msg})") from error
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (expected {', '.join(required)})")
        for key in required:
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: key {key!r} must be a string, got {type(record[key]).__name__}")
    return records


def subset(items: list, n: int | None, seed: int, what: str = "problems") -> list:
    """The first ``n`` items of a seeded shuffle, in their original order; all items when ``n`` is None.

    The same seed gives nested subsets (n=50 is inside n=100), so runs of different sizes stay comparable.
    """
    if n is None:
        return list(items)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(items):
        raise ValueError(f"n must be an int in [1, {len(items)}] (the number of {what} available), got {n!r}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def load_hub_rows(repo: str, split: str, config: str | None, local_path: Path) -> list[dict]:
    """Rows of a hub dataset, for when the local file is missing; FileNotFoundError naming both when
    offline."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(repo, config, split=split) if config else load_dataset(repo, split=split)
        return [dict(row) for row in dataset]
    except Exception as error:  # offline, no datasets, or the hub refused: report both places we looked
        raise FileNotFoundError(
            f"{local_path} does not exist and the hub dataset {repo!r} could not be loaded ({error}). "
            f"Offline, pass data_dir= (or set QLLM_SHARED_DATA) to the directory holding the shared data."
        ) from error


def check_common_fields(task) -> None:
    """ValueError for a generation budget that is not a positive int (shared by every task's
    __post_init__)."""
    budget = task.max_new_tokens
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {budget!r}")
