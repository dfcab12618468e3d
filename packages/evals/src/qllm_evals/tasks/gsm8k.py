"""GSM8K grade-school word problems, graded on the final number.

Local files first (``<data_dir>/gsm8k/test.jsonl`` and, for few-shot exemplars, ``train.jsonl``: JSON lines
with question and answer, the number after ``#### `` being the answer; ``data_dir`` defaults to
``$QLLM_SHARED_DATA``), else the hub dataset ``openai/gsm8k``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from qllm_evals.grading import final_number, normalize_number, numbers_equal
from qllm_evals.tasks.base import (
    Problem,
    check_common_fields,
    load_hub_rows,
    read_records,
    resolve_data_dir,
    subset,
)

HUB_DATASET = "openai/gsm8k"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. "<<16-3-4=9>>"

CHAT_INSTRUCTION = (
    "Solve the following grade-school math problem. Reason step by step, then give the final "
    "answer as a number within \\boxed{}."
)


def answer_number(solution: str, where: str) -> str:
    """The normalised number after the last ``####`` of a GSM8K solution."""
    if "####" not in solution:
        raise ValueError(f"{where}: answer has no '#### <number>' line")
    number = normalize_number(solution.rsplit("####", 1)[1])
    if number is None:
        raise ValueError(f"{where}: the text after '####' is not a number: {solution.rsplit('####', 1)[1]!r}")
    return number


def _load_split(split: str, data_dir: Path | None) -> list[tuple[str, dict]]:
    path = data_dir / "gsm8k" / f"{split}.jsonl" if data_dir is not None else None
    if path is not None and path.is_file():
        return read_records(path, ("question", "answer"))
    rows = load_hub_rows(HUB_DATASET, split, "main", path)
    return [(f"{HUB_DATASET}[{split} {i}]", row) for i, row in enumerate(rows)]


@dataclass
class GSM8KTask:
    name: str = "gsm8k"
    max_new_tokens: int = 384
    use_chat_template: bool = True
    num_shots: int = 0  # worked examples from train.jsonl placed before the question
    shot_seed: int = 1234  # which train examples; the same for every problem

    def __post_init__(self) -> None:
        check_common_fields(self)
        if (
            isinstance(self.num_shots, bool)
            or not isinstance(self.num_shots, int)
            or not 0 <= self.num_shots <= 16
        ):
            raise ValueError(f"num_shots must be an int in [0, 16], got {self.num_shots!r}")

    def _exemplars(self, data_dir: Path | None) -> str:
        if self.num_shots == 0:
            return ""
        train = _load_split("train", data_dir)
        picks = random.Random(self.shot_seed).sample(range(len(train)), self.num_shots)
        blocks = []
        for i in picks:
            where, row = train[i]
            steps = _CALCULATOR.sub("", row["answer"].rsplit("####", 1)[0]).strip()
            number = answer_number(row["answer"], where)
            final = (
                f"The answer is \\boxed{{{number}}}."
                if self.use_chat_template
                else f"The answer is {number}."
            )
            blocks.append(f"Question: {row['question'].strip()}\nAnswer: {steps}\n{final}\n\n")
        return "".join(blocks)

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]:
        data_dir = resolve_data_dir(data_dir)
        rows = _load_split("test", data_dir)
        shots = self._exemplars(data_dir)
        problems = []
        for index, (where, row) in enumerate(rows):
            question = row["question"].strip()
            if self.use_chat_template:
                prompt = f"{CHAT_INSTRUCTION}\n\n{shots}Question: {question}"
            else:  # a base model continues the exemplars' pattern (Wei et al.'s chain-of-thought format)
                prompt = f"{shots}Question: {question}\nAnswer: Let's think step by step."
            reference = answer_number(row["answer"], where)
            problems.append(
                Problem(self.name, f"gsm8k/test/{index}", prompt, reference, {"question": question})
            )
        return subset(problems, n, seed)

    def grade(self, problem: Problem, completion: str) -> dict:
        # A base model may go on to invent the next "Question:"; only its own answer counts.
        answer_part = completion.split("\nQuestion:", 1)[0]
        pred = final_number(answer_part)
        if pred is None:
            return {"correct": False, "pred": None, "reason": "no number in the completion"}
        correct = numbers_equal(pred, problem.reference)
        verdict = "equals" if correct else "differs from"
        return {
            "correct": correct,
            "pred": pred,
            "reason": f"final number {pred} {verdict} {problem.reference}",
        }
