"""Answer extraction, math equivalence (math-verify) and pass@k."""

from __future__ import annotations

import json
import random
import threading
from fractions import Fraction
from math import comb

import pytest

from qllm_evals.grading import (
    _verify,
    extract_boxed,
    final_number,
    math_equal,
    normalize_number,
    numbers_equal,
    remove_thousands_separators,
)
from qllm_evals.passk import mean_pass_at_k, pass_at_k

# ---------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{5}.", "5"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),  # nested braces intact
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces neither open nor close
        (r"$\boxed 7$ done", "7"),  # \boxed without braces
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed {12}", "12"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        ("no box here: 42", None),
        (r"truncated \boxed{\frac{1}{2", None),  # an unfinished last box is no answer
        (r"\boxedfoo{3}", None),  # another macro, not \boxed
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------- math_equal


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("0.5", r"\frac{1}{2}"),
        ("1/2", "0.5"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
        ("(x+1)^2", "x^2+2x+1"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("5.0", "5"),
        ("(3, \\pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),  # tuples with and without \left( \right)
        ("[0, 1)", "[0,1)"),  # intervals
        (r"x \in [0,1]", "[0,1]"),
        (r"\{1,2\}", "1,2"),  # a set vs a bare list
        (r"\$18", "18"),  # units and currency are dropped
        ("x=5", "5"),
        (r"\text{Evelyn}", "Evelyn"),
    ],
)
def test_math_equal_equivalent_answers(pred, ref):
    assert math_equal(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("(1,2)", "(2,1)"),  # order matters in tuples
        ("(0,1]", "[0,1)"),  # open/closed ends matter in intervals
        ("3", "4"),
        ("4.67", r"\frac{14}{3}"),  # a rounded decimal is not the fraction
        ("2x", "x"),
        (r"\frac{1}{3}", "0.33"),
        ("", "5"),
        (None, "5"),
    ],
)
def test_math_equal_rejects_different_answers(pred, ref):
    assert not math_equal(pred, ref)


def test_math_equal_times_out_instead_of_hanging():
    assert not math_equal(r"10^{10^{10}}", "5", timeout=1)


def test_math_equal_outside_the_main_thread():
    # math-verify's signal.alarm timeouts raise in threads; math_equal must route around that.
    results = {}

    def work():
        results["half"] = math_equal("0.5", r"\frac{1}{2}")
        results["wrong"] = math_equal("3", "4")
        results["hang"] = math_equal(r"10^{10^{10}}", "5", timeout=1)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results == {"half": True, "wrong": False, "hang": False}


def test_math_equal_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout"):
        math_equal("1", "1", timeout=0)


def _references_failing_the_grader(records: list[dict]) -> list[str]:
    failures = []
    for record in records:
        answer = record["answer"]
        completion = f"Let me think... so the final answer is $\\boxed{{{answer}}}$."
        # math_equal short-cuts identical strings; _verify makes math-verify really parse both sides.
        if (
            extract_boxed(completion) != answer
            or not _verify(answer, answer, timeout=5)
            or not math_equal(completion, answer)
        ):
            failures.append(answer)
    return failures


def test_every_math500_reference_equals_itself_and_its_boxed_form(shared_data):
    """All 500 reference answers, parsed by math-verify, equal themselves and their boxed form (~5 s idle)."""
    records = json.loads((shared_data / "math500" / "MATH500.json").read_text())
    assert len(records) == 500
    assert _references_failing_the_grader(records) == []


def test_math500_references_are_told_apart(shared_data):
    """Guard against a grader that says yes to everything: distinct numeric answers must not match."""
    records = json.loads((shared_data / "math500" / "MATH500.json").read_text())
    numeric = sorted({r["answer"] for r in records if r["answer"].lstrip("-").isdigit()}, key=int)
    rng = random.Random(0)
    pairs = [tuple(rng.sample(numeric, 2)) for _ in range(40)]
    assert not any(math_equal(a, b) for a, b in pairs)


# ---------------------------------------------------------------- final_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("16 - 3 - 4 = 9", "9"),  # the minus of a subtraction is not a sign
        ("The answer is -5.50 dollars. Check: 2 + 2 = 4", "-5.5"),  # the number right after "answer is"
        ("Total: 1,000 apples", "1000"),
        (r"so \boxed{\$1,250.00}", "1250"),
        ("Answer: 3/4", "0.75"),
        ("so 1/3 of the cake", "1/3"),
        ("no digits at all", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_numbers_equal_and_normalize():
    assert numbers_equal("18.00", "18")
    assert numbers_equal("1/2", "0.5")
    assert numbers_equal("2,125", "2125")
    assert not numbers_equal("18", "19")
    assert not numbers_equal(None, "1")
    assert normalize_number("abc") is None
    assert normalize_number("1/0") is None


# ---------------------------------------------------------------- pass@k


def _pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(
    "n, c, k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (5, 2, 1),
        (5, 2, 3),
        (10, 3, 5),
        (20, 1, 10),
        (200, 13, 1),
        (200, 13, 10),
        (200, 13, 100),
        (100, 0, 50),
        (100, 100, 1),
    ],
)
def test_pass_at_k_matches_combinatorics(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # only 2 wrong samples: any 3 include a correct one
    assert pass_at_k(10, 7, 3) == pytest.approx(1 - 1 / 120)  # exactly one all-wrong triple out of C(10,3)
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)  # pass@1 is the fraction correct


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not.
    value = pass_at_k(2000, 1, 1000)
    assert value == pytest.approx(0.5, abs=1e-12)
    assert 0.0 <= pass_at_k(5000, 3, 2500) <= 1.0


def test_mean_pass_at_k():
    assert mean_pass_at_k([(10, 0), (10, 10)], k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="counts"):
        mean_pass_at_k([], k=1)


@pytest.mark.parametrize(
    "n, c, k, match",
    [
        (0, 0, 1, "n must be"),
        (5, 6, 1, "c must be"),
        (5, -1, 1, "c must be"),
        (5, 2, 0, "k must be"),
        (5, 2, 6, "k must be"),
        (5.0, 2, 1, "n must be"),
    ],
)
def test_pass_at_k_rejects_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("pred, ref", [
    ("1 000", "1000"), ("1\\,000", "1000"), ("1{,}000", "1000"), ("1\\ 000", "1000"), ("1,000", "1000"),
    ("1\\,000\\,000", "1000000"), ("12 345.5", "12345.5"), ("-1 234", "-1234"), ("1000", "1 000"),
])
def test_math_equal_accepts_valid_thousands_separators(pred, ref):
    assert math_equal(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("1,00", "100"), ("1 00", "100"), ("12 3456", "123456"), ("1\\,00", "100"), ("1 000 0", "10000"),
])
def test_math_equal_refuses_invalid_grouping(pred, ref):
    assert not math_equal(pred, ref)


def test_remove_thousands_separators_leaves_other_text_alone():
    assert remove_thousands_separators("x = 12 345") == "x = 12345"
    assert remove_thousands_separators("\\frac{1}{2} 3") == "\\frac{1}{2} 3"
    assert remove_thousands_separators("(1, 2)") == "(1, 2)"
