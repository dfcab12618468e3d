"""Answer extraction and equivalence for math tasks.

- ``extract_boxed(text)``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``).
- ``math_equal(pred, ref)``: are two LaTeX answers the same mathematical object? Decided by ``math-verify``
  (fractions vs decimals, tuples, intervals, sets, equivalent expressions, thousands separators, units).
- ``final_number(text)``: the final numeric answer of a GSM8K-style solution, normalised (``"1,000.50"`` ->
  ``"1000.5"``); ``numbers_equal(a, b)`` compares two such strings exactly.

``math-verify`` times out with ``signal.alarm``, which only works in the main thread. Outside it,
``math_equal`` sends the comparison to a helper process (``python -m qllm_evals.grading``) and kills it when
it hangs, so a pathological answer such as ``10^{10^{10}}`` can never stall a threaded caller.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces kept), else None.

    ``\\boxed 5`` (no braces, as in ``$\\boxed 5$``) gives the text up to the next ``$`` or line end. A last
    box whose braces never close (a truncated generation) gives None: the answer was never finished.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    rest = text[start:]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if not rest[:1].isspace():
            return None  # e.g. "\boxed" at the very end, or "\boxed\frac..." without a space
        content = re.split(r"[$\n]", stripped, maxsplit=1)[0].strip()
        return content or None
    open_at = start + (len(rest) - len(stripped))
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes the box
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


# Thousands separators math-verify does not read itself: a space, LaTeX's thin space "\,", "\ " and the
# braced comma "{,}" (a plain comma it handles). A number is rewritten only when its grouping is valid: one to
# three leading digits, then groups of exactly three, one separator kind throughout ("1 000" -> "1000"; "1 00",
# "12 3456" and "1,00" are left alone).
_THOUSANDS_SEPARATORS = (r"\,", "{,}", r"\ ", " ")
_GROUPED = [re.compile(r"(?<![\d.])\d{1,3}(?:" + re.escape(sep) + r"\d{3})+(?![\d])(?!" + re.escape(sep) + r"\d)")
            for sep in _THOUSANDS_SEPARATORS]


def remove_thousands_separators(answer: str) -> str:
    """``answer`` with validly grouped thousands separators removed from its numbers ("1\\,000" -> "1000")."""
    for sep, pattern in zip(_THOUSANDS_SEPARATORS, _GROUPED):
        if sep in answer:
            answer = pattern.sub(lambda m, sep=sep: m.group(0).replace(sep, ""), answer)
    return answer


def _as_latex(answer: str) -> str:
    # Wrapping in \boxed{} tells math-verify that the whole string is the answer (a bare "1,000" or
    # "\$18" would otherwise be searched for an answer-like substring).
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def _verify(pred: str, ref: str, timeout: float | None) -> bool:
    from math_verify import parse, verify

    seconds = None if timeout is None else max(1, round(timeout))
    gold = parse(_as_latex(ref), parsing_timeout=seconds)
    answer = parse(_as_latex(pred), parsing_timeout=seconds)
    if not gold or not answer:
        return False
    return bool(verify(gold, answer, timeout_seconds=seconds))  # gold first: verify is not symmetric


class _VerifierProcess:
    """A long-lived ``python -m qllm_evals.grading`` child that runs math-verify in its own main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "qllm_evals.grading"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        return self._proc

    def equal(self, pred: str, ref: str, timeout: float) -> bool:
        with self._lock:
            proc = self._start()
            proc.stdin.write(json.dumps({"pred": pred, "ref": ref, "timeout": timeout}) + "\n")
            proc.stdin.flush()
            # The child enforces `timeout` itself; the extra margin covers its start-up (importing sympy).
            ready, _, _ = select.select([proc.stdout], [], [], timeout + 30.0)
            line = proc.stdout.readline() if ready else ""
            if not line:  # hung or crashed: kill it so the next call starts a fresh one
                proc.kill()
                proc.wait()
                self._proc = None
                return False
            return bool(json.loads(line)["equal"])


_VERIFIER = _VerifierProcess()


def math_equal(pred: str | None, ref: str, *, timeout: float = 5.0) -> bool:
    """True when answer ``pred`` is mathematically the same as reference ``ref`` (both LaTeX, no ``$``).

    Equal strings are equal without parsing; otherwise math-verify decides, with the reference as gold. A
    comparison that takes longer than ``timeout`` seconds counts as not equal. Safe to call from any thread.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if pred is None or not pred.strip():
        return False
    pred, ref = remove_thousands_separators(pred.strip()), remove_thousands_separators(ref.strip())
    if pred == ref:
        return True
    if threading.current_thread() is threading.main_thread():
        return _verify(pred, ref, timeout)
    return _VERIFIER.equal(pred, ref, timeout)


# A number: optional sign (not the minus of "16-3"), digits with optional thousands commas, decimals,
# a fraction.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_MARKERS = re.compile(r"####|answer is|answer:", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical string of a number such as ``"-1,000.50"`` (-> ``"-1000.5"``) or ``"3/4"``; None if not
    one."""
    text = text.strip().replace(",", "")
    try:
        value = Fraction(text) if "/" in text else Fraction(Decimal(text))
    except (ValueError, ZeroDivisionError, InvalidOperation):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:  # a terminating decimal: print it as one
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def final_number(text: str) -> str | None:
    """The final numeric answer of a solution, normalised; None when the text has no number.

    In order: the last ``\\boxed{}``; the first number after the last ``####`` / "answer is" / "answer:";
    the last number in the text.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        numbers = _NUMBER.findall(boxed)
        if numbers:
            return normalize_number(numbers[-1])
    markers = list(_ANSWER_MARKERS.finditer(text))
    if markers:
        numbers = _NUMBER.findall(text[markers[-1].end() :])
        if numbers:
            return normalize_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(pred: str | None, ref: str) -> bool:
    """Exact equality of two numeric strings (``"18.00"`` == ``"18"``, ``"1/2"`` == ``"0.5"``)."""
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(ref)
    return a is not None and a == b


def _serve() -> None:
    """The helper-process loop behind ``math_equal`` in threads: one JSON request per line, one answer per
    line."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = _verify(request["pred"], request["ref"], request["timeout"])
        except Exception:  # a parser crash on odd input is a "not equal", never a dead helper
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
