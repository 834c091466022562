"""Executing generated code without trusting it: one separate process per program, limited.

Each program runs in a fresh process (``python -I em_sweep/evaluation/_sandbox_launcher.py``) in a scratch
directory of its own, never in the run's process. What holds, checked once per process by
:func:`isolation` and recorded with the results:

- wall-clock timeout (the parent kills the whole process group, with a PID namespace every
  process the program started, and run as root every process of the program's uid), CPU-seconds, address-space (memory) and file-size limits
  (``resource.setrlimit``, which also bounds the program's output: it is written to a file);
- run as root (as em-sweep's tests are here): the program runs as an unprivileged uid of its own
  (one per pool slot), so RLIMIT_NPROC bounds its processes (a fork bomb), and it cannot delete
  or change files it does not own: the run's files, or anything outside its scratch directory
  that is not world-writable;
- with ``unshare`` usable (root, or unprivileged user namespaces): new network and PID
  namespaces: no network at all, and ending the launcher (PID 1) ends every process in it;
  without: Python's socket functions raise, and the process group is killed;
- a minimal environment (no inherited variables: no credentials reach the program).

Not run as root, the program runs as the run's own user: the limits and the namespaces hold,
the protection of the user's files does not (the docs say so). This guards against careless or
runaway code, as HumanEval's own harness does; it is not a defence against code written to
escape (a container or VM is).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parent / "_sandbox_launcher.py"
# Sandbox uids: a block per run process (so two runs on one machine do not share process counts),
# one uid per pool slot. Above the usual ranges of real users and subordinate-id ranges.
_UID_BASE = 3_000_000_000 + (os.getpid() % 100_000) * 64


# A test program's limits by default (eval.code_timeout_s, eval.code_memory_mb and eval.code_workers are these).
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    timeout_s: float = DEFAULT_TIMEOUT_S  # wall clock, then the program and its children are killed
    memory_mb: int = DEFAULT_MEMORY_MB  # address space of each process
    max_output_bytes: int = 1 << 20  # stdout+stderr, and the size of any file it writes
    max_processes: int = 16  # processes of the program (RLIMIT_NPROC on its own uid)

    def __post_init__(self) -> None:
        for key in ("timeout_s", "memory_mb", "max_output_bytes", "max_processes"):
            if not getattr(self, key) > 0:
                raise ValueError(f"SandboxLimits.{key} must be > 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class ExecResult:
    """How one program ended: ``passed`` only when it ran to its end without an exception."""

    passed: bool
    reason: str  # "" when passed; else why it failed (exception, timeout, limit, signal)
    seconds: float
    output: str  # the first 2,000 characters of what it printed

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"


@dataclass(frozen=True)
class Isolation:
    """Which protections this machine gives (see the module docstring)."""

    network: str  # "namespace" (no network) | "sockets disabled" (Python-level only)
    pid_namespace: bool
    drop_uid: bool  # run as root: the program runs as an unprivileged uid of its own

    def describe(self) -> str:
        return (f"network: {self.network}; pid namespace: {'yes' if self.pid_namespace else 'no'}; "
                f"{'own unprivileged uid per slot' if self.drop_uid else 'runs as the current user'}")


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once whether ``unshare`` can give new network and PID namespaces here."""
    namespaces = bool(_unshare_prefix())
    return Isolation(network="namespace" if namespaces else "sockets disabled", pid_namespace=namespaces,
                     drop_uid=os.geteuid() == 0)


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The command prefix that gives new network and PID namespaces here (as root, else inside an
    unprivileged user namespace), or () when neither works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    # --kill-child: if unshare itself is killed (the timeout), PID 1 of the namespace dies too,
    # and with it every process there.
    opts = ["--net", "--pid", "--fork", "--kill-child"]
    for prefix in ([unshare, *opts], [unshare, "--user", "--map-root-user", *opts]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return tuple(prefix)
    return ()


def _signal_reason(sig: int, limits: SandboxLimits) -> str:
    if sig == signal.SIGXCPU:
        return f"CPU time limit ({_cpu_seconds(limits)} s)"
    if sig == signal.SIGXFSZ:
        return f"output/file size limit ({limits.max_output_bytes} bytes)"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"killed by {name}" if sig == signal.SIGKILL else f"crashed ({name})"


def _cpu_seconds(limits: SandboxLimits) -> int:
    return max(1, int(limits.timeout_s + 0.999))


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), slot: int = 0) -> ExecResult:
    """Execute ``source`` in a fresh sandboxed process (see the module docstring); never raises
    for anything the program does, never leaves a process or its scratch directory behind.
    ``slot`` (0..workers-1) picks the unprivileged uid when run as root: distinct per concurrent
    program."""
    iso = isolation()
    uid = _UID_BASE + slot if iso.drop_uid else None
    # Not root: RLIMIT_NPROC counts all of this user's processes, so allow the ones there are.
    nproc = limits.max_processes + (0 if iso.drop_uid else len(_processes_of(os.getuid())))
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="em-sweep-sandbox-")
    r = w = -1
    try:
        program = Path(scratch) / "program.py"
        program.write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(scratch, uid, uid)
        nonce = secrets.token_hex(16)
        r, w = os.pipe()
        settings = {"program": str(program), "result_fd": w, "memory_mb": limits.memory_mb,
                    "cpu_s": _cpu_seconds(limits), "max_file_bytes": limits.max_output_bytes,
                    "nproc": nproc, "uid": uid, "netns": iso.network == "namespace", "nonce": nonce}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as out:
            cmd = [*_unshare_prefix(), sys.executable, "-I", str(LAUNCHER),
                   json.dumps(settings)]
            proc = subprocess.Popen(cmd, cwd=scratch, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, pass_fds=(w,), start_new_session=True)
            os.close(w)
            w = -1
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
                if uid is not None:
                    _kill_uid(uid)
            seconds = time.perf_counter() - t0
            result = _read_result(r)
            out.seek(0)
            output = out.read(min(limits.max_output_bytes, 8192)).decode("utf-8", "replace")[:2000]
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
    if timed_out:
        return ExecResult(False, f"timeout: still running after {limits.timeout_s:g} s (killed)", seconds, output)
    if result is None:
        return ExecResult(False, f"sandbox launcher failed (exit {proc.returncode}): {output[-300:].strip()}",
                          seconds, output)
    report = result["report"].strip().splitlines()
    first = report[0] if report else ""
    status = int(result["wait_status"])
    if first == f"OK {nonce}" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return ExecResult(True, "", seconds, output)
    if os.WIFSIGNALED(status):
        return ExecResult(False, _signal_reason(os.WTERMSIG(status), limits), seconds, output)
    if first.startswith("ERR "):
        return ExecResult(False, first[4:], seconds, output)
    return ExecResult(False, f"exited with code {os.waitstatus_to_exitcode(status)} before the tests finished",
                      seconds, output)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int, wait_s: float = 10.0) -> None:
    """Kill every process of the slot's uid and wait until none is left, so nothing the program
    started outlives it (even one that left the process group) and the slot's process count
    starts at zero for the next program."""
    deadline = time.monotonic() + wait_s
    while (pids := _processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_result(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    try:
        return json.loads(data) if data else None
    except json.JSONDecodeError:
        return None


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = DEFAULT_WORKERS
                 ) -> list[ExecResult]:
    """:func:`run_program` over many programs, at most ``workers`` at a time; results in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(s)

    def one(source: str) -> ExecResult:
        slot = slots.get()
        try:
            return run_program(source, limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, sources))
