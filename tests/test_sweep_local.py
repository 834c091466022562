"""The in-process launcher (hydra/launcher=local): packed runs, failures recorded, re-launch skips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from em_sweep import rundir
from em_sweep.sweep import manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=2", "train.batch_size=16", "train.micro_batch_size=16", "train.sample_batch_size=16",
        "train.max_new_tokens=24", "eval.max_new_tokens=24",
        "eval.limit=16", "logger.mode=disabled"]


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", "-m", "hydra/sweeper=em_sweep", "hydra/launcher=local", *TINY,
                           f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_local_sweep_runs_every_run_records_a_failure_and_relaunch_skips_done_runs(tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # passes the path check, fails to load
    overrides = [f"model.path={broken},pkg://tiny-arith", "seed=0"]

    first = launch(tmp_path, *overrides)
    assert first.returncode != 0
    assert "1 of 2 runs failed" in first.stderr and "Traceback" not in first.stderr, first.stderr
    entries = list(manifest.read_manifest(tmp_path / "sweep").values())
    assert len(entries) == 2 and {e.job_id for e in entries} == {"local"}
    # The broken model sorts first: the good run after it still ran.
    good = [e for e in entries if e.run.model_path == "pkg://tiny-arith"]
    bad = [e for e in entries if e not in good]
    assert all(rundir.is_complete(Path(e.run.run_dir)) for e in good)
    for e in bad:
        status = rundir.read_status(Path(e.run.run_dir))
        assert status["state"] == "failed" and status["reason"], status
    states = sorted(s.state for s in manifest.sweep_status(tmp_path / "sweep"))
    assert states == ["done", "failed"]

    again = launch(tmp_path, "model.path=pkg://tiny-arith", "seed=0")
    assert again.returncode == 0, again.stderr
    assert "already complete: 1" in again.stdout and "to run:           0 runs" in again.stdout, again.stdout


def test_a_sweep_lists_the_runs_another_sweep_already_finished(tmp_path):
    """Overlapping sweeps: the second one's manifest (so its status, collect and report) holds the
    shared run too, marked as already complete, not only the runs it ran itself."""
    from em_sweep.collect import collect

    first = launch(tmp_path, "seed=0", f"hydra.sweep.dir={tmp_path}/a")
    assert first.returncode == 0, first.stderr
    second = launch(tmp_path, "seed=0,1", f"hydra.sweep.dir={tmp_path}/b")
    assert second.returncode == 0, second.stderr
    assert "already complete: 1" in second.stdout
    entries = manifest.read_manifest(tmp_path / "b")
    assert sorted(e.job_id for e in entries.values()) == [manifest.ALREADY_COMPLETE, "local"]
    assert [s.state for s in manifest.sweep_status(tmp_path / "b")] == ["done", "done"]
    assert collect(tmp_path / "b", progress=False).scores["run_id"].nunique() == 2
    again = launch(tmp_path, "seed=0,1", f"hydra.sweep.dir={tmp_path}/b")  # nothing new to list
    assert again.returncode == 0 and len(manifest.read_manifest(tmp_path / "b")) == 2
