"""A sweep directory's files, and the status of every run read from the run directories.

Files under the sweep directory (``hydra.sweep.dir``):
- ``manifest.jsonl``: one line per submitted run (run id, run dir, overrides, SLURM job id of
  its array task, submission time), appended by every submission; a run's last line wins.
  Runs of the sweep that were already complete when it was launched (finished by another sweep
  or a single run) are listed too, with job id ``complete``.
- ``launch_context.pkl``: what a worker needs to compose any run of the sweep (written once).
- ``launcher.json``: the submission settings, so ``em-sweep resubmit`` submits the same way.
- ``.submitit/<job>/``: submitit's pickles and each task's stdout/stderr.

A run's state comes from its own files (``results.json``, ``status.json``), never from
per-job accounting queries; one ``squeue`` call tells which tasks are still queued or running,
so a run whose task died mid-way is reported as interrupted rather than running.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_sweep import rundir
from em_sweep.sweep.plan import PlannedRun

MANIFEST = "manifest.jsonl"
CONTEXT = "launch_context.pkl"
LAUNCHER = "launcher.json"

# Run states, in the order status reports them.
DONE, RUNNING, FAILED, INTERRUPTED, PENDING, MISSING = "done", "running", "failed", "interrupted", "pending", "missing"
STATES = (DONE, RUNNING, FAILED, INTERRUPTED, PENDING, MISSING)
STATE_MEANINGS = {
    DONE: "results.json written",
    RUNNING: "started, its task is still running",
    FAILED: "status.json says failed",
    INTERRUPTED: "started, but its task is gone (killed, node failure): rerun on resubmit",
    PENDING: "not started yet, its task is queued",
    MISSING: "never started and its task is gone: rerun on resubmit",
}
# States that `resubmit` submits again.
RESUBMITTABLE = (FAILED, INTERRUPTED, MISSING)


@dataclass(frozen=True)
class ManifestEntry:
    """One submission of one run."""

    run: PlannedRun
    # submitit's job id: "<array job>_<index>", or a plain id for a one-task submission; "local" in process.
    job_id: str
    submitted_at: float


@dataclass(frozen=True)
class RunStatus:
    entry: ManifestEntry
    state: str
    reason: str | None = None


def find_sweeps(path: Path, max_depth: int = 5) -> list[Path]:
    """Sweep directories at or below ``path`` (those holding a manifest), not looking inside run dirs."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    found = []
    base_depth = len(path.parts)
    for root, dirs, files in os.walk(path):
        if MANIFEST in files:
            found.append(Path(root))
            dirs.clear()  # a sweep dir holds no other sweep
            continue
        # Run directories and submitit folders hold thousands of entries and never a manifest.
        dirs[:] = [d for d in dirs if d not in ("runs", ".submitit") and len(Path(root).parts) - base_depth < max_depth]
    return sorted(found)


def append_manifest(sweep_dir: Path, entries: Iterable[ManifestEntry]) -> None:
    """Append entries and fsync: a submission is recorded before the next chunk is submitted."""
    lines = [json.dumps({"run_id": e.run.run_id, "run_dir": e.run.run_dir, "overrides": list(e.run.overrides),
                         "model_path": e.run.model_path, "job_id": e.job_id, "submitted_at": e.submitted_at})
             for e in entries]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / MANIFEST, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


# job_id of a run that was already complete (finished by another sweep or a single run) when a
# launch planned it: listed so this sweep's status, collect and report include it.
ALREADY_COMPLETE = "complete"


def append_already_complete(sweep_dir: Path, runs: Iterable[PlannedRun], complete: Iterable[str]) -> int:
    """List the ``complete`` runs of ``runs`` the manifest does not list yet; returns how many.
    A run this sweep planned belongs to it even if another sweep (or a single run) finished it."""
    done = set(complete)
    listed = set(read_manifest(sweep_dir)) if (Path(sweep_dir) / MANIFEST).exists() else set()
    new = [r for r in runs if r.run_id in done and r.run_dir not in listed]
    if new:
        now = time.time()
        append_manifest(Path(sweep_dir), (ManifestEntry(r, ALREADY_COMPLETE, now) for r in new))
    return len(new)


def read_manifest(sweep_dir: Path) -> dict[str, ManifestEntry]:
    """Each run's latest submission, keyed by run dir (ids repeat across runs_dirs), in first-seen order."""
    entries: dict[str, ManifestEntry] = {}
    for record in rundir.read_jsonl(Path(sweep_dir) / MANIFEST):
        run = PlannedRun(run_id=record["run_id"], run_dir=record["run_dir"], overrides=tuple(record["overrides"]),
                         model_path=record.get("model_path", ""))
        entries[run.run_dir] = ManifestEntry(run=run, job_id=str(record["job_id"]),
                                             submitted_at=float(record["submitted_at"]))
    return entries


def write_launcher_settings(sweep_dir: Path, settings: dict[str, Any]) -> None:
    rundir.write_json_atomic(sweep_dir / LAUNCHER, settings)


def read_launcher_settings(sweep_dir: Path) -> dict[str, Any]:
    return json.loads((Path(sweep_dir) / LAUNCHER).read_text())


def live_slurm_tasks() -> set[str] | None:
    """Ids (``123_4`` / ``124``) of this user's queued or running SLURM tasks; None when SLURM cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


def run_status(entry: ManifestEntry, live: set[str] | None) -> RunStatus:
    """Classify one run from its files; ``live`` (from :func:`live_slurm_tasks`) separates waiting from gone."""
    path = Path(entry.run.run_dir)
    if rundir.is_complete(path):
        return RunStatus(entry, DONE)
    alive = live is None or entry.job_id in live or entry.job_id == "local"
    status = rundir.read_status(path)
    if status is not None and float(status.get("time", 0)) < entry.submitted_at and alive:
        status = None  # from an attempt before the latest submission, which has not started it yet
    state = (status or {}).get("state")
    if state == "failed":
        return RunStatus(entry, FAILED, status.get("reason") if status else None)
    if state in ("running", "done"):  # "done" without results.json: died while finishing
        if entry.job_id == "local" and status is not None:  # no queue to ask: is its process there?
            alive = rundir.process_alive(status) is not False
        return RunStatus(entry, RUNNING if alive else INTERRUPTED)
    return RunStatus(entry, PENDING if alive else MISSING)


def sweep_status(sweep_dir: Path, live: set[str] | None = None, ask_slurm: bool = True) -> list[RunStatus]:
    """The status of every run in the sweep's manifest (one squeue call unless ``live`` is given)."""
    entries = read_manifest(sweep_dir)
    if live is None and ask_slurm and any(e.job_id != "local" for e in entries.values()):
        live = live_slurm_tasks()
    return [run_status(e, live) for e in entries.values()]


def format_status(sweep_dir: Path, statuses: Sequence[RunStatus], max_reasons: int = 10) -> str:
    """Counts per state, and the failure reasons with how many runs share each."""
    counts = Counter(s.state for s in statuses)
    lines = [f"sweep {sweep_dir}: {len(statuses)} runs"]
    for state in STATES:
        lines.append(f"  {state:<12}{counts.get(state, 0):>7}   {STATE_MEANINGS[state]}")
        if state == FAILED and counts.get(FAILED):
            reasons = Counter(s.reason or "(no reason recorded)" for s in statuses if s.state == FAILED)
            for reason, n in reasons.most_common(max_reasons):
                example = next(s.entry.run for s in statuses if s.state == FAILED and (s.reason or "(no reason recorded)") == reason)
                lines.append(f"      {n:>6} x {reason}  (e.g. {example.run_id}: {' '.join(example.overrides)})")
            if len(reasons) > max_reasons:
                lines.append(f"      ... and {len(reasons) - max_reasons} other reasons")
    return "\n".join(lines)
