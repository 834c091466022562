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
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_sweep import rundir
from em_sweep.sweep import REASONS_SHOWN
from em_sweep.sweep.plan import PlannedRun

MANIFEST = "manifest.jsonl"
CONTEXT = "launch_context.pkl"
LAUNCHER = "launcher.json"

# Run states, in the order status reports them.
DONE, RUNNING, FAILED, INTERRUPTED, PENDING, MISSING = "done", "running", "failed", "interrupted", "pending", "missing"
CORRUPT, UNREADABLE = "corrupt", "unreadable"
STATES = (DONE, RUNNING, FAILED, INTERRUPTED, PENDING, MISSING, CORRUPT, UNREADABLE)
STATE_MEANINGS = {
    DONE: "results.json written and verified (it parses and names this run)",
    RUNNING: "started, its process or task is still running",
    FAILED: "status.json says failed",
    INTERRUPTED: "started, but its process or task is gone (killed, node failure): rerun on resubmit",
    PENDING: "not started yet: its task is queued or its local launcher will start it (or, with a "
             "reason, its launcher is gone: re-launch)",
    MISSING: "never started and its task is gone: rerun on resubmit",
    CORRUPT: "results.json torn, not JSON or another run's: rerun on re-launch or resubmit (old files set aside)",
    UNREADABLE: "a file or the directory of the run cannot be read (the reason says which)",
}
# States that `resubmit` submits again.
RESUBMITTABLE = (FAILED, INTERRUPTED, MISSING, CORRUPT)
# States listed with their reasons under their count.
EXPLAINED = (FAILED, PENDING, CORRUPT, UNREADABLE)


@dataclass(frozen=True)
class ManifestEntry:
    """One submission of one run."""

    run: PlannedRun
    # submitit's job id: "<array job>_<index>", or a plain id for a one-task submission; "local" in process.
    job_id: str
    submitted_at: float
    # For a "local" run: the process that will run it (the launching process), so status can
    # tell when it is gone. None: not recorded.
    launcher_host: str | None = None
    launcher_pid: int | None = None


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
    # A local run is run by this process (em-sweep's local launcher, or Hydra's basic one).
    here = {"launcher_host": socket.gethostname(), "launcher_pid": os.getpid()}
    lines = [json.dumps({"run_id": e.run.run_id, "run_dir": e.run.run_dir, "overrides": list(e.run.overrides),
                         "model_path": e.run.model_path, "job_id": e.job_id, "submitted_at": e.submitted_at,
                         **(here if e.job_id == "local" else {})})
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


def read_manifest(sweep_dir: Path, problems: list[str] | None = None) -> dict[str, ManifestEntry]:
    """Each run's latest submission, keyed by run dir (ids repeat across runs_dirs), in first-seen order.

    A line that is not a submission record (torn, garbage, missing fields) is skipped; ``problems``
    gets ``"manifest.jsonl line N: why"`` for each."""
    entries: dict[str, ManifestEntry] = {}
    skipped: list[str] = []
    path = Path(sweep_dir) / MANIFEST
    try:
        records = rundir.numbered_jsonl(path, skipped)
    except OSError as e:
        records = []
        skipped.append(f"cannot be read ({type(e).__name__}: {e.strerror or e})")
    for number, record in records:
        try:
            run = PlannedRun(run_id=str(record["run_id"]), run_dir=str(record["run_dir"]),
                             overrides=tuple(str(o) for o in record["overrides"]),
                             model_path=str(record.get("model_path", "")))
            pid = record.get("launcher_pid")
            entry = ManifestEntry(run=run, job_id=str(record["job_id"]), submitted_at=float(record["submitted_at"]),
                                  launcher_host=record.get("launcher_host"),
                                  launcher_pid=pid if isinstance(pid, int) else None)
        except (KeyError, TypeError, ValueError) as e:
            skipped.append(f"line {number}: a record without a valid {e} ({json.dumps(record)[:80]})")
            continue
        entries[run.run_dir] = entry
    if problems is not None:
        problems.extend(f"{MANIFEST} {p}" for p in sorted(skipped, key=_line_number))
    return entries


def _line_number(problem: str) -> int:
    words = problem.split(":", 1)[0].split()
    return int(words[1]) if len(words) == 2 and words[0] == "line" and words[1].isdigit() else 0


def write_launcher_settings(sweep_dir: Path, settings: dict[str, Any]) -> None:
    rundir.write_json_atomic(sweep_dir / LAUNCHER, settings)


def read_launcher_settings(sweep_dir: Path) -> dict[str, Any]:
    """The settings a sweep was submitted with ({} when its launcher.json is absent or unreadable)."""
    settings, _ = rundir.read_json_file(Path(sweep_dir) / LAUNCHER)
    return settings if isinstance(settings, dict) else {}


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
    """Classify one run from its files; ``live`` (from :func:`live_slurm_tasks`) separates waiting
    from gone. Never raises for what a run directory holds: a file that cannot be read makes the
    run ``unreadable`` (or ``corrupt``, for its results.json) with the reason."""
    path = Path(entry.run.run_dir)
    state, why = rundir.completion(path)
    if state == rundir.COMPLETE:
        return RunStatus(entry, DONE)
    if state in (rundir.CORRUPT, rundir.UNREADABLE):
        return RunStatus(entry, CORRUPT if state == rundir.CORRUPT else UNREADABLE, why)
    launcher_gone = False
    if entry.job_id == "local":  # no queue to ask: is the launching process there?
        launcher_gone = rundir.process_alive({"host": entry.launcher_host, "pid": entry.launcher_pid}) is False
        alive = not launcher_gone
    else:
        alive = live is None or entry.job_id in live
    status, error = rundir.read_json_file(path / rundir.STATUS)
    if error is not None:
        return RunStatus(entry, UNREADABLE, error)
    if status is not None and not isinstance(status, dict):
        return RunStatus(entry, UNREADABLE, f"{rundir.STATUS}: a JSON {type(status).__name__}, not a status record")
    try:
        started = float((status or {}).get("time", 0))
    except (TypeError, ValueError):
        return RunStatus(entry, UNREADABLE, f"{rundir.STATUS}: time {status.get('time')!r} is not a number")
    if status is not None and started < entry.submitted_at and alive:
        status = None  # from an attempt before the latest submission, which has not started it yet
    recorded = (status or {}).get("state")
    if recorded == "failed":
        reason = status.get("reason") if status else None
        return RunStatus(entry, FAILED, None if reason is None else str(reason))
    if recorded in ("running", "done"):  # "done" without results.json: died while finishing
        process = rundir.process_alive(status or {})  # None: another host, which only the queue knows
        if entry.job_id == "local":
            alive = process is not False
        elif process is False:  # its task may still be queued or running, but this run's process is gone
            alive = False
        return RunStatus(entry, RUNNING if alive else INTERRUPTED)
    if launcher_gone:
        return RunStatus(entry, PENDING, f"its launcher (pid {entry.launcher_pid}) is gone: re-launch the sweep")
    return RunStatus(entry, PENDING if alive else MISSING)


def sweep_status(sweep_dir: Path, live: set[str] | None = None, ask_slurm: bool = True,
                 problems: list[str] | None = None) -> list[RunStatus]:
    """The status of every run in the sweep's manifest (one squeue call unless ``live`` is given);
    ``problems`` gets the manifest lines that could not be read."""
    entries = read_manifest(sweep_dir, problems)
    if live is None and ask_slurm and any(e.job_id != "local" for e in entries.values()):
        live = live_slurm_tasks()
    return [run_status(e, live) for e in entries.values()]


def format_status(sweep_dir: Path, statuses: Sequence[RunStatus], max_reasons: int = REASONS_SHOWN,
                  problems: Sequence[str] = ()) -> str:
    """Counts per state, and the reasons (failures, corrupt or unreadable files, gone launchers)
    with how many runs share each; then any manifest lines that could not be read."""
    counts = Counter(s.state for s in statuses)
    lines = [f"sweep {sweep_dir}: {len(statuses)} runs"]
    for state in STATES:
        if state in (CORRUPT, UNREADABLE) and not counts.get(state):
            continue  # rare states only when present
        lines.append(f"  {state:<12}{counts.get(state, 0):>7}   {STATE_MEANINGS[state]}")
        if state not in EXPLAINED or not counts.get(state):
            continue
        of_state = [s for s in statuses if s.state == state]
        default = "(no reason recorded)" if state == FAILED else None
        reasons = Counter(s.reason or default for s in of_state)
        reasons.pop(None, None)
        for reason, n in reasons.most_common(max_reasons):
            example = next(s.entry.run for s in of_state if (s.reason or default) == reason)
            lines.append(f"      {n:>6} x {reason}  (e.g. {example.run_id}: {' '.join(example.overrides)})")
        if len(reasons) > max_reasons:
            lines.append(f"      ... and {len(reasons) - max_reasons} other reasons")
    for problem in problems:
        lines.append(f"  skipped: {problem}")
    return "\n".join(lines)
