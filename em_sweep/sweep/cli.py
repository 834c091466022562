"""``em-sweep status <sweep_dir>`` and ``em-sweep resubmit <sweep_dir>`` (their arguments: em_sweep/cli.py).

Both read the sweep's manifest and each run's own files (plus one ``squeue`` call); neither
composes configs nor polls accounting per job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from em_sweep.sweep import manifest
from em_sweep.sweep.plan import SweepError


def _sweep_dirs(text: str) -> list[Path]:
    """The sweep directory given, or every sweep directory below it (e.g. ``outputs/``)."""
    found = manifest.find_sweeps(Path(text))
    if not found:
        raise SweepError(f"no sweep under {text} (a sweep directory holds {manifest.MANIFEST}, written when a "
                         "sweep is launched with hydra/sweeper=em_sweep or hydra/launcher=slurm|local, under "
                         "hydra.sweep.dir)")
    return found


def _one_sweep_dir(text: str) -> Path:
    found = _sweep_dirs(text)
    if len(found) > 1:
        raise SweepError(f"{text} holds {len(found)} sweeps; name one: " + ", ".join(map(str, found)))
    return found[0]


def cmd_status(args: argparse.Namespace) -> int:
    """Print counts per state (and failure reasons) for each sweep under ``args.sweep_dir``."""
    try:
        sweep_dirs = _sweep_dirs(args.sweep_dir)
        live = manifest.live_slurm_tasks()  # one queue query for every sweep
        for sweep_dir in sweep_dirs:
            problems: list[str] = []
            statuses = manifest.sweep_status(sweep_dir, live=live, ask_slurm=False, problems=problems)
            print(manifest.format_status(sweep_dir, statuses, max_reasons=args.reasons, problems=problems))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_resubmit(args: argparse.Namespace) -> int:
    """Print the sweep's status, then submit again only the runs that are failed, interrupted or missing."""
    try:
        sweep_dir = _one_sweep_dir(args.sweep_dir)
        statuses = manifest.sweep_status(sweep_dir)
        print(manifest.format_status(sweep_dir, statuses, max_reasons=args.reasons))
        return _resubmit(sweep_dir, statuses, dry_run=args.dry_run)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _resubmit(sweep_dir: Path, statuses: list[manifest.RunStatus], dry_run: bool) -> int:
    from em_sweep.sweep.launcher import submit_to_slurm

    runs = [s.entry.run for s in statuses if s.state in manifest.RESUBMITTABLE]
    if not runs:
        print("nothing to resubmit")
        return 0
    settings = manifest.read_launcher_settings(sweep_dir)
    if settings.get("kind") != "slurm":
        raise SweepError(f"{sweep_dir} was not submitted to SLURM (launcher {settings.get('kind')!r}); "
                         "re-run its launch command instead: completed runs are skipped")
    if dry_run:
        print(f"dry run: would resubmit {len(runs)} runs")
        return 0
    array_ids = submit_to_slurm(sweep_dir, runs, settings)
    print(f"resubmitted {len(runs)} runs as {len(array_ids)} array(s) ({', '.join(array_ids)})")
    return 0
