"""Run untrusted Python (model-written code) in a separate process inside bubblewrap.

``run_python(code, timeout=..., memory_mb=...)`` writes the program to a fresh directory and runs
``python -I`` on it under ``bwrap`` with

- a read-only view of the whole file system (``--ro-bind / /``): nothing outside can be changed,
- a private, empty, writable ``/tmp`` (a tmpfs that disappears with the process) as the working directory,
- no network (``--unshare-net``: only a loopback device that reaches nothing on the host), private PID/IPC/UTS
  namespaces, and ``--die-with-parent`` so a killed harness leaves no orphans,
- rlimits set by a tiny launcher before it execs the program: address space (``memory_mb``), CPU seconds,
  largest file (``max_file_mb``, also caps captured stdout/stderr), no core dumps,
- a wall-clock timeout after which the whole process group is killed.

Every failure mode (timeout, memory, crash, forbidden write) is a returned ``SandboxResult``, never an
exception
in the caller. When ``bwrap`` is missing or cannot create namespaces (e.g. unprivileged containers), the code
runs in a *guarded subprocess* instead: same rlimits, timeout and throwaway working directory, plus a prelude
that disables ``os.system``, ``subprocess``, file deletion and socket connections. That guard is not a sandbox
(a determined program can undo it), so it warns loudly every time it is chosen; pass ``isolation="bwrap"`` to
refuse to run without the real sandbox.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ISOLATIONS = ("auto", "bwrap", "subprocess")
_OUTPUT_TAIL_BYTES = 64 * 1024

# Runs first inside the sandbox: sets hard rlimits (so the program cannot raise them) and execs the program.
_LAUNCHER = """\
import os, resource, sys
memory, cpu, fsize = (int(a) for a in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.executable, [sys.executable, "-I", sys.argv[4]])
"""

# Prepended to the program only in the guarded-subprocess fallback: removes the usual ways to touch
# the system.
_GUARD = """\
def _qllm_guard():
    import os, shutil, socket, subprocess
    def denied(*args, **kwargs):
        raise PermissionError("disabled by the qllm guarded subprocess (no bubblewrap sandbox)")
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "link",
                 "symlink",
                 "putenv", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, denied)
    shutil.rmtree = shutil.move = shutil.chown = denied
    subprocess.Popen = subprocess.run = subprocess.call = denied
    subprocess.check_call = subprocess.check_output = denied
    for name in ("connect", "connect_ex", "bind", "sendto"):
        setattr(socket.socket, name, denied)
_qllm_guard()
del _qllm_guard
"""


@dataclass
class SandboxResult:
    """What happened to one program. ``status``: ok, error, timeout, cpu_limit, memory_limit or killed."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    isolation: str  # "bwrap" or "subprocess" (the weaker fallback)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def reason(self) -> str:
        """One line for logs and per-sample results."""
        if self.status == "ok":
            return "exited normally"
        if self.status == "timeout":
            return f"timed out after {self.wall_seconds:.1f} s (wall clock)"
        if self.status == "cpu_limit":
            return "killed at the CPU-time limit"
        if self.status == "memory_limit":
            return "memory limit exceeded (MemoryError)"
        if self.status == "killed":
            signum = -self.returncode if self.returncode < 0 else self.returncode - 128
            try:
                return f"killed by signal {signal.Signals(signum).name}"
            except ValueError:
                return f"killed by signal {signum}"
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"exit status {self.returncode}"


@functools.lru_cache(maxsize=1)
def _bwrap_problem() -> str | None:
    """None when bwrap can build our sandbox here, else why not (checked once per process)."""
    path = shutil.which("bwrap")
    if path is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        probe = subprocess.run([path, *_bwrap_args([]), "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap failed to start: {error}"
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.strip() or probe.returncode}"
    return None


def bwrap_available() -> bool:
    """Whether ``run_python`` can use the bubblewrap sandbox on this machine."""
    return _bwrap_problem() is None


def _bwrap_args(extra_binds: list[str]) -> list[str]:
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # The tmpfs hides everything under the host's /tmp, which may hold the interpreter (a venv made there) or
    # our program directory: bind those back after it.
    for path in extra_binds:
        args += ["--ro-bind", path, path]
    return args + ["--chdir", "/tmp", "--unshare-all", "--die-with-parent", "--new-session"]


def _paths_hidden_by_tmpfs(paths: list[str]) -> list[str]:
    hidden = {os.path.realpath(p) for p in paths}
    hidden = sorted(p for p in hidden if p == "/tmp" or p.startswith("/tmp/"))
    # A path inside another bound path needs no bind of its own.
    return [p for p in hidden if not any(p != q and p.startswith(q + os.sep) for q in hidden)]


def _read_tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - _OUTPUT_TAIL_BYTES))
    return handle.read().decode("utf-8", errors="replace")


_WARNED: set[str] = set()


def _warn_fallback(problem: str) -> None:
    message = (
        f"SANDBOX DISABLED: running untrusted code in a guarded subprocess, NOT in bubblewrap ({problem}). "
        "It has rlimits and a timeout but can read and write your files and reach the network."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    if problem not in _WARNED:  # the log gets it once per process; the warning follows the warnings filters
        _WARNED.add(problem)
        logger.warning(message)


def run_python(
    code: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    isolation: str = "auto",
) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh sandboxed process; never raises for anything the code does.

    ``timeout``: wall-clock seconds. ``memory_mb``: address-space limit. ``cpu_seconds``: CPU-time limit
    (default: the timeout rounded up, plus one). ``max_file_mb``: largest file the program may write, stdout
    and stderr included. ``isolation``: "auto" (bwrap if it works here, else the guarded subprocess, with a
    warning), "bwrap" (RuntimeError if unavailable) or "subprocess" (the guarded fallback, for machines
    without bwrap).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter alone needs tens of MB), got {memory_mb}")
    if cpu_seconds is not None and cpu_seconds < 1:
        raise ValueError(f"cpu_seconds must be >= 1, got {cpu_seconds}")
    if max_file_mb < 1:
        raise ValueError(f"max_file_mb must be >= 1, got {max_file_mb}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")

    problem = _bwrap_problem() if isolation != "subprocess" else "isolation='subprocess' was requested"
    if problem is not None and isolation == "bwrap":
        raise RuntimeError(f"isolation='bwrap' requested but unavailable: {problem}")
    use_bwrap = problem is None
    if not use_bwrap:
        _warn_fallback(problem)

    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    limits = [str(memory_mb * 2**20), str(cpu), str(max_file_mb * 2**20)]
    workdir = tempfile.mkdtemp(prefix="qllm_sandbox_")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as handle:
            handle.write(code if use_bwrap else _GUARD + code)
        launcher = [sys.executable, "-I", "-c", _LAUNCHER, *limits, program]
        if use_bwrap:
            binds = _paths_hidden_by_tmpfs(
                [
                    workdir,
                    sys.prefix,
                    sys.base_prefix,
                    sys.exec_prefix,
                    os.path.dirname(os.path.realpath(sys.executable)),
                ]
            )
            command, cwd = [shutil.which("bwrap"), *_bwrap_args(binds), *launcher], None
        else:
            scratch = os.path.join(workdir, "scratch")
            os.mkdir(scratch)
            command, cwd = launcher, scratch
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
            try:
                returncode = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                returncode, timed_out = proc.returncode, True
            wall = time.monotonic() - start
            stdout, stderr = _read_tail(out), _read_tail(err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    status = _classify(returncode, stderr, timed_out)
    return SandboxResult(status, returncode, stdout, stderr, wall, "bwrap" if use_bwrap else "subprocess")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _classify(returncode: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    # A signal shows as -N from subprocess, or as 128+N when bwrap reports its child's death.
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
    if signum == signal.SIGXCPU:
        return "cpu_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "killed" if signum is not None else "error"
