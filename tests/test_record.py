"""The W&B mirror: real offline runs (no server), spread over projects when asked."""

import pytest

from em_sweep.config import ConfigError, LoggerConfig, validate
from em_sweep.record import WandbMirror, project_for
from tests.conftest import compose_config


def test_project_shards_spread_runs_by_run_id_and_keep_each_run_in_one_project():
    ids = [f"{i:016x}" for i in range(300)]
    assert {project_for("em", r, 1) for r in ids} == {"em"}
    counts = {p: sum(project_for("em", r, 3) == p for r in ids) for p in ("em-0", "em-1", "em-2")}
    assert counts == {"em-0": 100, "em-1": 100, "em-2": 100}
    assert project_for("em", "00000000000000fe", 3) == project_for("em", "00000000000000fe", 3) == "em-2"


def test_an_offline_run_lands_in_its_shard_project(tmp_path):
    logger = LoggerConfig(mode="offline", project="grid", project_shards=3)
    mirror = WandbMirror(logger, tmp_path, "00000000000000fe", "sweep", {"seed": 1})
    try:
        assert mirror.run is not None and mirror.run.project == "grid-2"
    finally:
        mirror.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


def test_project_shards_must_be_positive():
    with pytest.raises(ConfigError, match="logger.project_shards"):
        validate(compose_config(["logger.project_shards=0"]))


def test_the_paper_grid_spreads_its_runs_over_two_projects():
    cfg = compose_config(["+experiment=paper_grid"])
    assert (cfg.logger.project, cfg.logger.project_shards) == ("paper_grid", 2)


# ---------------------------------------------------------------- W&B can never hold a run
# Each case runs in a fresh interpreter: what is bounded includes the interpreter's exit, and a hung
# W&B is remembered for the rest of a process. The script prints the service pid (if any) first, then
# the seconds each step took, writes results.json last, then exits.

_SCRIPT = r"""
import json, logging, os, signal, sys, time
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
import wandb  # noqa: F401  (imported up front: the times below are W&B calls, not the import)
from em_sweep import record
from em_sweep.config import LoggerConfig

out, mode, action, n_runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
logger = LoggerConfig(mode=mode, project="p", init_timeout_s=3.0)
times = {}
for i in range(n_runs):  # packed runs: one process, one run after the other
    t0 = time.monotonic()
    mirror = record.WandbMirror(logger, out, f"{i:016x}", "g", {"seed": i})
    times[f"init{i}"] = time.monotonic() - t0
    if i == 0:
        pids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")  # our wandb-core children
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())
                and b"wandb-core" in (p.parent / "cmdline").read_bytes()]
        print(json.dumps({"service": pids}), flush=True)
        if action == "stop":  # the service process stops answering (SIGSTOP: alive, silent)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    for step in range(2000):  # enough to fill the socket to a silent service
        mirror.log({f"m{k}": float(step) for k in range(50)}, step=step)
    times[f"log{i}"] = time.monotonic() - t0
    t0 = time.monotonic()
    mirror.finish()
    times[f"finish{i}"] = time.monotonic() - t0
    if i == 0 and action == "stop_after_finish":  # only the exit teardown is left to talk to it
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
(out / "results.json").write_text(json.dumps(times))
print(json.dumps(times), flush=True)
"""


def _kill(pids):
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _run_script(tmp_path, mode, action, n_runs, env_extra, limit_s=60):
    """(seconds the process took to exit, per-step times, stderr); the service it started is
    always killed at the end (it may be stopped)."""
    import json
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    # Not this process's service (an in-process W&B run above leaves its address in WANDB_SERVICE).
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
           "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", **env_extra}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path), mode, action, str(n_runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    service: list[int] = []
    try:
        first = proc.stdout.readline()
        service = json.loads(first)["service"] if first.startswith("{") else []
        try:
            stdout, stderr = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill(service)  # the service holds the pipes open too
            proc.kill()
            stdout, stderr = proc.communicate(timeout=30)
            pytest.fail(f"the run's process was still alive {limit_s}s later (held by W&B): {stderr[-1500:]}")
        took = time.monotonic() - t0
    finally:
        _kill(service)
    assert proc.returncode == 0, stderr[-3000:]
    assert (tmp_path / "results.json").exists()
    return took, json.loads(stdout.strip().splitlines()[-1]), stderr, service


@pytest.mark.slow
def test_a_stopped_wandb_service_cannot_hold_the_run_or_its_exit(tmp_path):
    """The real wandb service, stopped (SIGSTOP) after init: logging, finish and the interpreter's
    exit teardown (which waits for the service) each end within logger.init_timeout_s."""
    took, times, stderr, service = _run_script(tmp_path, "offline", "stop", 1, {})
    assert service, "no W&B service process was started"
    assert times["log0"] < 3.0 + 3 and times["finish0"] < 1.0  # log timed out once, then off
    assert "W&B is off for the rest of this process" in stderr
    assert took < 25, took


@pytest.mark.slow
def test_a_wandb_service_stopped_after_finish_cannot_hold_the_exit(tmp_path):
    """results.json is written; the service stops answering before the interpreter's exit
    teardown, which waits for it: the exit is bounded too."""
    took, times, stderr, service = _run_script(tmp_path, "offline", "stop_after_finish", 1, {})
    assert service and "teardown at exit did not return within 3s" in stderr
    assert took < 25, took


class FakeHungWandbService:
    """A fake W&B service (a Unix socket named in WANDB_SERVICE, as wandb connects to a service
    another process started) that accepts connections and never answers: a hung service."""

    def __init__(self, path):
        import socket
        import threading

        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(16)
        self.connections: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            while True:
                self.connections.append(self.server.accept()[0])
        except OSError:
            pass

    def env(self):
        import os

        return {"WANDB_SERVICE": f"3-{os.getpid()}-unix-{self.path}"}

    def close(self):
        for c in self.connections:
            c.close()
        self.server.close()


@pytest.mark.slow
def test_a_hung_wandb_service_costs_one_timeout_per_process_not_one_per_run(tmp_path):
    service = FakeHungWandbService(tmp_path / "wandb.sock")
    try:
        took, times, stderr, _ = _run_script(tmp_path, "offline", "none", 3, service.env())
    finally:
        service.close()
    # The first run's init is bounded (timeout + 5 s for wandb's own timeout + 1 s grace, 2 s slack)...
    assert 3.0 <= times["init0"] < 3.0 + 5 + 1 + 2
    assert times["init1"] < 0.5 and times["init2"] < 0.5  # ...and the packed runs after it skip W&B
    assert stderr.count("W&B: init did not return within") == 1 and "off in this process since" in stderr
    assert took < 30, took


@pytest.mark.slow
def test_an_unreachable_wandb_server_costs_one_timeout_and_no_wait_at_exit(tmp_path):
    """Online mode against a local socket that accepts and never answers (no network needed):
    wandb's own init timeout counts as a timeout; the exit does not wait for the server."""
    import socket
    import threading

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    held: list = []
    threading.Thread(target=lambda: [held.append(blackhole.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{blackhole.getsockname()[1]}",
           "WANDB_API_KEY": "fake-key-for-a-blackhole-server-" + "0" * 20}
    try:
        took, times, stderr, _ = _run_script(tmp_path, "online", "none", 2, env)
    finally:
        blackhole.close()
    assert times["init0"] < 3.0 + 5 + 1 + 2 and times["init1"] < 0.5
    assert "context deadline exceeded" in stderr  # it did try the server
    assert took < 30, took
