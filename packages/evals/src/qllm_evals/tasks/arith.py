"""An offline arithmetic suite for CPU-sized models: exact integer answers, generated from a seed.

Levels run from one-digit sums (which SmolLM2-135M mostly gets right) to multi-step expressions with
parentheses (which it mostly does not), so sampler differences show up somewhere on the scale. Problem ``i``
of seed ``s`` depends only on (s, i): a larger ``n`` extends a run without changing its first problems.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qllm_evals.grading import extract_boxed, final_number, math_equal
from qllm_evals.tasks.base import Problem, check_common_fields


def _one_digit_sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b}", a + b


def _one_digit_difference(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    a, b = max(a, b), min(a, b)  # never negative: the easy levels stay easy
    return f"{a} - {b}", a - b


def _two_plus_one_digit(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return f"{a} + {b}", a + b


def _two_digit_sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", a + b


def _two_by_one_digit_product(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(11, 99), rng.randint(2, 9)
    return f"{a} * {b}", a * b


def _three_terms(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(1, a + b)
    return f"{a} + {b} - {c}", a + b - c


def _multi_step(rng: random.Random) -> tuple[str, int]:
    a, b, c, d = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 50)
    return f"({a} + {b}) * {c} - {d}", (a + b) * c - d


# level -> (description, generator); the order is the intended difficulty order.
LEVELS: dict[int, tuple[str, Callable[[random.Random], tuple[str, int]]]] = {
    1: ("one-digit addition", _one_digit_sum),
    2: ("one-digit subtraction", _one_digit_difference),
    3: ("two-digit plus one-digit", _two_plus_one_digit),
    4: ("two-digit addition", _two_digit_sum),
    5: ("two-digit times one-digit", _two_by_one_digit_product),
    6: ("three terms: a + b - c", _three_terms),
    7: ("multi-step: (a + b) * c - d", _multi_step),
}

# "number" is the default because SmolLM2-135M answers it tersely ("9 + 9 = 18"). Greedy, 32 new tokens, the
# same 10 one-digit sums: 9/10 right with "number", 4/10 with "boxed" (it explains at length, then errs).
PROMPTS = {
    "number": "Compute {expression}. Reply with just the number.",
    "boxed": "What is {expression}? Put your final answer within \\boxed{{}}.",
}


@dataclass
class ArithTask:
    name: str = "arith"
    max_new_tokens: int = 48
    use_chat_template: bool = True
    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    problems_per_level: int = 20  # the size of a run when load() gets n=None
    prompt_style: str = "number"  # a key of PROMPTS

    def __post_init__(self) -> None:
        check_common_fields(self)
        if isinstance(self.levels, int):
            self.levels = [self.levels]
        bad = [level for level in self.levels if level not in LEVELS]
        if not self.levels or bad:
            raise ValueError(f"levels must be a non-empty list from {sorted(LEVELS)}, got {self.levels!r}")
        if self.prompt_style not in PROMPTS:
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPTS)}, got {self.prompt_style!r}")
        if self.problems_per_level < 1:
            raise ValueError(f"problems_per_level must be >= 1, got {self.problems_per_level}")

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]:
        """``n`` problems cycling through the levels (default ``problems_per_level`` each); data_dir is
        unused."""
        if n is None:
            n = self.problems_per_level * len(self.levels)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1 (problems are generated), got {n!r}")
        problems = []
        for i in range(n):
            level = self.levels[i % len(self.levels)]
            description, generate = LEVELS[level]
            expression, value = generate(random.Random(f"qllm-arith:{seed}:{i}"))
            problems.append(
                Problem(
                    self.name,
                    f"arith/{seed}/{i}",
                    PROMPTS[self.prompt_style].format(expression=expression),
                    str(value),
                    {"level": level, "level_name": description, "expression": expression},
                )
            )
        return problems

    def grade(self, problem: Problem, completion: str) -> dict:
        pred, source = extract_boxed(completion), "boxed"
        if not (pred or "").strip():  # no box, or an empty "\boxed{}" echoed from the instruction
            pred, source = final_number(completion), "final number"
        if pred is None:
            return {"correct": False, "pred": None, "reason": "no boxed answer and no number"}
        correct = math_equal(pred, problem.reference)
        verdict = "equals" if correct else "differs from"
        return {
            "correct": correct,
            "pred": pred,
            "reason": f"{source} {pred!r} {verdict} {problem.reference}",
        }
