"""Run untrusted Python (model-written code) in a separate process inside bubblewrap.

``run_python(code, timeout=..., memory_mb=...)`` runs ``code`` as a program and returns a ``SandboxResult``;
``start_python(...)`` starts one and leaves the talking and waiting to the caller (the HumanEval judge does).
The sandbox (docs/tasks.md, "The sandbox", states what it guarantees and what it does not):

- no privilege: a new user namespace with uid/gid 65534 inside and no right to make another
  (``--disable-userns``), every capability dropped (``--cap-drop ALL``), ``no_new_privs``;
- a seccomp filter that refuses new processes (fork, vfork, clone without CLONE_THREAD, posix_spawn), new
  namespaces, mounts, and the kernel memory that no rlimit counts (memfd, SysV shared memory and message
  queues, POSIX message queues), plus ptrace, bpf, perf_event_open, userfaultfd, io_uring and the keyring;
- a file system made only of what the interpreter needs, read-only: ``/usr`` (and the ``/bin``, ``/lib*``
  links into it), the interpreter's prefix with its site-packages hidden, ``/etc/ld.so.cache``; a read-only
  minimal ``/dev``, no ``/proc`` or ``/sys``; a private ``/tmp`` of ``tmp_mb`` (a size-capped tmpfs). Nothing
  else of the host is there: not ``/root``, ``/home``, the project, the virtual environment, ``/etc/shadow``;
- no network (a new network namespace holds only its own loopback), new PID/IPC/UTS namespaces,
  ``--die-with-parent``: nothing outlives the program;
- rlimits, hard so the program cannot raise them: address space ``memory_mb``, CPU seconds, largest file
  ``max_file_mb`` (it also caps captured output), open files, no core dumps; a wall-clock timeout.

With one process (no fork) the whole sample is bounded by ``memory_mb`` (its address space, threads
included) plus ``tmp_mb`` (its /tmp) plus at most ``MAX_OPEN_FILES`` pipe or socket buffers.

Without a working bubblewrap nothing runs unless the caller passes ``allow_unsandboxed=True`` (the eval
CLI's ``--unsafe-no-sandbox``): then the code runs in a guarded subprocess (same rlimits and timeout, a
throwaway working directory, a prelude that disables the obvious system calls) whose results say
``isolation="unsafe-none"``. That guard is not a sandbox.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

ISOLATION_BWRAP = "bwrap"
ISOLATION_UNSAFE = "unsafe-none"  # ran without a sandbox, because the caller allowed it
UNSAFE_FLAG_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or accept running model-written code with "
    "your own user's access to this machine: allow_unsandboxed=True (scripts/eval.py --unsafe-no-sandbox)"
)
REASON_MAX_CHARS = 200
MAX_OPEN_FILES = 64
SANDBOX_UID = 65534  # "nobody": unprivileged inside the sandbox's user namespace
PROGRAM_PATH = "/sandbox/program.py"  # where the program appears inside the sandbox
_OUTPUT_TAIL_BYTES = 64 * 1024


class SandboxUnavailableError(RuntimeError, ValueError):
    """bubblewrap cannot run here and the caller did not allow running untrusted code without it.

    Also a ValueError: to the eval CLI it is a setting to change (its message names --unsafe-no-sandbox), and
    the CLI reports ValueErrors raised while planning a run as one-line errors."""


def last_line(text: str, limit: int = REASON_MAX_CHARS) -> str:
    """The last non-blank line of ``text``, stripped and cut to ``limit`` characters (with "..." when cut)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ seccomp

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl). The filter is only defined for x86_64;
# elsewhere bwrap_available() is False and nothing untrusted runs unless the caller allows it unsandboxed.
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000
_SYSCALL_CLONE, _SYSCALL_CLONE3 = 56, 435
_DENIED_SYSCALLS = {
    # new processes: one process means one address space, so RLIMIT_AS bounds the sample (RLIMIT_NPROC does
    # not: the sandbox's uid maps to the harness's, and the kernel never applies it to root).
    "fork": 57, "vfork": 58,
    # namespaces and mounts (capabilities are dropped too; this keeps the kernel code out of reach)
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442,
    # memory that no rlimit counts
    "memfd_create": 319, "memfd_secret": 447, "shmget": 29, "msgget": 68, "mq_open": 240,
    # kernel attack surface no test program needs
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "keyctl": 250, "add_key": 248, "request_key": 249,
}  # fmt: skip
_EPERM, _ENOSYS = 1, 38


def seccomp_filter() -> bytes:
    """The classic-BPF seccomp program (bwrap ``--seccomp FD``): EPERM for ``_DENIED_SYSCALLS`` and for clone
    without CLONE_THREAD, ENOSYS for clone3 (so the C library falls back to clone, which can be checked),
    EPERM for x32 calls, the process killed for any other architecture, everything else allowed."""
    ld_abs, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny, enosys = 0x00050000 | _EPERM, 0x00050000 | _ENOSYS
    denied = sorted(_DENIED_SYSCALLS.values())
    # Layout: [0] load arch, [1] is x86_64?, [2] kill, [3] load nr, [4] x32?, [5..] one jeq per denied call,
    # then clone3, clone, allow; then the clone check and the shared returns.
    program: list[tuple[int, int, int, int]] = [(ld_abs, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, kill),
                                                (ld_abs, 0, 0, 0)]
    n_tests = 1 + len(denied) + 2  # x32, denied..., clone3, clone
    allow_at = 4 + n_tests  # index of "ret allow" after the tests
    clone_check = allow_at + 1  # load flags, jset thread
    ret_allow, ret_deny, ret_enosys = clone_check + 2, clone_check + 3, clone_check + 4

    def jump(kind: int, value: int, target: int) -> None:
        here = len(program)
        program.append((kind, target - here - 1, 0, value))

    jump(jge, _X32_SYSCALL_BIT, ret_deny)
    for number in denied:
        jump(jeq, number, ret_deny)
    jump(jeq, _SYSCALL_CLONE3, ret_enosys)
    jump(jeq, _SYSCALL_CLONE, clone_check)
    program.append((ret, 0, 0, allow))
    program.append((ld_abs, 0, 0, 16))  # seccomp_data.args[0], low 32 bits: clone's flags on x86_64
    here = len(program)
    program.append((jset, ret_allow - here - 1, ret_deny - here - 1, _CLONE_THREAD))
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, enosys)]
    assert len(program) == ret_enosys + 1 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in program)
    return b"".join(struct.pack("<HBBI", *instruction) for instruction in program)


# ------------------------------------------------------------------------------------------------ bwrap


@functools.lru_cache(maxsize=1)
def _bwrap_features() -> tuple[str | None, str]:
    """(bwrap's path or None, its --help text), looked up once per process."""
    path = shutil.which("bwrap")
    if path is None:
        return None, ""
    try:
        return path, subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return path, f"failed: {error}"


@functools.lru_cache(maxsize=1)
def _bwrap_problem() -> str | None:
    """None when bwrap can build our sandbox here, else why not (checked once per process, by running it)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the sandbox's seccomp filter is defined for x86_64 only, this machine is {platform.machine()}"
    path, help_text = _bwrap_features()
    if path is None:
        return "bwrap is not installed"
    missing = [flag for flag in ("--cap-drop", "--size", "--seccomp", "--ro-bind-data", "--remount-ro")
               if flag not in help_text]
    if missing:
        return f"bwrap at {path} is too old or broken (no {', '.join(missing)}; bubblewrap 0.8 has them)"
    try:
        probe = start_python("pass", "", timeout=30, memory_mb=256, stderr=subprocess.PIPE, _probe=True)
        try:
            _, stderr = probe.process.communicate(timeout=30)
        finally:
            probe.close()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap failed to start: {error}"
    if probe.process.returncode != 0:
        message = stderr.decode(errors="replace") or f"exit status {probe.process.returncode}"
        return f"bwrap cannot build the sandbox here: {last_line(message)}"
    return None


def sandbox_problem() -> str | None:
    """Why the bubblewrap sandbox cannot run on this machine, or None when it can."""
    return _bwrap_problem()


def bwrap_available() -> bool:
    """Whether ``run_python`` can use the bubblewrap sandbox on this machine."""
    return _bwrap_problem() is None


def require_sandbox(what: str, allow_unsandboxed: bool) -> str:
    """The isolation ``what`` will run under; SandboxUnavailableError (naming the way out) when bubblewrap
    cannot run here and ``allow_unsandboxed`` is False."""
    problem = _bwrap_problem()
    if problem is None:
        return ISOLATION_BWRAP
    if not allow_unsandboxed:
        raise SandboxUnavailableError(
            f"refusing to run {what} without a sandbox: {problem}. To go on, {UNSAFE_FLAG_HINT}."
        )
    return ISOLATION_UNSAFE


def _interpreter() -> str:
    """The base interpreter (not a virtual environment's link to it): the sandbox gets only its prefix."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _system_binds() -> list[str]:
    """bwrap arguments for the read-only system view: /usr, the /bin and /lib links (or directories), the
    interpreter's prefix (when it is not under /usr), the dynamic linker's cache."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.dirname(_interpreter())))
    for prefix in sorted(prefixes):
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    for path in ("/etc/ld.so.cache",):
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    # The prefix's site-packages (third-party code, possibly benchmark data): hidden; the program runs -S.
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for prefix in sorted(prefixes):
        site = os.path.join(prefix, "lib", version, "site-packages")
        if os.path.isdir(site):
            args += ["--size", "4096", "--tmpfs", site, "--remount-ro", site]
    return args


def _bwrap_args(program_fd: int, seccomp_fd: int, tmp_bytes: int, disable_userns: bool) -> list[str]:
    args = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    if disable_userns:
        args.append("--disable-userns")
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    # /tmp first, so that an interpreter installed under the host's /tmp is bound on top of it, not hidden.
    # No /proc: the sandboxed uid maps to the harness's (root's, here), and /proc/sys would let it write host-wide
    # sysctls (bwrap does not cover them in this mode). Python needs no /proc.
    args += ["--size", str(tmp_bytes), "--tmpfs", "/tmp", "--dev", "/dev", "--remount-ro", "/dev"]
    args += _system_binds()
    args += ["--ro-bind-data", str(program_fd), PROGRAM_PATH,
             "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
             "--seccomp", str(seccomp_fd)]
    return args


# ------------------------------------------------------------------------------------------------ programs

# Runs first in the sandboxed interpreter, before any untrusted code: hard rlimits (the program cannot raise
# them), then, in the unsandboxed fallback only, the guard.
_PRELUDE = """\
import resource as _r
for _k, _v in {limits!r}:
    _r.setrlimit(getattr(_r, _k), (_v, _v))
del _r, _k, _v
"""

# The unsandboxed fallback's guard: removes the obvious ways to touch the system. Not a sandbox (a program
# can undo it, e.g. with importlib.reload(os) or ctypes): it only keeps honest mistakes from doing damage.
_GUARD = """\
def _qllm_guard():
    import os, shutil, socket, subprocess
    def denied(*args, **kwargs):
        raise PermissionError("disabled by the qllm guarded subprocess (no sandbox)")
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "link", "symlink",
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

# run_python's program runner: the program as __main__, its traceback's last line on stderr.
RUN_PROGRAM = """\
import sys as _sys
_path = _sys.argv[1]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class Started:
    """A started sandboxed program: ``process`` (its Popen), ``isolation``, ``program_path`` (for argv)."""

    process: subprocess.Popen
    isolation: str
    program_path: str
    _workdir: str | None

    def kill(self) -> None:
        """SIGKILL the program and everything it started (bwrap's PID namespace, or the fallback's session)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.kill()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)


def _limits(memory_mb: int, cpu_seconds: int, max_file_mb: int) -> list[tuple[str, int]]:
    return [("RLIMIT_AS", memory_mb * 2**20), ("RLIMIT_CPU", cpu_seconds), ("RLIMIT_FSIZE", max_file_mb * 2**20),
            ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_MEMLOCK", 0),
            ("RLIMIT_MSGQUEUE", 0)]


def check_limits(timeout: float, memory_mb: int, cpu_seconds: int | None, max_file_mb: int, tmp_mb: int) -> None:
    """ValueError naming the first limit out of range."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    for name, value, low in (("memory_mb", memory_mb, 64), ("max_file_mb", max_file_mb, 1), ("tmp_mb", tmp_mb, 1),
                             ("cpu_seconds", cpu_seconds, 1)):
        if name == "cpu_seconds" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            extra = " (the interpreter alone needs tens of MB)" if name == "memory_mb" else ""
            raise ValueError(f"{name} must be an int >= {low}{extra}, got {value!r}")


def start_python(
    source: str,
    program: str,
    *,
    timeout: float,
    memory_mb: int = 2048,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    tmp_mb: int = 64,
    allow_unsandboxed: bool = False,
    args: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    stdout: int | IO = subprocess.DEVNULL,
    stderr: int | IO = subprocess.DEVNULL,
    _probe: bool = False,
) -> Started:
    """Start ``python -I -S -c <limits> + source <program path> *args`` in the sandbox, ``program`` (text) readable
    at the path in ``argv[1]``; ``pass_fds`` stay open in it at the same numbers. The caller waits, talks and
    calls ``close()``. SandboxUnavailableError when bwrap cannot run here and ``allow_unsandboxed`` is False.
    """
    check_limits(timeout, memory_mb, cpu_seconds, max_file_mb, tmp_mb)
    # The availability probe itself runs in bwrap without asking whether bwrap works.
    isolation = ISOLATION_BWRAP if _probe else require_sandbox("untrusted code", allow_unsandboxed)
    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    prelude = _PRELUDE.format(limits=_limits(memory_mb, cpu, max_file_mb))
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    if isolation == ISOLATION_BWRAP:
        bwrap, help_text = _bwrap_features()
        with tempfile.TemporaryFile() as program_file, tempfile.TemporaryFile() as seccomp_file:
            program_file.write(program.encode("utf-8"))
            seccomp_file.write(seccomp_filter())
            for handle in (program_file, seccomp_file):
                handle.flush()
                handle.seek(0)
            fds = (program_file.fileno(), seccomp_file.fileno())
            command = [bwrap, *_bwrap_args(*fds, tmp_mb * 2**20, "--disable-userns" in help_text),
                       _interpreter(), "-I", "-S", "-c", prelude + source, PROGRAM_PATH, *args]
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                                       pass_fds=(*fds, *pass_fds), start_new_session=True)
        return Started(process, isolation, PROGRAM_PATH, None)
    workdir = tempfile.mkdtemp(prefix="qllm_unsafe_")
    path = os.path.join(workdir, "program.py")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(program)
    scratch = os.path.join(workdir, "scratch")
    os.mkdir(scratch)
    command = [_interpreter(), "-I", "-S", "-c", prelude + _GUARD + source, path, *args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                               cwd=scratch, pass_fds=tuple(pass_fds), start_new_session=True)
    return Started(process, isolation, path, workdir)


# ------------------------------------------------------------------------------------------------ run_python


@dataclass
class SandboxResult:
    """What happened to one program. ``status``: ok, error, timeout, cpu_limit, memory_limit or killed.
    ``stdout``/``stderr``: the last 64 KiB of each (for tests and debugging; never stored in results)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    isolation: str  # "bwrap", or "unsafe-none" when the caller allowed running without a sandbox

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def reason(self) -> str:
        """One line (at most REASON_MAX_CHARS) for logs and per-sample results."""
        return exit_reason(self.status, self.returncode, self.stderr, self.wall_seconds)


def classify_exit(returncode: int | None, stderr: str, timed_out: bool) -> str:
    """ok, error, timeout, cpu_limit, memory_limit or killed, from how a program ended."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    # A signal shows as -N from subprocess, or as 128+N when bwrap reports its child's death.
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
    if signum == signal.SIGXCPU:
        return "cpu_limit"
    if re.search(r"^MemoryError\b", last_line(stderr, 10**6)):
        return "memory_limit"
    return "killed" if signum is not None else "error"


def exit_reason(status: str, returncode: int | None, stderr: str, wall_seconds: float) -> str:
    """The one-line reason for a program's end: the limit it hit, or the last line of its stderr."""
    if status == "ok":
        return "exited normally"
    if status == "timeout":
        return f"timed out after {wall_seconds:.1f} s (wall clock)"
    if status == "cpu_limit":
        return "killed at the CPU-time limit"
    if status == "memory_limit":
        return "memory limit exceeded (MemoryError)"
    if status == "killed":
        signum = -returncode if returncode < 0 else returncode - 128
        try:
            return f"killed by signal {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return last_line(stderr) or f"exit status {returncode}"


def _read_tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - _OUTPUT_TAIL_BYTES))
    return handle.read().decode("utf-8", errors="replace")


def run_python(
    code: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    tmp_mb: int = 64,
    allow_unsandboxed: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python program (``__main__``) in a fresh sandbox; never raises for what the code does.

    ``timeout``: wall-clock seconds. ``memory_mb``: address-space limit of its one process. ``cpu_seconds``:
    CPU-time limit (default: the timeout rounded up, plus one). ``max_file_mb``: largest file it may write,
    stdout and stderr included. ``tmp_mb``: size of its private /tmp. ``allow_unsandboxed``: where bubblewrap
    cannot run, run it anyway in the guarded subprocess (``isolation="unsafe-none"``) instead of raising
    SandboxUnavailableError.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = start_python(RUN_PROGRAM, code, timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu_seconds,
                               max_file_mb=max_file_mb, tmp_mb=tmp_mb, allow_unsandboxed=allow_unsandboxed,
                               stdout=out, stderr=err)
        start = time.monotonic()
        try:
            try:
                returncode, timed_out = started.process.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                started.kill()
                returncode, timed_out = started.process.returncode, True
        finally:
            started.close()
        wall = time.monotonic() - start
        stdout, stderr = _read_tail(out), _read_tail(err)
    status = classify_exit(returncode, stderr, timed_out)
    return SandboxResult(status, returncode, stdout, stderr, wall, started.isolation)
