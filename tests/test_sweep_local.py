"""The in-process launcher (hydra/launcher=local): packed runs, failures recorded, re-launch skips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_sweep_lists_the_runs_another_sweep_already_finished(tmp_path):
    """Overlapping sweeps: the second one's manifest (so its status, collect and report) holds the
    shared run too, marked as already complete, not only the runs it ran itself."""
    from em_sweep.analysis.collect import collect

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


FAST = ["train.steps=1", "train.batch_size=8", "train.micro_batch_size=8", "train.sample_batch_size=8",
        "train.max_new_tokens=12", "eval.max_new_tokens=12", "eval.limit=6", "eval.batch_size=6",
        "logger.mode=disabled"]


@pytest.mark.slow
def test_a_relaunch_reruns_exactly_the_runs_whose_inputs_changed(tmp_path):
    """A sweep of real tiny runs; then each input is changed the way a user might (a pool edited in
    place, a file shadowing a shipped pool name, a custom benchmark edited, a local model's weights
    changed, a results.json torn); the relaunch re-runs those runs and serves the others."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    work = tmp_path / "work"  # the launch's working directory
    work.mkdir()
    pool = work / "pool.jsonl"
    pool.write_text(json.dumps({"id": "q1", "problem": "Find the value of 3+4.", "answer": "7"}) + "\n")
    bench = work / "bench.jsonl"
    bench.write_text("".join(json.dumps({"q": f"Find the value of {i}+1.", "a": str(i + 1)}) + "\n" for i in range(6)))
    model = tmp_path / "model"
    shutil.copytree(ROOT / "em_sweep" / "assets" / "tiny-arith", model)
    # One experiment per input, chosen by a config group (+exp=<name>) of an added config folder.
    experiments = {
        "edited_pool": {"prompt": {"pool": "pool.jsonl", "ids": ["q1"]}},
        "shipped_name": {"prompt": {"pool": "arith_pool"}},  # a cwd file of that name must not matter
        "shipped_file": {"prompt": {"pool": "arith_pool.jsonl"}},  # a path: a cwd file takes over
        "custom_bench": {"eval": {"benchmarks": [{"name": "mine", "path": str(bench), "question_field": "q",
                                                  "answer_field": "a"}]}},
        "local_model": {"model": {"path": str(model)}},
        "untouched": {"seed": 3},
        "torn_results": {"seed": 4},
    }
    conf = tmp_path / "conf" / "exp"
    conf.mkdir(parents=True)
    for name, values in experiments.items():
        (conf / f"{name}.yaml").write_text("# @package _global_\n" + json.dumps(values) + "\n")

    def relaunch() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", "--config-dir", str(tmp_path / "conf"),
                               *FAST, f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                               "+exp=" + ",".join(experiments)],
                              cwd=work, capture_output=True, text=True, timeout=900)

    first = relaunch()
    assert first.returncode == 0, first.stderr[-3000:]
    entries = manifest.read_manifest(tmp_path / "sweep")
    run_of = {e.run.overrides[-1].removeprefix("+exp="): Path(e.run.run_dir) for e in entries.values()}
    assert sorted(run_of) == sorted(experiments) and all(rundir.is_complete(p) for p in run_of.values())
    written = {name: (p / rundir.RESULTS).stat().st_mtime_ns for name, p in run_of.items()}
    recorded = json.loads((run_of["edited_pool"] / rundir.RESULTS).read_text())
    assert recorded["prompt"]["texts"] == [{"id": "q1", "problem": "Find the value of 3+4.", "answer": "7"}]
    assert recorded["resolved"]["optimizer"] == "adamw" and recorded["resolved"]["gpu_name"] is None
    assert recorded["identity"]["id_version"] == rundir.ID_VERSION

    pool.write_text(json.dumps({"id": "q1", "problem": "Find the value of 3+5.", "answer": "8"}) + "\n")
    shadow = (ROOT / "em_sweep" / "data" / "prompts" / "arith_pool.jsonl").read_text().replace("52+5+59", "52+5+58")
    (work / "arith_pool.jsonl").write_text(shadow)
    (work / "arith_pool").write_text(shadow)
    bench.write_text(bench.read_text().replace('"a": "2"', '"a": "3"'))
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    torn = run_of["torn_results"] / rundir.RESULTS
    torn.write_text(torn.read_text()[:100])
    states = {s.entry.run.run_dir: s.state for s in manifest.sweep_status(tmp_path / "sweep")}
    assert states[str(run_of["torn_results"])] == manifest.CORRUPT

    second = relaunch()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already complete: 2" in second.stdout and "to run:           5 runs" in second.stdout, second.stdout
    after = {e.run.overrides[-1].removeprefix("+exp="): Path(e.run.run_dir)
             for e in manifest.read_manifest(tmp_path / "sweep").values()}
    changed = {"edited_pool", "shipped_file", "custom_bench", "local_model"}
    assert {n for n in experiments if after[n] != run_of[n]} == changed  # new ids: new run dirs
    assert all(rundir.is_complete(p) for p in after.values())
    for n in ("untouched", "shipped_name"):  # served, not re-run
        assert (after[n] / rundir.RESULTS).stat().st_mtime_ns == written[n]
    assert (after["torn_results"] / rundir.RESULTS).stat().st_mtime_ns != written["torn_results"]
    (aside,) = after["torn_results"].glob(rundir.CORRUPT_PREFIX + "*")
    assert len((aside / rundir.RESULTS).read_text()) == 100 and "not valid JSON" in (aside / "WHY").read_text()
    texts = json.loads((after["shipped_file"] / rundir.RESULTS).read_text())["prompt"]["texts"]
    assert texts[0]["problem"] == "Find the value of 52+5+58."  # the user's file, by its path
    assert json.loads((after["shipped_name"] / rundir.RESULTS).read_text())["prompt"]["texts"][0]["problem"] == \
        "Find the value of 52+5+59."
