"""`em-sweep collect`: run directories -> one tidy table, failures kept, sweep manifests honoured."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from em_sweep.analysis import collect as col
from em_sweep.cli import main as cli_main

FIXTURE = Path(__file__).parent / "fixtures" / "mini_sweep"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A copy of the fixture's paths.root (so nothing is written into the repository)."""
    root = tmp_path / "outputs"
    shutil.copytree(FIXTURE, root)
    return root


def test_one_row_per_run_step_benchmark_eval_temperature(sweep):
    table = col.collect(sweep, progress=False).scores
    done = table[table["status"] == "done"]
    assert done["run_id"].nunique() == 5
    assert len(done) == 5 * 3 * 2  # steps 0, 5, 10 x eval temperatures 0, 1 x benchmark arith
    assert not done.duplicated(["run_id", "step", "benchmark", "eval_temperature"]).any()
    row = done[(done["run_id"] == "b100000000000000") & (done["step"] == 5) & (done["eval_temperature"] == 0.0)]
    assert row["accuracy"].tolist() == [pytest.approx(0.80)]
    assert row["n_problems"].tolist() == [400]
    assert str(done["step"].dtype) == "Int64"


def test_config_columns_key_ones_always_and_the_varying_ones(sweep):
    table = col.collect(sweep, progress=False).scores
    for key in ("model.name", "seed", "temperature", "train.lr", "prompt.name", "prompt.ids", "prompt.n_ids",
                "train.steps", "name", "stages"):
        assert key in table.columns, key
    # varying besides the key columns: the sampling/loss temperature follow `temperature`
    assert "train.sample_temperature" in table.columns
    assert "train.top_p" not in table.columns  # the same in every run
    assert "paths.root" not in table.columns
    m1 = table[table["run_id"] == "m100000000000000"].iloc[0]
    assert m1["prompt.ids"] == "h1,h2" and m1["prompt.n_ids"] == 2 and m1["stages"] == "em"
    assert table["temperature"].dtype == float and table["seed"].dtype.kind == "i"


def test_failed_and_running_runs_are_rows_with_reason_and_no_scores(sweep):
    table = col.collect(sweep, progress=False).scores
    failed = table[table["status"] == "failed"]
    running = table[table["status"] == "running"]
    assert len(failed) == 1 and len(running) == 1
    assert failed["reason"].iloc[0] == "NonFiniteLoss: step 4: loss=nan grad_norm=nan"
    assert math.isnan(failed["accuracy"].iloc[0]) and pd.isna(failed["step"].iloc[0])
    assert failed["seed"].iloc[0] == 3 and failed["temperature"].iloc[0] == pytest.approx(0.7)  # from config.yaml
    assert (table.loc[table["status"] == "done", "reason"] == "").all()


def test_train_table_has_the_loss_curve_of_done_runs(sweep):
    train = col.collect(sweep, progress=False).train
    assert train["run_id"].nunique() == 5 and len(train) == 5 * 10
    a1 = train[train["run_id"] == "a100000000000000"].sort_values("step")
    assert a1["loss"].tolist()[:2] == pytest.approx([0.95, 0.90])
    assert "temperature" in train.columns


def test_accepts_a_runs_dir_and_filters_by_name(sweep):
    assert col.collect(sweep / "runs", progress=False).scores["run_id"].nunique() == 7
    assert col.collect(sweep, name="mini_sweep", progress=False).scores["run_id"].nunique() == 7
    assert col.collect(sweep, name="other", progress=False).scores.empty


def test_sweep_dir_with_manifest_lists_runs_that_never_started(sweep, tmp_path):
    sweep_dir = tmp_path / "sweeps" / "mini"
    sweep_dir.mkdir(parents=True)
    runs = sorted((sweep / "runs").iterdir())[:2]
    lines = [{"run_id": r.name, "run_dir": str(r), "overrides": ["seed=1"], "model_path": "m", "job_id": "local",
              "submitted_at": 0.0} for r in runs]
    lines.append({"run_id": "ffff000000000000", "run_dir": str(sweep / "runs" / "ffff000000000000"),
                  "overrides": ["seed=9", "temperature=0.5", "model=tiny_arith"], "model_path": "m",
                  "job_id": "local", "submitted_at": 0.0})
    (sweep_dir / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = col.collect(sweep_dir, progress=False).scores
    assert table["run_id"].nunique() == 3
    never = table[table["run_id"] == "ffff000000000000"].iloc[0]
    assert never["status"] not in ("done", "failed", "running")
    assert never["reason"]  # says what the state means
    assert never["seed"] == 9 and never["temperature"] == pytest.approx(0.5)
    assert "model" not in table.columns  # a group override names a preset, not a column value


def test_not_a_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(col.CollectError, match="no manifest.jsonl, no runs/"):
        col.collect(tmp_path, progress=False)


def test_cli_writes_parquet_that_round_trips(sweep, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["collect", str(sweep), "--quiet"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "7 runs (done 5, failed 1, running 1)" in out
    scores, train = col.read_tables(sweep / "collected")
    assert scores["run_id"].nunique() == 7 and len(train) == 50
    direct = col.collect(sweep, progress=False).scores
    pd.testing.assert_frame_equal(scores, direct, check_dtype=False)


def test_progress_falls_back_to_lines_without_tqdm(sweep, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    col.collect(sweep, progress=True)
    assert "collect: 7/7 runs" in capsys.readouterr().err


def test_flatten_joins_lists_and_nests_keys():
    assert col.flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"x": 1}]}) == {"a.b": 1, "a.c": "1,2", "d": '[{"x": 1}]'}


def test_worker_processes_give_the_same_tables(sweep, monkeypatch):
    monkeypatch.setattr(col, "CHUNK_RUNS", 2)  # 7 runs -> 4 chunks over 2 processes
    one = col.collect(sweep, progress=False, workers=1)
    two = col.collect(sweep, progress=False, workers=2)
    pd.testing.assert_frame_equal(one.scores, two.scores)
    pd.testing.assert_frame_equal(one.train, two.train)
    assert col.default_workers(10) == 1


def test_speed_only_settings_do_not_split_runs(sweep):
    """train.compile_loss / share_prompt_pass are outside the run id: a run that had them on (or a
    run recorded before they existed) is the same experiment, so they are no varying column."""
    run = sweep / "runs" / "b100000000000000"
    results = json.loads((run / "results.json").read_text())
    results["config"]["train"].update(compile_loss=True, share_prompt_pass=True)
    (run / "results.json").write_text(json.dumps(results))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("train:\n", "train:\n  compile_loss: true\n  share_prompt_pass: true\n", 1))
    table = col.collect(sweep, progress=False).scores
    assert "train.compile_loss" not in table.columns and "train.share_prompt_pass" not in table.columns
    assert "train.sample_temperature" in table.columns  # a setting that does vary still shows
