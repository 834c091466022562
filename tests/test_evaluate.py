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


CODE = ROOT / "tests" / "data" / "custom_code.jsonl"
CODE_ENTRY = (f"{{name:mycode,path:{CODE},family:code,question_field:prompt,test_field:tests,"
              "entry_point_field:fn,id_field:key}")


def test_code_and_logic_responses_are_executed_and_parsed() -> None:
    """The scoring half of evaluation on hand-written responses (no model needed)."""
    from em_sweep import families
    from em_sweep.benchmarks import load_benchmark, resolve_spec

    cfg = compose_config([f"eval.benchmarks=[{CODE_ENTRY},kk]", "eval.pass_k=[1,2]", "eval.code_timeout_s=2"])
    validate(cfg)
    code_spec = resolve_spec(cfg.eval.benchmarks[0])
    code = load_benchmark(code_spec)
    responses = [
        ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```",
         "```python\nimport os\ndef add(a, b):\n    while True:\n        pass\n```"],
        ["def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n", "no idea", ""],
    ]
    score, records = families.score(code_spec, code, responses, 3, cfg.eval, step=0, temperature=0.7, t0=0.0)
    assert [r["correct"] for r in records] == [True, False, False, True, False, False]
    assert records[1]["reason"].startswith("AssertionError") and records[4]["extracted"] == ""
    assert "check(add)" in records[0]["program"] and records[0]["grade_status"] == "passed"
    assert score.family == "code" and score.accuracy == pytest.approx(2 / 6) and score.pass_at_n == 1.0
    assert score.metrics["pass@1"] == pytest.approx(1 / 3)
    assert score.metrics["pass@2"] == pytest.approx(1 - (2 / 3) * (1 / 2))  # 1 - C(2,2)/C(3,2) per problem
    assert score.boxed_rate == pytest.approx(4 / 6)

    kk_spec = resolve_spec("kk")
    puzzles = load_benchmark(kk_spec, limit=2)  # 2 and 3 people
    right = "<answer>" + puzzles[0].answers[0] + "</answer>"
    flipped = {"knight": "knave", "knave": "knight"}
    pairs = zip(puzzles[1].names, puzzles[1].roles, strict=True)
    one_wrong = "CONCLUSION:\n" + "\n".join(
        f"({i + 1}) {n} is a {flipped[r] if i == 0 else r}" for i, (n, r) in enumerate(pairs))
    score, records = families.score(kk_spec, puzzles, [[right], [one_wrong]], 1, cfg.eval, 0, 0.0, 0.0)
    assert [r["grade_status"] for r in records] == ["correct", "wrong_identity"]
    assert records[0]["extracted"] == records[0]["gold"] and records[1]["people"] == 3
    assert score.metrics == {"accuracy_people2": 1.0, "accuracy_people3": 0.0}


def test_tiny_model_on_code_and_logic_benchmarks(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    cfg = compose_config([f"eval.benchmarks=[humaneval,kk,{CODE_ENTRY}]", "eval.limit=2", "eval.max_new_tokens=16"])
    validate(cfg)
    scores, records = evaluate(model, tokenizer, cfg.eval, step=0)
    by_name = {s["benchmark"]: s for s in scores}
    assert {n: by_name[n]["family"] for n in by_name} == {"humaneval": "code", "kk": "logic", "mycode": "code"}
    assert by_name["humaneval"]["pass@1"] == by_name["humaneval"]["accuracy"]
    assert {"accuracy_people2", "accuracy_people3"} <= by_name["kk"].keys()
    code_records = [r for r in records if r["benchmark"] == "humaneval"]
    assert len(code_records) == 2 and all("program" in r and r["grade_status"] in ("passed", "failed")
                                          for r in code_records)
    assert all("gold" in r and "people" in r for r in records if r["benchmark"] == "kk")

    mirror = _KeysMirror()
    RunRecorder(tmp_path, mirror).eval(0, scores, records, primary_temperature=0.0)  # type: ignore[arg-type]
    assert {"eval/humaneval/pass@1", "eval/kk/accuracy_people2", "eval/mycode/accuracy"} <= mirror.logged.keys()
    lines = [json.loads(x) for x in (tmp_path / "eval_records.jsonl").read_text().splitlines()]
    assert {x["benchmark"] for x in lines} == {"humaneval", "kk", "mycode"}


def test_sandbox_limits_are_part_of_the_run_id_only_with_a_code_benchmark() -> None:
    default = run_id(compose_config())
    assert run_id(compose_config(["eval.code_timeout_s=3", "eval.pass_k=[1]", "eval.code_workers=8"])) == default
    code = ["eval.benchmarks=[humaneval,kk]"]
    assert run_id(compose_config(code)) != default
    assert run_id(compose_config([*code, "eval.code_timeout_s=3"])) != run_id(compose_config(code))
    assert run_id(compose_config([*code, "eval.code_workers=8", "eval.pass_k=[1]"])) == run_id(compose_config(code))
    assert run_id(compose_config([f"eval.benchmarks=[{CODE_ENTRY}]", "eval.code_memory_mb=512"])) != run_id(
        compose_config([f"eval.benchmarks=[{CODE_ENTRY}]"]))
