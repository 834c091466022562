"""launch.py end to end through real Hydra: run directories, results, metrics, W&B offline files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAST = ["train.steps=2", "train.batch_size=8", "train.micro_batch_size=4", "eval.limit=24", "eval.batch_size=24"]


def launch(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch.py"), *(["-m"] if multirun else []), f"paths.root={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"})


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir()) if (tmp_path / "runs").exists() else []


@pytest.mark.slow
def test_single_run_writes_a_complete_run_directory(tmp_path):
    proc = launch(tmp_path, *FAST, "eval.at_steps=[0,1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 0" in proc.stdout and "arith" in proc.stdout  # the before/after table
    (run,) = run_dirs(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["run_id"] == run.name
    assert {s["step"] for s in results["scores"]} == {0, 1, 2}
    final = results["final_scores"][0]
    assert final["benchmark"] == "arith" and final["n_problems"] == 24 and 0 <= final["accuracy"] <= 1
    assert results["config"]["train"]["lr"] == results["config"]["model"]["lr"]  # resolved, recorded
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2]
    for key in ("loss", "entropy", "response_length", "grad_norm", "lr", "seconds_sample", "seconds_loss",
                "seconds_optim"):
        assert all(key in x for x in train), key
    records = (run / "eval_records.jsonl").read_text().splitlines()
    assert len(records) == 3 * 24 and {"response", "extracted", "correct"} <= json.loads(records[0]).keys()
    assert "sample_temperature: 0.5" in (run / "config.yaml").read_text()
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert wandb_runs and list(wandb_runs[0].glob("*.wandb")), "no W&B offline run file"

    # Re-launching the same config skips the finished run.
    again = launch(tmp_path, *FAST, "eval.at_steps=[0,1]")
    assert again.returncode == 0 and "already complete" in again.stderr + again.stdout
    assert run_dirs(tmp_path) == [run]


@pytest.mark.slow
def test_multirun_2x2_gives_four_distinct_runs(tmp_path):
    proc = launch(tmp_path, *FAST, "train.steps=1", "seed=1,2", "temperature=0.4,0.8", "logger.mode=disabled",
                  multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 4
    configs = {(json.loads((r / "results.json").read_text())["config"]["seed"],
                json.loads((r / "results.json").read_text())["config"]["train"]["sample_temperature"]) for r in runs}
    assert configs == {(1, 0.4), (1, 0.8), (2, 0.4), (2, 0.8)}


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["model.path=/nonexistent/model"], "model.path"),
    (["model.path=nobody/no-such-model-xyz"], "model.path"),
    (["prompt.pool=missing_pool.jsonl"], "prompt.pool"),
    (["prompt.ids=[no_such_id]"], "prompt.ids"),
    (["train.steps=-3"], "train.steps"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "not divisible"),
    (["train.loss_temperature=0"], "train.loss_temperature"),
    (["eval.benchmarks=[nosuchbench]"], "nosuchbench"),
    (["train.stpes=3"], "stpes"),
])
def test_bad_input_fails_with_one_clear_line_and_no_results(tmp_path, overrides, message):
    proc = launch(tmp_path, *FAST, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.slow
def test_a_plain_multirun_validates_the_whole_grid_before_any_run(tmp_path):
    """`-m` without sweeper/launcher overrides: one bad value in the grid fails the sweep before the
    good runs compute anything."""
    proc = launch(tmp_path, *FAST, "train.steps=1", "logger.mode=disabled", "train.loss_temperature=0.5,0",
                  multirun=True)
    assert proc.returncode != 0
    assert "train.loss_temperature" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("status.json"))
