"""The HumanEval judge: runs a problem's (trusted) tests against a candidate that lives in another process.

Started by ``qllm_evals.tasks.humaneval.check`` as ``python -I -S <this file> REQ RESP VERDICT SECONDS``, the
problem (prompt, test, entry_point) as JSON on stdin. It executes the prompt (for its helper functions) and
the test code, and calls ``check(candidate)`` where ``candidate`` is a proxy: each call's arguments go as plain
data down REQ to the sandboxed completion, the returned value comes back up RESP and is decoded as plain data
(``qllm_evals.plain_data``) before the test's assertions see it. The verdict, one JSON object, goes to
VERDICT, a pipe only this process and the harness hold.

The completion never sees the test code, the expected values or the verdict descriptor; it can only answer
calls. So no text it prints, no exit status, hook or object it makes can produce a pass: only values that
satisfy the tests can.
"""

import json
import os
import sys
import time

if __package__:  # imported as qllm_evals.tasks.humaneval_judge (tests)
    from qllm_evals.plain_data import PlainDataError, decode, encode, read_message, write_message
else:  # run by path as the judge: the codec from its own file, not through the package (which imports torch)
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "qllm_plain_data", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plain_data.py")
    )
    _codec = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_codec)
    PlainDataError, decode, encode = _codec.PlainDataError, _codec.decode, _codec.encode
    read_message, write_message = _codec.read_message, _codec.write_message

MAX_REASON_CHARS = 200


class CandidateFailed(Exception):
    """The candidate's side ended the test: ``kind`` is exited, error, bad_value or timeout."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def make_candidate(requests: int, responses: int, deadline: float):
    """The proxy the tests call in place of the completion's function."""

    def candidate(*args, **kwargs):
        try:
            request = encode((args, kwargs))
        except PlainDataError as error:  # the tests' own arguments: a harness limitation, not the model's
            raise RuntimeError(f"test arguments are not plain data: {error}") from None
        try:
            write_message(requests, request)
            reply = read_message(responses, deadline)
        except BrokenPipeError:
            raise CandidateFailed("exited", "the completion's process ended") from None
        except TimeoutError:
            raise CandidateFailed("timeout", "no answer before the deadline") from None
        except PlainDataError as error:
            raise CandidateFailed("bad_value", f"unreadable answer ({error})") from None
        if reply is None:
            raise CandidateFailed("exited", "the completion's process ended")
        try:
            outcome = decode(reply)
        except PlainDataError as error:
            raise CandidateFailed("bad_value", f"unreadable answer ({error})") from None
        if type(outcome) is not tuple or len(outcome) != 2 or outcome[0] not in ("ok", "error", "not_plain"):
            raise CandidateFailed("bad_value", "malformed answer")
        status, value = outcome
        if status == "ok":
            return value
        message = value if type(value) is str else "(no message)"
        raise CandidateFailed("error" if status == "error" else "bad_value", message)

    return candidate


def judge(problem: dict, requests: int, responses: int, seconds: float) -> dict:
    """{"passed": bool, "kind": passed|assertion|exited|error|bad_value|timeout|test_error, "reason": str}."""
    deadline = time.monotonic() + seconds
    candidate = make_candidate(requests, responses, deadline)
    namespace = {"__name__": "__qllm_judge__"}
    try:
        exec(compile(problem["prompt"], "<prompt>", "exec"), namespace)
        namespace[problem["entry_point"]] = candidate  # tests that name the function get the candidate too
        exec(compile(problem["test"], "<test>", "exec"), namespace)
        namespace["check"](candidate)
    except CandidateFailed as failure:
        return {"passed": False, "kind": failure.kind, "reason": failure.message[:MAX_REASON_CHARS]}
    except AssertionError as error:
        message = str(error).strip()
        reason = "AssertionError" + (f": {message}" if message else "")
        return {"passed": False, "kind": "assertion", "reason": reason[:MAX_REASON_CHARS]}
    except Exception as error:  # the tests raised on the candidate's (plain) values, e.g. TypeError
        return {"passed": False, "kind": "test_error", "reason": f"{type(error).__name__}: {error}"[:MAX_REASON_CHARS]}
    return {"passed": True, "kind": "passed", "reason": "passed"}


def main(argv: list[str]) -> None:
    requests, responses, verdict_fd = (int(a) for a in argv[1:4])
    seconds = float(argv[4])
    problem = json.loads(sys.stdin.read())
    sys.stdout = sys.stderr = open(os.devnull, "w")  # the tests may print; nothing of it is used
    verdict = judge(problem, requests, responses, seconds)
    os.write(verdict_fd, json.dumps(verdict).encode())
    os.close(verdict_fd)


if __name__ == "__main__":
    main(sys.argv)
