"""MATH-500 (Lightman et al.'s 500-problem test subset of MATH), graded by math-verify on the last \\boxed{}.

Local file first (``<data_dir>/math500/MATH500.json``: a JSON list or JSONL of objects with prompt, answer,
id; ``data_dir`` defaults to ``$QLLM_SHARED_DATA``), else the hub dataset ``HuggingFaceH4/MATH-500`` (keys
problem, answer, unique_id) when online.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qllm_evals.grading import extract_boxed, math_equal
from qllm_evals.tasks.base import (
    Problem,
    check_common_fields,
    load_hub_rows,
    read_records,
    resolve_data_dir,
    subset,
)

HUB_DATASET = "HuggingFaceH4/MATH-500"

# The power-sampling paper's chain-of-thought prompt. Its code has the literal text "\\boxed{{}}" (braces
# doubled as if for .format()); the intended text, which models see here, is "\boxed{}".
PROMPT_TEMPLATE = (
    "Can you solve the following math problem? {problem} "
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)


@dataclass
class Math500Task:
    name: str = "math500"
    max_new_tokens: int = 1024
    use_chat_template: bool = True
    path: Path | None = None  # a JSON/JSONL file to use instead of <data_dir>/math500/MATH500.json
    grade_timeout: float = 5.0  # seconds math-verify may spend on one comparison

    def __post_init__(self) -> None:
        check_common_fields(self)

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]:
        if self.path:
            path = Path(self.path)
            if not path.is_file():
                raise ValueError(f"path must be an existing MATH-500 JSON/JSONL file, got {str(path)!r}")
        else:
            data_dir = resolve_data_dir(data_dir)
            path = data_dir / "math500" / "MATH500.json" if data_dir is not None else None
        if path is not None and path.is_file():
            rows = [
                (record["id"], record["prompt"], record["answer"])
                for _, record in read_records(path, ("prompt", "answer", "id"))
            ]
        else:
            rows = [
                (row["unique_id"], row["problem"], row["answer"])
                for row in load_hub_rows(HUB_DATASET, "test", None, path)
            ]
        problems = [
            Problem(self.name, pid, PROMPT_TEMPLATE.format(problem=text), answer, {"problem": text})
            for pid, text, answer in rows
        ]
        return subset(problems, n, seed)

    def grade(self, problem: Problem, completion: str) -> dict:
        pred = extract_boxed(completion)
        if not (pred or "").strip():  # an empty "\boxed{}" (the instruction echoed) is no answer either
            return {"correct": False, "pred": None, "reason": "no complete \\boxed{} answer"}
        correct = math_equal(pred, problem.reference, timeout=self.grade_timeout)
        verdict = "equals" if correct else "differs from"
        return {
            "correct": correct,
            "pred": pred,
            "reason": f"boxed {pred!r} {verdict} reference {problem.reference!r}",
        }
