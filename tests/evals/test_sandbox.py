"""The untrusted-code sandbox: every escape or resource abuse fails the sample, never the harness."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from qllm_evals.sandbox import bwrap_available, run_python
from qllm_evals.tasks.humaneval import build_program, check, check_many, extract_code, load_problems

needs_bwrap = pytest.mark.skipif(
    not bwrap_available(), reason="bubblewrap cannot run here (see scripts/setup.sh)"
)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture
def outside_path():
    """A path on the host, outside /tmp (which the sandbox replaces), that the test removes afterwards."""
    path = Path.home() / f".qllm_sandbox_probe_{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def listening_port():
    """A TCP server on the host's loopback: reachable from any process on the host, but not from the
    sandbox."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


# ---------------------------------------------------------------- run_python


def test_good_program_runs():
    result = run_python("print(sum(range(10)))", timeout=30)
    assert result.ok and result.stdout.strip() == "45"
    assert result.isolation == ("bwrap" if bwrap_available() else "subprocess")


@pytest.mark.filterwarnings("ignore:SANDBOX DISABLED")
@pytest.mark.parametrize("isolation", ["auto", "subprocess"])
def test_infinite_loop_times_out(isolation):
    result = run_python("while True:\n    pass", timeout=2, isolation=isolation)
    assert result.status in ("timeout", "cpu_limit") and not result.ok
    assert result.wall_seconds < 20  # killed, not waited for


@pytest.mark.filterwarnings("ignore:SANDBOX DISABLED")
@pytest.mark.parametrize("isolation", ["auto", "subprocess"])
def test_20gb_allocation_hits_the_memory_limit(isolation):
    result = run_python(
        "x = bytearray(20 * 1024**3)\nprint('allocated')", timeout=30, memory_mb=1024, isolation=isolation
    )
    assert result.status == "memory_limit" and "allocated" not in result.stdout
    assert "memory" in result.reason


def test_runaway_output_is_capped():
    result = run_python(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", timeout=30, max_file_mb=1
    )
    assert not result.ok and "File too large" in result.reason
    assert len(result.stdout) <= 64 * 1024


def test_guarded_subprocess_warns_loudly_and_blocks_os_system(outside_path):
    with pytest.warns(RuntimeWarning, match="SANDBOX DISABLED"):
        result = run_python(
            f"import os\nos.system('touch {outside_path}')", timeout=30, isolation="subprocess"
        )
    assert result.isolation == "subprocess" and not result.ok and "PermissionError" in result.reason
    assert not outside_path.exists()


@needs_bwrap
def test_os_system_cannot_write_outside(outside_path):
    code = f"import os\nstatus = os.system('touch {outside_path}')\nassert status == 0, status"
    result = run_python(code, timeout=30, isolation="bwrap")
    assert not result.ok and "AssertionError" in result.stderr
    assert not outside_path.exists()


@needs_bwrap
def test_writing_outside_fails_with_read_only_file_system(outside_path):
    result = run_python(f"open({str(outside_path)!r}, 'w').write('x')", timeout=30, isolation="bwrap")
    assert not result.ok and "Read-only file system" in result.reason
    assert not outside_path.exists()


@needs_bwrap
def test_tmp_is_private_and_writable(tmp_path):
    # The host's pytest tmp_path lives under /tmp, which the sandbox replaces with an empty tmpfs.
    marker = tmp_path / "host_file.txt"
    marker.write_text("host")
    code = (
        f"import os\nprint(os.path.exists({str(marker)!r}))\n"
        "open('/tmp/scratch.txt', 'w').write('ok')\nprint(open('/tmp/scratch.txt').read())"
    )
    result = run_python(code, timeout=30, isolation="bwrap")
    assert result.ok and result.stdout.split() == ["False", "ok"]
    assert marker.read_text() == "host"


@needs_bwrap
def test_no_network(listening_port):
    code = (f"import socket\nsocket.create_connection(('127.0.0.1', {listening_port}), timeout=5)\n"
            "print('connected')")
    result = run_python(code, timeout=30, isolation="bwrap")
    assert not result.ok and "connected" not in result.stdout
    assert "ConnectionRefusedError" in result.reason or "unreachable" in result.reason.lower()


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            pass
    return pids


@needs_bwrap
def test_background_children_die_with_the_sandbox():
    # A child that outlives the program (double fork, new session) must not keep running on the host.
    marker = f"qllm_orphan_{uuid.uuid4().hex}"
    code = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "import time\ntime.sleep(0.5)\nprint('parent done')"
    )
    result = run_python(code, timeout=30, isolation="bwrap")
    assert result.ok and "parent done" in result.stdout
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=1)
    with pytest.raises(ValueError, match="isolation must be one of auto, bwrap, subprocess"):
        run_python("pass", isolation="docker")


# ---------------------------------------------------------------- HumanEval on top of it


def test_canonical_solutions_pass_all_164(problems):
    assert len(problems) == 164
    results = check_many([(p, p["canonical_solution"]) for p in problems.values()], timeout=30, workers=2)
    failed = [(r["task_id"], r["reason"]) for r in results if not r["passed"]]
    assert failed == []
    assert {r["isolation"] for r in results} == {"bwrap" if bwrap_available() else "subprocess"}


@pytest.mark.parametrize(
    "completion, timeout, reason",
    [
        ("    while True:\n        pass\n", 3, "timed out"),
        ("    x = bytearray(20 * 1024**3)\n    return x\n", 30, "memory"),
        ("    return []\n", 30, "AssertionError"),
        ("    return numbers[\n", 30, "SyntaxError"),
        ("    import os\n    os._exit(0)\n", 30, "exited before the tests finished"),
        ("    import sys\n    sys.exit(0)\n", 30, "exited before the tests finished"),
    ],
)
def test_bad_completions_fail_the_sample(problems, completion, timeout, reason):
    result = check(problems["HumanEval/0"], completion, timeout=timeout)
    assert result["passed"] is False and reason in result["reason"]


@needs_bwrap
def test_escape_attempt_in_a_completion_fails(problems, outside_path):
    canonical = problems["HumanEval/0"]["canonical_solution"]
    completion = f"    open({str(outside_path)!r}, 'w').write('pwned')\n" + canonical
    result = check(problems["HumanEval/0"], completion, timeout=30)
    assert not result["passed"] and "Read-only file system" in result["reason"]
    assert not outside_path.exists()


def test_chat_style_completions_pass(problems):
    """A chat model's answer (prose + a fenced whole function) is extracted and passes."""
    ids = ["HumanEval/0", "HumanEval/10", "HumanEval/38", "HumanEval/53", "HumanEval/120", "HumanEval/163"]
    items = []
    for task_id in ids:
        problem = problems[task_id]
        function = problem["prompt"][problem["prompt"].index(f"def {problem['entry_point']}") :]
        completion = (
            f"Sure! Here is the implementation:\n\n```python\n{function}{problem['canonical_solution']}"
            "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n```\n\nIt runs in linear time."
        )
        items.append((problem, completion))
    results = check_many(items, timeout=30, workers=2)
    assert [r["reason"] for r in results] == ["passed"] * len(ids)


def test_extract_code_and_build_program():
    fenced = "text\n```python\ndef f(x):\n    return x\n```\nmore\n```\nprint(1)\n```"
    assert extract_code(fenced, "f") == "def f(x):\n    return x\n"
    assert (
        extract_code("```python\ndef g():\n    return 1", "g") == "def g():\n    return 1"
    )  # unclosed fence
    assert extract_code("    return x\n", "f") == "    return x\n"
    problem = {"prompt": 'import math\n\n\ndef f(x):\n    """doc"""\n', "entry_point": "f"}
    code, program = build_program(problem, "    return x\n\n\ndef unrelated():\n    pass\n")
    assert code == "    return x\n\n"  # a base model's continuation stops at the next top-level def
    assert program == problem["prompt"] + code
    code, program = build_program(problem, "```python\ndef f(x):\n    return math.floor(x)\n```")
    assert program == "import math\n\n\ndef f(x):\n    return math.floor(x)\n"
