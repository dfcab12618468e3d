"""The Task contract (docs/DESIGN.md, "Tasks") and the helpers every task shares: data files, subsets."""

from __future__ import annotations

import gzip
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


DATA_DIR_ENV = "QLLM_SHARED_DATA"


def default_data_dir() -> Path | None:
    """``$QLLM_SHARED_DATA`` when set, else None: the library does not guess where the data lives (scripts
    pass ``--data-dir``)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def resolve_data_dir(data_dir: Path | str | None, label: str = "data_dir (--data-dir)") -> Path | None:
    """``data_dir`` as a Path, else ``$QLLM_SHARED_DATA``, else None (then only the hub can help). ValueError
    naming ``label`` when an explicit directory does not exist."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir)
    if not path.is_dir():
        raise ValueError(f"{label} must be an existing directory holding the shared data, got {str(path)!r}")
    return path


def _read_text(path: Path) -> str:
    """The file's text (gzip-decompressed for ``.gz``); ValueError naming the file and line for bad UTF-8."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:  # not gzip, or cut short
            raise ValueError(f"{path}: not a complete gzip file ({error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[error.start]:#04x} at offset {error.start})"
        ) from None


def read_records(path: Path, required: tuple[str, ...]) -> list[tuple[str, dict]]:
    """Objects of a JSON list or a JSONL file (``.gz`` too), each with where it came from ("file:line" or
    "file[item i]").

    An empty file, bad UTF-8, a row that is not JSON, not an object, or lacks a ``required`` string key raises
    ValueError naming file and line.
    """
    path = Path(path)
    text = _read_text(path)
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
    if not records:
        raise ValueError(f"{path}: no records (the file is empty); expected objects with {', '.join(required)}")
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


def load_hub_rows(repo: str, split: str, config: str | None, local_path: Path | None) -> list[dict]:
    """Rows of a hub dataset, for when the local file is missing (``local_path``, None when no data directory
    was given). A missing ``datasets`` package raises ImportError; a hub that cannot be reached (offline)
    raises FileNotFoundError naming both places looked."""
    local = (f"{local_path} does not exist" if local_path is not None
             else f"no data directory was given (data_dir / --data-dir, or ${DATA_DIR_ENV})")
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"{local}, and loading {repo!r} from the hub needs the datasets package "
            f"(pip install datasets); or pass data_dir (--data-dir) / set {DATA_DIR_ENV} to the shared data"
        ) from error
    try:
        dataset = load_dataset(repo, config, split=split) if config else load_dataset(repo, split=split)
    except (OSError, ConnectionError) as error:  # offline, or the hub refused (datasets raises these kinds)
        raise FileNotFoundError(
            f"{local} and the hub dataset {repo!r} could not be loaded ({error}). "
            f"Offline, pass data_dir (--data-dir) or set {DATA_DIR_ENV} to the directory holding the shared data."
        ) from error
    return [dict(row) for row in dataset]


def check_common_fields(task) -> None:
    """ValueError for a generation budget that is not a positive int (shared by every task's
    __post_init__)."""
    budget = task.max_new_tokens
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {budget!r}")
