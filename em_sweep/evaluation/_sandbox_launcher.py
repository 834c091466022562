"""Runs one untrusted program for :mod:`em_sweep.evaluation.sandbox`. Standard library only: it is started
by path as ``python -I _sandbox_launcher.py <settings json>`` and imports nothing of em_sweep.

The launcher (trusted, PID 1 of the sandbox's PID namespace when there is one) forks a worker,
which sets resource limits, drops root to the slot's uid, and executes the program. The worker
reports how the program ended on a pipe; the launcher writes that report and the worker's wait
status as one JSON object to the result descriptor the parent passed, then exits (which, as PID 1,
takes every process left in the namespace with it).
"""

import json
import os
import resource
import sys

MiB = 1 << 20


def _remap_imports() -> None:
    """Keep imports working after the uid drop: the interpreter may live under a directory the
    sandbox uid cannot enter (e.g. /root/.pyenv). Each import directory is opened now, as root,
    and imported through /proc/self/fd/<n>, which needs no search permission on its parents."""
    mapping = {}
    for p in sys.path:
        if p and p not in mapping and os.path.isdir(p):
            mapping[p] = f"/proc/self/fd/{os.open(p, os.O_RDONLY | os.O_DIRECTORY)}"

    def remap(entry: str) -> str:
        for old, new in mapping.items():
            if entry == old or entry.startswith(old + "/"):
                return new + entry[len(old):]
        return entry

    sys.path[:] = [remap(p) for p in sys.path if p in mapping]
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = [remap(e) for e in path]
    sys.path_importer_cache.clear()


def _disable_sockets() -> None:
    """Without a network namespace: the program cannot create sockets through Python's socket
    module (a fallback only; native code could still reach the network)."""
    import _socket
    import socket

    def denied(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in the sandbox")

    for mod in (socket, _socket):
        for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
            if hasattr(mod, name):
                setattr(mod, name, denied)


def _worker(cfg: dict, source: str, report_fd: int) -> None:
    def report(text: str) -> None:
        try:
            os.write(report_fd, (text[:2000] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        limits = (
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_AS, cfg["memory_mb"] * MiB),
            (resource.RLIMIT_CPU, cfg["cpu_s"]),
            (resource.RLIMIT_FSIZE, cfg["max_file_bytes"]),
            (resource.RLIMIT_NOFILE, 256),
            (resource.RLIMIT_NPROC, cfg["nproc"]),
        )
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        if cfg["uid"] is not None:
            _remap_imports()
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        if not cfg["netns"]:
            _disable_sockets()
        nonce = cfg.pop("nonce")
        code = compile(source, "program.py", "exec")
    except BaseException as e:  # noqa: BLE001 - reported as the program's failure
        report(f"ERR sandbox setup: {type(e).__name__}: {e}")
        os._exit(3)
    try:
        exec(code, {"__name__": "__main__"})  # noqa: S102 - the sandbox's purpose
    except SystemExit as e:
        # exit() before the tests finished must not count as passing.
        report(f"ERR the program called exit({e.code!r})")
    except MemoryError:
        report(f"ERR MemoryError (memory limit {cfg['memory_mb']} MiB)")
    except BaseException as e:  # noqa: BLE001
        report(f"ERR {type(e).__name__}" + (f": {e}" if str(e) else ""))
    else:
        report(f"OK {nonce}")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - the output limit may refuse the flush
            pass
    os._exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result_fd = cfg.pop("result_fd")
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(result_fd)
        _worker(cfg, source, w)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    # Read what the worker reported; non-blocking: a process the program forked may still hold w.
    os.set_blocking(r, False)
    chunks = []
    try:
        while len(chunks) < 16:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    result = {"wait_status": status, "report": b"".join(chunks).decode("utf-8", "replace")}
    os.write(result_fd, json.dumps(result).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
