"""The sandbox: hostile programs end as "failed" with a reason, and never harm or hang the run."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from em_sweep.evaluation import sandbox
from em_sweep.evaluation.sandbox import SandboxLimits, isolation, run_program, run_programs

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop (files, process count) applies to root")


def _sandbox_processes() -> list[int]:
    """Live processes owned by this run's sandbox uids."""
    base = sandbox._UID_BASE
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if base <= os.stat(f"/proc/{entry}").st_uid < base + 64:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_passing_program_passes_and_its_output_is_kept() -> None:
    result = run_program("print('hello')\nassert sum([1, 2]) == 3\n")
    assert result.passed and result.status == "passed" and result.reason == ""
    assert result.output == "hello\n"


def test_a_failing_assertion_and_a_syntax_error_fail_with_their_reason() -> None:
    assert run_program("assert 1 + 1 == 3, 'arithmetic'").reason == "AssertionError: arithmetic"
    broken = run_program("def f(:\n")
    assert not broken.passed and broken.reason.startswith("sandbox setup: SyntaxError")


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    t0 = time.perf_counter()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert not result.passed and result.reason.startswith("timeout")
    assert time.perf_counter() - t0 < 10
    assert _sandbox_processes() == []


def test_a_child_that_leaves_the_process_group_is_killed_too() -> None:
    program = ("import subprocess, time\n"
               "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
               "time.sleep(300)\n")
    result = run_program(program, SandboxLimits(timeout_s=1.5))
    assert result.reason.startswith("timeout")
    if isolation().drop_uid or isolation().pid_namespace:  # else a setsid child can outlive the group kill
        assert _sandbox_processes() == []


@ROOT_ONLY
def test_fork_bomb_fails_and_leaves_no_process() -> None:
    program = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(program, SandboxLimits(timeout_s=5, max_processes=16))
    assert not result.passed
    assert "Resource temporarily unavailable" in result.reason or result.reason.startswith("timeout")
    assert _sandbox_processes() == []


@ROOT_ONLY
def test_rm_rf_outside_the_scratch_directory_leaves_the_files(tmp_path: Path) -> None:
    # A directory like a run directory: owned by the run's user, readable by everyone.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "results.json").write_text("{}")
    for p in (tmp_path, victim):
        p.chmod(0o755)
    program = (f"import os, shutil\n"
               f"os.system('rm -rf {victim}')\n"
               f"shutil.rmtree({str(victim)!r})\n")
    result = run_program(program)
    assert not result.passed and "Permission denied" in result.reason
    assert (victim / "results.json").read_text() == "{}"
    assert "Permission denied" in result.output  # rm's own complaint, captured


def test_writes_inside_the_scratch_directory_work_and_vanish() -> None:
    result = run_program("import os\nopen('note.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.passed
    scratch = Path(result.output.strip())
    assert scratch.name.startswith("em-sweep-sandbox-") and not scratch.exists()


def test_huge_allocation_fails_with_memory_error() -> None:
    result = run_program("x = bytearray(200 * 1024**3)\n", SandboxLimits(memory_mb=512))
    assert not result.passed and result.reason.startswith("MemoryError")


def test_crash_is_reported_with_its_signal() -> None:
    result = run_program("import ctypes\nctypes.string_at(0)\n")
    assert not result.passed and result.reason == "crashed (SIGSEGV)"


def test_exit_before_the_tests_finish_is_not_a_pass() -> None:
    assert run_program("import sys\nsys.exit(0)\nassert False\n").reason == "the program called exit(0)"
    early = run_program("import os\nos._exit(0)\n")
    assert not early.passed and "before the tests finished" in early.reason


def test_output_is_bounded() -> None:
    limits = SandboxLimits(max_output_bytes=10_000)
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 1000)\n", limits)
    assert not result.passed and "File too large" in result.reason
    assert len(result.output) <= 2000


def test_no_network() -> None:
    # A listening socket on this machine: reachable from the run, not from the sandbox.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    assert not result.passed and result.reason.startswith(("ConnectionRefusedError", "OSError"))


def test_the_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    result = run_program("import os\nassert 'WANDB_API_KEY' not in os.environ\n")
    assert result.passed


def test_pool_keeps_input_order_and_mixes_outcomes() -> None:
    programs = ["assert True", "assert False", "while True: pass", "print(7)"]
    results = run_programs(programs, SandboxLimits(timeout_s=1.5), workers=2)
    assert [r.passed for r in results] == [True, False, False, True]
    assert results[2].reason.startswith("timeout") and results[3].output == "7\n"


def test_the_run_is_unharmed_after_hostile_programs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("run file")
    marker.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    kill_parent = f"import os\nos.kill({os.getpid()}, 9)\n"
    result = run_program(kill_parent)
    assert not result.passed  # the parent is another uid (or another PID namespace): no signal reaches it
    assert marker.read_text() == "run file"


def test_isolation_is_described() -> None:
    iso = isolation()
    assert iso.drop_uid == (os.geteuid() == 0)
    assert iso.network in ("namespace", "sockets disabled")
    assert "network" in iso.describe()


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
