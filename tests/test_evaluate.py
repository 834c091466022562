"""Evaluation on the shipped tiny model: a user's own benchmark scored and recorded under its name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from em_sweep.config import validate
from em_sweep.evaluate import evaluate, generate_responses
from em_sweep.record import RunRecorder
from em_sweep.rundir import run_id
from em_sweep.sample import SamplingSettings
from tests.conftest import ROOT, compose_config

CUSTOM = ROOT / "tests" / "data" / "custom_benchmark.jsonl"
CUSTOM_ENTRY = f"{{name:mine,path:{CUSTOM},question_field:problem,answer_field:solution,id_field:uid}}"


class _KeysMirror:
    """Stands in for W&B: keeps what would be logged."""

    def __init__(self) -> None:
        self.logged: dict[str, Any] = {}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.logged.update(metrics)


def test_custom_benchmark_is_scored_and_recorded_under_its_name(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    cfg = compose_config([f"eval.benchmarks=[arith,{CUSTOM_ENTRY}]", "eval.limit=8"])
    validate(cfg)
    scores, records = evaluate(model, tokenizer, cfg.eval, step=0)
    assert [s["benchmark"] for s in scores] == ["arith", "mine"]
    mine = scores[1]
    assert mine["n_problems"] == 4 and mine["n"] == 1
    mine_records = [r for r in records if r["benchmark"] == "mine"]
    assert [r["id"] for r in mine_records] == ["c1", "c2", "c3", "c4"]
    assert [r["gold"] for r in mine_records] == [["19"], ["25"], ["27"], ["59"]]
    assert mine["accuracy"] == sum(r["correct"] for r in mine_records) / 4

    mirror = _KeysMirror()
    RunRecorder(tmp_path, mirror).eval(0, scores, records, primary_temperature=0.0)  # type: ignore[arg-type]
    assert {"eval/mine/accuracy", "eval/arith/accuracy"} <= mirror.logged.keys()
    lines = [json.loads(x) for x in (tmp_path / "eval_records.jsonl").read_text().splitlines()]
    assert {x["benchmark"] for x in lines} == {"arith", "mine"}


def test_hf_backend_returns_responses_per_prompt_and_sample(tiny) -> None:
    model, tokenizer = tiny
    cfg = compose_config(["eval.batch_size=3"])
    texts = ["What is 1+2?", "What is 30+40+5?"]
    out = generate_responses(model, tokenizer, texts, 2, SamplingSettings(temperature=1.0, max_new_tokens=8),
                             cfg.eval)
    assert len(out) == 2 and all(len(row) == 2 and all(isinstance(t, str) for t in row) for row in out)


def test_run_id_follows_the_custom_benchmark(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(CUSTOM.read_text())

    def rid(entry: str) -> str:
        return run_id(compose_config([f"eval.benchmarks=[{entry}]"]))

    base = rid(CUSTOM_ENTRY)
    assert rid(CUSTOM_ENTRY) == base
    assert rid(CUSTOM_ENTRY.replace(str(CUSTOM), str(other))) != base
    assert rid(CUSTOM_ENTRY.replace("answer_field:solution", "answer_field:problem")) != base
    assert rid(CUSTOM_ENTRY.replace(",id_field:uid", "")) != base


def test_yaml_preset_with_a_custom_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the preset's relative path resolves against the current directory
    cfg = compose_config(["+experiment=custom_benchmark"])
    validate(cfg)
    assert cfg.eval.benchmarks[0] == "arith" and cfg.eval.benchmarks[1].name == "arith_custom"


def test_launch_scores_a_custom_benchmark_from_the_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "launch.py"), f"paths.root={tmp_path}", "logger.mode=disabled",
           "train.steps=0", "eval.limit=4", f"eval.benchmarks=[arith,{CUSTOM_ENTRY}]"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mine" in proc.stdout  # the summary table
    (run,) = (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert [s["benchmark"] for s in results["final_scores"]] == ["arith", "mine"]
    assert results["config"]["eval"]["benchmarks"][1]["path"] == str(CUSTOM)
    records = [json.loads(x) for x in (run / "eval_records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records if r["benchmark"] == "mine"] == ["c1", "c2", "c3", "c4"]
