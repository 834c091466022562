"""status, collect and report on a sweep with broken files and a killed launcher: every run reported, none crashes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from em_sweep import rundir
from em_sweep.sweep import manifest
from em_sweep.sweep.plan import PlannedRun

ROOT = Path(__file__).resolve().parents[1]


def _entry(tmp_path: Path, name: str, job_id: str = "7_0") -> manifest.ManifestEntry:
    return manifest.ManifestEntry(PlannedRun(name, str(tmp_path / "runs" / name), (f"seed={name}",), "m"), job_id, 1.0)


def _broken_sweep(tmp_path: Path) -> Path:
    """A sweep whose runs each hold one malformed file (and a good one), plus bad manifest lines."""
    sweep = tmp_path / "sweep"
    runs = tmp_path / "runs"
    files: dict[str, dict[str, str | bytes | None]] = {
        "good": {rundir.RESULTS: json.dumps({"run_id": "good", "seconds": 1.0, "config": {"seed": 1},
                                              "scores": [{"benchmark": "arith", "step": 0, "temperature": 0.0,
                                                          "accuracy": 0.5}]})},
        "torn_results": {rundir.RESULTS: '{"run_id": "torn_results", "sco'},
        "other_results": {rundir.RESULTS: json.dumps({"run_id": "somebody_else"})},
        "results_is_dir": {rundir.RESULTS: None},
        "bad_scores": {rundir.RESULTS: json.dumps({"run_id": "bad_scores", "scores": "not a list"})},
        "binary_status": {rundir.STATUS: b"\x00\xff\xfe garbage"},
        "list_status": {rundir.STATUS: "[1, 2]"},
        "bad_time": {rundir.STATUS: json.dumps({"state": "running", "time": "yesterday"})},
        "bad_config": {rundir.STATUS: json.dumps({"state": "failed", "time": 2.0, "reason": "x"}),
                       rundir.CONFIG: "model: [unclosed"},
        "garbage_metrics": {rundir.STATUS: json.dumps({"state": "failed", "time": 2.0, "reason": "boom"}),
                            rundir.METRICS: b"\x00\x01 not json\n{\"kind\": "},
    }
    for name, contents in files.items():
        (runs / name).mkdir(parents=True)
        for filename, content in contents.items():
            target = runs / name / filename
            if content is None:
                target.mkdir()
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    manifest.append_manifest(sweep, [_entry(tmp_path, name) for name in files])
    with open(sweep / manifest.MANIFEST, "ab") as f:
        f.write(b"\xff\xfe not json\n")
        f.write(json.dumps({"run_id": "no_dir", "job_id": "7_9"}).encode() + b"\n")
        f.write(b'{"run_id": "torn", "run_d')  # a torn last line
    return sweep


EXPECTED = {
    "good": manifest.DONE, "torn_results": manifest.CORRUPT, "other_results": manifest.CORRUPT,
    "results_is_dir": manifest.UNREADABLE, "binary_status": manifest.UNREADABLE,
    "list_status": manifest.UNREADABLE, "bad_time": manifest.UNREADABLE,
}


def test_status_reports_every_run_of_a_sweep_with_broken_files(tmp_path, capsys):
    from em_sweep.sweep.cli import cmd_status

    sweep = _broken_sweep(tmp_path)
    problems: list[str] = []
    statuses = {s.entry.run.run_id: s for s in manifest.sweep_status(sweep, live=set(), problems=problems)}
    assert len(statuses) == 10
    assert {k: statuses[k].state for k in EXPECTED} == EXPECTED
    assert "not valid JSON" in statuses["torn_results"].reason
    assert "somebody_else" in statuses["other_results"].reason
    assert statuses["bad_time"].reason.startswith("status.json: time")
    assert statuses["garbage_metrics"].state == manifest.FAILED  # metrics are not read for status
    assert len(problems) == 3 and all(p.startswith("manifest.jsonl line") for p in problems), problems
    assert manifest.CORRUPT in manifest.RESUBMITTABLE
    args = argparse.Namespace(sweep_dir=str(sweep), resubmit=False, dry_run=False, reasons=10)
    assert cmd_status(args) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "unreadable" in out and "skipped: manifest.jsonl line" in out


def test_collect_and_report_survive_broken_files_and_an_unwritable_output(tmp_path, capsys):
    from em_sweep.analysis.collect import COLLECTED_DIR, cmd_collect, collect
    from em_sweep.analysis.report import cmd_report

    sweep = _broken_sweep(tmp_path)
    collected = collect(sweep, progress=False)
    runs = collected.scores.drop_duplicates("run_id").set_index("run_id")
    assert len(runs) == 10
    assert {k: runs.loc[k, "status"] for k in EXPECTED} == EXPECTED
    assert runs.loc["bad_scores", "status"] == "unreadable" and "scores" in runs.loc["bad_scores", "reason"]
    assert runs.loc["bad_config", "status"] == "unreadable" and "config.yaml" in runs.loc["bad_config", "reason"]
    assert runs.loc["garbage_metrics", "status"] == "failed"
    # The same read from the runs/ folder (no manifest).
    listed = collect(tmp_path / "runs", progress=False).scores.drop_duplicates("run_id").set_index("run_id")
    assert listed.loc["torn_results", "status"] == "corrupt" and listed.loc["good", "status"] == "done"

    (sweep / COLLECTED_DIR).write_text("a file where the output folder would go")
    args = argparse.Namespace(dir=str(sweep), name=None, out=None, quiet=True)
    assert cmd_collect(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: cannot write the tables") and "--out" in err
    assert "Traceback" not in err and "warning:" in err  # the skipped manifest lines are named too
    assert cmd_collect(argparse.Namespace(dir=str(sweep), name=None, out=str(tmp_path / "out"), quiet=True)) == 0
    report = argparse.Namespace(dir=str(sweep), name=None, out=None, skewness=None, quiet=True)
    assert cmd_report(report) == 0
    assert "warning: tables not saved" in capsys.readouterr().err
    assert (sweep / "report" / "report.md").is_file() or any((sweep / "report").iterdir())
    blocked = tmp_path / "a_file"
    blocked.write_text("a file where the report's folder would go")
    report = argparse.Namespace(dir=str(sweep), name=None, out=str(blocked / "report"), skewness=None, quiet=True)
    assert cmd_report(report) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: cannot write the report") and "--out" in err


def test_a_killed_local_launchers_runs_are_not_waiting_in_a_queue(tmp_path):
    """The launcher itself was killed: its never-started runs are pending with the reason that
    nothing will start them; a run whose process is gone is interrupted, not running."""
    sweep = tmp_path / "sweep"
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from em_sweep.sweep import manifest; from em_sweep.sweep.plan import PlannedRun;"
            "t = Path(sys.argv[2]);"
            "manifest.append_manifest(t / 'sweep', [manifest.ManifestEntry(PlannedRun(n, str(t / n), (), 'm'), "
            "'local', 1.0) for n in ('never_started', 'was_running')])")
    launcher = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], check=True)
    assert launcher.returncode == 0  # the launching process is gone now
    rundir.write_status(tmp_path / "was_running", "running", pid=_dead_pid())
    statuses = {s.entry.run.run_id: s for s in manifest.sweep_status(sweep)}
    assert statuses["was_running"].state == manifest.INTERRUPTED
    never = statuses["never_started"]
    assert never.state == manifest.PENDING and "launcher" in never.reason and "gone" in never.reason
    text = manifest.format_status(sweep, list(statuses.values()))
    assert "launcher (pid" in text and "re-launch" in text
    # While the launcher lives (this process), a never-started run simply waits.
    manifest.append_manifest(sweep, [manifest.ManifestEntry(PlannedRun("never_started", str(tmp_path / "never_started"),
                                                                       (), "m"), "local", 2.0)])
    waiting = {s.entry.run.run_id: s for s in manifest.sweep_status(sweep)}["never_started"]
    assert waiting.state == manifest.PENDING and waiting.reason is None


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid
