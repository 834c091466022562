"""The dry-run's GPU-hours: each run's work from its config, priced by the measured-figures file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from em_sweep import rundir
from em_sweep.config import ConfigError
from em_sweep.sweep import cost
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


def figures_file(tmp_path: Path, shapes: dict, mean_tokens: float = 1000) -> Path:
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"assumed": {"eval_mean_response_tokens": mean_tokens}, "shapes": shapes}))
    return path


def dry_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", "-m", "hydra/launcher=local", "hydra.launcher.dry_run=true",
                           f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_small_grid_is_priced_from_the_figures_and_rl_runs_are_unknown(tmp_path):
    """8 runs of the tiny preset: EM steps 2 or 4; greedy only, or greedy + T 1.0 with 4 samples;
    EM only, or EM then RL (no measured RL step: unknown). Evaluated at step 0 and at the end
    (2 points), 16 arith problems each. By hand, the 4 EM-only runs: 12 EM steps x 900 s = 3 h;
    2 points x (16 + (16 + 16 x 4)) responses x 2 step counts = 384 responses, each the assumed
    1,000 tokens capped at the preset's eval.max_new_tokens=64, at 0.64 tokens/s: 38,400 s = 10.67 h."""
    figures = figures_file(tmp_path, {"tiny-arith": {"em_step_s": 900, "eval_tokens_per_s": 0.64,
                                                     "card": "test card", "date": "2026-12-05"}})
    result = dry_run(tmp_path, f"hydra.launcher.cost_figures={figures}", "train.steps=2,4",
                     "eval.temperatures=[0.0],[0.0,1.0]", "eval.n_samples=4", "eval.limit=16", "stages=[em],[em,rl]")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "em-sweep plan: 8 runs" in out
    assert f"estimated cost:   13.7 GPU-hours for 4 of 8 runs (figures: {figures}" in out, out
    assert "shape tiny-arith: 4 runs, 13.7 GPU-hours = 12 EM steps x 900 s (3.00 h) + 384 evaluation responses " \
           "at 1 tokens/s (10.7 h); test card, 2026-12-05" in out, out
    assert "unknown: 4 runs (RL stage: no measured RL step)" in out
    assert "dry run: nothing run" in out


@pytest.mark.slow
def test_a_shape_without_figures_is_reported_unknown_not_priced(tmp_path):
    figures = figures_file(tmp_path, {"7b": {"em_step_s": 9, "eval_tokens_per_s": 7000}})
    result = dry_run(tmp_path, f"hydra.launcher.cost_figures={figures}", "seed=1,2")
    assert result.returncode == 0, result.stderr
    assert "estimated cost:   0.00 GPU-hours for 0 of 2 runs" in result.stdout
    assert "unknown: 2 runs (shape 'tiny-arith': no measured figures)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not readable JSON"),
    ('{"shapes": {"7b": {"em_step_s": 9}}, "assumed": {"eval_mean_response_tokens": 800}}',
     "shapes.7b.eval_tokens_per_s: must be a number > 0, got None"),
    ('{"shapes": {}}', "assumed.eval_mean_response_tokens: must be a number > 0"),
])
def test_a_bad_figures_file_is_one_line_naming_file_and_key(tmp_path, content, message):
    path = tmp_path / "measured.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="measured.json") as info:
        cost.load_figures(path)
    assert message in str(info.value)
    result = dry_run(tmp_path, f"hydra.launcher.cost_figures={path}", "seed=1,2")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    with pytest.raises(ConfigError, match="hydra.launcher.cost_figures: no such file"):
        cost.load_figures(tmp_path / "absent.json")


def test_the_shipped_figures_file_parses_and_states_its_sources():
    data = json.loads(cost.DEFAULT_FIGURES.read_text())
    figures = cost.parse_figures(data, str(cost.DEFAULT_FIGURES))
    assert figures.eval_mean_response_tokens > 0
    for name, entry in data["shapes"].items():
        assert entry.get("em_step_source") and entry.get("eval_source"), name
        assert figures.shapes[name].card != "?"


def test_model_shape_is_a_label_outside_the_run_id():
    assert rundir.run_id(compose_config(["model.shape=7b"])) == rundir.run_id(compose_config(["model.shape=other"]))
