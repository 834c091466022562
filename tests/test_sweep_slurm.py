"""Sweeps on a real SLURM cluster (tests/slurm/start_cluster.sh): launch, resume, kill, pack, requeue.

Skipped with the reason when no cluster answers; with EM_SWEEP_REQUIRE_SLURM=1 (CI) they fail
instead. Every run is the shipped tiny model with tiny settings, so the module takes a few
minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from em_sweep import rundir
from em_sweep.models import resolve_model_path
from em_sweep.sweep import manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm
REQUIRE_SLURM = os.environ.get("EM_SWEEP_REQUIRE_SLURM") == "1"

# Small but real runs: two EM steps of 16 samples, an evaluation on 16 problems, short generations, no W&B.
TINY = ["train.steps=2", "train.batch_size=16", "train.micro_batch_size=16", "train.sample_batch_size=16",
        "train.max_new_tokens=24", "eval.max_new_tokens=24",
        "eval.limit=16", "logger.mode=disabled"]
# One CPU and 2 GB per task so that several tasks share the 2-core test node.
RESOURCES = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.poll_s=1",
             "hydra.launcher.timeout_min=10"]


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no `sinfo` on PATH; start a cluster with: bash tests/slurm/start_cluster.sh"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = result.stdout.split()
    if result.returncode != 0:
        return f"`sinfo` failed ({result.stderr.strip()}); start a cluster with: bash tests/slurm/start_cluster.sh"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo: {states}); start a cluster with: bash tests/slurm/start_cluster.sh"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    problem = _slurm_problem()
    if problem is not None:
        if REQUIRE_SLURM:
            pytest.fail(f"EM_SWEEP_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def launch(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "-m", "hydra/sweeper=em_sweep", "hydra/launcher=slurm", *TINY, *RESOURCES,
           f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def em_sweep_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from em_sweep.cli import main; main(sys.argv[1:])",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def states(sweep: Path) -> dict[str, str]:
    return {s.entry.run.run_id: s.state for s in manifest.sweep_status(sweep)}


def wait_until(condition, timeout_s: float, what: str, runs: tuple[Path, ...] = ()) -> None:
    """Poll ``condition``; fail at once if one of ``runs`` failed, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for run_dir in runs:
            status = rundir.read_status(run_dir) or {}
            if status.get("state") == "failed":
                raise AssertionError(f"run {run_dir.name} failed while waiting for {what}: {status.get('reason')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def _job_reason(job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    return result.stdout.strip()


def queued(job_id: str) -> bool:
    live = manifest.live_slurm_tasks()
    return live is not None and job_id in live


def test_small_multirun_completes_every_run_then_relaunch_skips_them(tmp_path):
    """2 seeds x 3 temperatures, 2 runs per task, at most 2 tasks per array (so 2 submissions)."""
    first = launch(tmp_path, "seed=0,1", "temperature=0.3,0.6,0.9", "hydra.launcher.runs_per_task=2",
                   "hydra.launcher.max_tasks_per_array=2", "hydra.launcher.wait=true")
    assert "6 runs in 3 array tasks (2 per task), 2 array(s)" in first.stdout, first.stdout
    entries = manifest.read_manifest(tmp_path / "sweep")
    assert len(entries) == 6
    assert len({e.job_id for e in entries.values()}) == 3
    for entry in entries.values():
        results = json.loads((Path(entry.run.run_dir) / rundir.RESULTS).read_text())
        assert results["run_id"] == entry.run.run_id
        assert results["final_scores"], entry.run.overrides
        assert rundir.read_status(Path(entry.run.run_dir))["state"] == "done"
    assert set(states(tmp_path / "sweep").values()) == {"done"}
    status = em_sweep_cli("status", str(tmp_path / "sweep"))
    assert status.returncode == 0 and "done              6" in status.stdout, status.stdout

    manifest_lines = (tmp_path / "sweep" / manifest.MANIFEST).read_text().count("\n")
    again = launch(tmp_path, "seed=0,1", "temperature=0.3,0.6,0.9", "hydra.launcher.runs_per_task=2")
    assert "already complete: 6" in again.stdout and "nothing to submit" in again.stdout, again.stdout
    assert (tmp_path / "sweep" / manifest.MANIFEST).read_text().count("\n") == manifest_lines


def test_run_killed_mid_way_is_not_counted_and_reruns_on_next_launch(tmp_path):
    slow = ["train.steps=60", "seed=3"]  # ~10 s of training: long enough to be caught while running
    launch(tmp_path, *slow)
    (entry,) = manifest.read_manifest(tmp_path / "sweep").values()
    run_dir = Path(entry.run.run_dir)
    wait_until(lambda: (rundir.read_status(run_dir) or {}).get("state") == "running", 180, "the run to start",
               (run_dir,))
    wait_until(lambda: (run_dir / rundir.METRICS).exists(), 120, "the first training step", (run_dir,))
    subprocess.run(["scancel", entry.job_id], check=True)
    wait_until(lambda: not queued(entry.job_id), 60, "the cancelled task to leave the queue")

    assert not rundir.is_complete(run_dir)
    assert states(tmp_path / "sweep") == {entry.run.run_id: "interrupted"}
    status = em_sweep_cli("status", str(tmp_path / "sweep"))
    assert "done              0" in status.stdout and "interrupted       1" in status.stdout, status.stdout

    relaunch = launch(tmp_path, *slow, "hydra.launcher.wait=true")
    assert "already complete: 0" in relaunch.stdout and "to run:           1 runs" in relaunch.stdout
    results = json.loads((run_dir / rundir.RESULTS).read_text())
    assert [r["step"] for r in results["loss_curve"]] == list(range(1, 61))  # a clean restart, not a resume
    assert states(tmp_path / "sweep") == {entry.run.run_id: "done"}


def test_failing_run_in_a_packed_task_leaves_its_siblings_complete_and_a_relaunch_runs_it_repaired(tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like a model directory, cannot be loaded
    result = launch(tmp_path, f"model.path=pkg://tiny-arith,{broken}", "seed=0,1",
                    "hydra.launcher.runs_per_task=4", "hydra.launcher.wait=true", check=False)
    assert result.returncode != 0 and "2 of 4 runs did not complete" in result.stderr, result.stderr
    entries = list(manifest.read_manifest(tmp_path / "sweep").values())
    assert len({e.job_id for e in entries}) == 1  # one packed task
    for entry in entries:
        path = Path(entry.run.run_dir)
        if str(broken) in " ".join(entry.run.overrides):
            assert not rundir.is_complete(path)
            status = rundir.read_status(path)
            assert status["state"] == "failed" and status["reason"], status
        else:
            assert rundir.is_complete(path), entry.run.overrides
    text = em_sweep_cli("status", str(tmp_path / "sweep")).stdout
    assert "done              2" in text and "failed            2" in text, text

    # Repair the model: its files change, so the two runs are new runs (the run id follows the
    # model's content, docs/run-identity.md); the re-launch submits exactly those two.
    shutil.copytree(resolve_model_path("pkg://tiny-arith"), broken, dirs_exist_ok=True)
    again = launch(tmp_path, f"model.path=pkg://tiny-arith,{broken}", "seed=0,1",
                   "hydra.launcher.runs_per_task=4", "hydra.launcher.wait=true")
    assert "already complete: 2" in again.stdout and "to run:           2 runs" in again.stdout, again.stdout
    sweep_dir = tmp_path / "sweep"
    latest = {e.run.run_dir: s.state for e, s in ((s.entry, s) for s in manifest.sweep_status(sweep_dir))}
    repaired = [d for d in latest if d not in {e.run.run_dir for e in entries}]
    assert len(repaired) == 2 and all(latest[d] == "done" for d in repaired)
    assert sorted(latest.values()) == ["done"] * 4 + ["failed"] * 2  # the broken model's runs did fail


def test_usr2_requeues_the_task_with_only_its_unfinished_runs(tmp_path):
    """What SLURM does before a time limit or on preemption: USR2, then submitit's checkpoint()."""
    launch(tmp_path, "seed=5,6", "train.steps=30", "hydra.launcher.runs_per_task=2")  # each run a few seconds
    entries = list(manifest.read_manifest(tmp_path / "sweep").values())
    first, second = (Path(e.run.run_dir) for e in entries)
    job_id = entries[0].job_id
    wait_until(lambda: rundir.is_complete(first) and (rundir.read_status(second) or {}).get("state") == "running",
               300, "the first run to finish and the second to start", (first, second))
    first_results = (first / rundir.RESULTS).stat().st_mtime_ns
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    # SLURM makes a requeued job eligible only 120 s later; the test cluster's admin may skip that.
    wait_until(lambda: "BeginTime" in _job_reason(job_id), 120, "the task to be requeued", (first,))
    # Interrupted, not failed (the worker corrects the core's "failed: SystemExit" as it exits).
    wait_until(lambda: (rundir.read_status(second) or {}).get("state") == "pending", 30,
               "the interrupted run to be marked pending")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)
    wait_until(lambda: rundir.is_complete(second), 300, "the requeued task to finish the second run", (first,))
    wait_until(lambda: not queued(job_id), 60, "the task to leave the queue")
    assert (first / rundir.RESULTS).stat().st_mtime_ns == first_results  # not run again
    log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.err"))
    assert "requeueing with 1 of 2 runs unfinished" in log, log[-3000:]


def test_parallel_runs_share_a_task_across_processes(tmp_path):
    """parallel_runs=2: a task's 4 runs go to 2 processes at once (2 each), every run completes."""
    result = launch(tmp_path, "seed=0,1,2,3", "hydra.launcher.runs_per_task=4", "hydra.launcher.parallel_runs=2",
                    "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4", "hydra.launcher.wait=true")
    assert "4 runs in 1 array tasks (4 per task, 2 at once)" in result.stdout, result.stdout
    entries = manifest.read_manifest(tmp_path / "sweep")
    assert len(entries) == 4 and len({e.job_id for e in entries.values()}) == 1
    statuses = [rundir.read_status(Path(e.run.run_dir)) for e in entries.values()]
    assert [s["state"] for s in statuses] == ["done"] * 4
    assert len({s["pid"] for s in statuses}) == 2  # two worker processes, two runs each


def test_parallel_runs_must_be_positive(tmp_path):
    result = launch(tmp_path, "seed=0", "hydra.launcher.parallel_runs=0", check=False)
    assert result.returncode != 0 and "hydra.launcher.parallel_runs: must be >= 1" in result.stderr
    assert not (tmp_path / "sweep" / manifest.MANIFEST).exists()


def run_state(run_dir: Path) -> str | None:
    return (rundir.read_status(run_dir) or {}).get("state")


def launch_parallel_task(tmp_path: Path) -> tuple[list[Path], str]:
    """One task of 4 runs (seeds 5-8, 30 steps each: a few seconds) in 2 processes: process 0 runs
    seeds 5 then 7, process 1 seeds 6 then 8 (run i in process i mod 2). (Run dirs, job id.)"""
    launch(tmp_path, "seed=5,6,7,8", "train.steps=30", "hydra.launcher.runs_per_task=4",
           "hydra.launcher.parallel_runs=2", "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4")
    entries = list(manifest.read_manifest(tmp_path / "sweep").values())
    return [Path(e.run.run_dir) for e in entries], entries[0].job_id


def test_usr2_requeues_a_parallel_task_with_the_runs_its_processes_had_not_finished(tmp_path):
    dirs, job_id = launch_parallel_task(tmp_path)
    wait_until(lambda: all(rundir.is_complete(d) for d in dirs[:2])
               and run_state(dirs[2]) == run_state(dirs[3]) == "running",
               300, "the first two runs to finish and the last two to start", tuple(dirs))
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: "BeginTime" in _job_reason(job_id), 120, "the task to be requeued", tuple(dirs[:2]))
    wait_until(lambda: run_state(dirs[2]) == run_state(dirs[3]) == "pending", 30,
               "both interrupted runs to be marked pending")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)
    wait_until(lambda: all(rundir.is_complete(d) for d in dirs), 300, "the requeued task to finish", tuple(dirs[:2]))
    wait_until(lambda: not queued(job_id), 60, "the task to leave the queue")
    log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.err"))
    assert "requeueing with 2 of 4 runs unfinished" in log, log[-3000:]


def test_a_parallel_worker_killed_for_memory_fails_its_run_and_the_other_process_finishes(tmp_path):
    """What an out-of-memory kill does to one process of a parallel task (SIGKILL, no cleanup): its
    run is recorded failed with the exit code, its later run is left for resubmit, and the other
    process's runs complete; the task ends (it must not hang until its time limit)."""
    import signal

    dirs, job_id = launch_parallel_task(tmp_path)
    wait_until(lambda: run_state(dirs[0]) == "running", 300, "the first run to start", (dirs[1],))
    os.kill(rundir.read_status(dirs[0])["pid"], signal.SIGKILL)  # process 0: seeds 5 then 7
    wait_until(lambda: not queued(job_id), 300, "the task to end")
    assert run_state(dirs[0]) == "failed" and "worker process died (exit code -9" in rundir.read_status(dirs[0])["reason"]
    assert not rundir.is_complete(dirs[2])  # process 0's second run never started: resubmit runs it
    assert rundir.is_complete(dirs[1]) and rundir.is_complete(dirs[3])  # process 1 finished its share


def test_an_fsdp_run_across_two_srun_tasks_takes_its_ranks_from_slurm(tmp_path):
    """`srun --ntasks=2 python launch.py ... train.parallel=fsdp` (gloo on CPU): the ranks come from
    the SLURM step (em_sweep.training.distributed.export_slurm_env, as an array task of gpus_per_task=2 gets
    them); the run completes, written once, by rank 0."""
    overrides = ["train.steps=2", "train.batch_size=8", "train.micro_batch_size=4", "train.sample_batch_size=4",
                 "train.max_new_tokens=16", "eval.max_new_tokens=16", "eval.limit=8", "logger.mode=disabled",
                 "train.parallel=fsdp", f"paths.root={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["srun", "--ntasks=2", "--cpus-per-task=1", "--mem=3G", "--kill-on-bad-exit=1",
                             sys.executable, "launch.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert rundir.is_complete(run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"stage": "em"' in line]
    assert steps == [1, 2]
    assert result.stdout.count("loss (mean token entropy at tau)") == 1
