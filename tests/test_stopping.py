"""The label-free stopping rule (em_sweep/training/stopping.py) and the family's report sections."""

import json
from dataclasses import replace

import pandas as pd
import pytest

from em_sweep.analysis.objectives_report import calibration_verdict, stopping_errors
from em_sweep.config import StopConfig
from em_sweep.training.stopping import choose_step, rule_step, snap_to_evaluated, stopping_error
from tests.conftest import compose_config

STOP = StopConfig(rule="agreement", agreement=0.9, heldout_ratio=0.5, entropy_ratio=0.5)


def signals():
    return [
        {"step": 0, "agreement": 0.95, "entropy": 1.0, "heldout_entropy": 2.0},  # step 0 never chosen
        {"step": 1, "agreement": 0.5, "entropy": 0.8, "heldout_entropy": 1.9},
        {"step": 2, "agreement": 0.7, "entropy": 0.6, "heldout_entropy": 1.5},
        {"step": 3, "agreement": 0.9, "entropy": 0.45, "heldout_entropy": 1.2},
        {"step": 4, "agreement": 1.0, "entropy": 0.3, "heldout_entropy": 0.9},
        {"step": 5, "agreement": 1.0, "entropy": 0.2, "heldout_entropy": 0.8},
    ]


def test_each_rule_picks_the_first_step_its_signal_crosses():
    s = signals()
    assert rule_step(s, "agreement", STOP) == 3
    assert rule_step(s, "entropy", STOP) == 3  # 0.45 <= 0.5 x 1.0
    assert rule_step(s, "heldout_entropy", STOP) == 4  # 0.9 <= 0.5 x 2.0
    never = replace(STOP, heldout_ratio=0.1)
    assert rule_step(s, "heldout_entropy", never) == 5  # never crossed: the last step
    assert rule_step([{"step": 0, "agreement": 0.3}, {"step": 1, "agreement": 0.2}], "heldout_entropy", STOP) is None
    assert rule_step([], "agreement", STOP) is None
    with pytest.raises(ValueError):
        rule_step(s, "oracle", STOP)


def test_the_chosen_step_snaps_to_an_evaluated_one_and_is_scored_against_the_best():
    assert snap_to_evaluated(3, [0, 2, 4, 6]) == 4
    assert snap_to_evaluated(4, [0, 2, 4, 6]) == 4
    assert snap_to_evaluated(9, [0, 2, 4, 6]) == 6
    picked = choose_step(signals(), STOP, [0, 2, 4, 5])
    assert picked == {"rule": "agreement", "chosen_step": 4,
                      "by_rule": {"agreement": 4, "heldout_entropy": 4, "entropy": 4}}
    curve = {0: 0.40, 2: 0.46, 4: 0.44, 5: 0.41}
    assert stopping_error(curve, 4) == pytest.approx(0.02)
    assert stopping_error(curve, 2) == 0.0


def test_report_errors_per_rule_against_the_step_curve():
    main = pd.DataFrame({"run_id": ["a"] * 4 + ["b"] * 4, "objective": ["em"] * 8,
                         "step": [0, 2, 4, 6] * 2, "score": [0.4, 0.5, 0.45, 0.42, 0.3, 0.3, 0.35, 0.36]})
    extras = {"a": {"stop": {"by_rule": {"agreement": 4, "heldout_entropy": 2, "entropy": None}}},
              "b": {"stop": {"by_rule": {"agreement": 2, "heldout_entropy": 6, "entropy": 6}}}}
    e = stopping_errors(main, extras).set_index(["run_id", "rule"])
    assert e.loc[("a", "agreement"), "error"] == pytest.approx(0.05)
    assert e.loc[("a", "heldout_entropy"), "error"] == 0.0
    assert ("a", "entropy") not in e.index  # no pick, no row
    assert e.loc[("a", "fixed"), "error"] == pytest.approx(0.08)  # the last step: the default
    assert e.loc[("b", "agreement"), "error"] == pytest.approx(0.06)
    assert e.loc[("b", "fixed"), "best"] == 6 and e.loc[("b", "fixed"), "error"] == 0.0


def test_calibration_verdicts_follow_the_numbers():
    assert "calibrates it (ECE falls)" in calibration_verdict(0.2, -0.05, 0.1, 0.02)
    assert "over-confides more than before" in calibration_verdict(0.1, 0.08, 0.05, 0.2)
    assert "unchanged" in calibration_verdict(0.1, 0.001, 0.0, -0.1) and "under-confident" in \
        calibration_verdict(0.1, 0.001, 0.0, -0.1)


@pytest.mark.slow
def test_a_run_logs_the_signals_every_step_and_the_probe_changes_no_score(tmp_path):
    from em_sweep.run import run
    base = ["train.steps=3", "eval.at_steps=[0,2]", "eval.limit=16", "eval.temperatures=[0.0,1.0]",
            "eval.n_samples=2", "train.batch_size=16", "train.micro_batch_size=16", "logger.mode=disabled",
            f"paths.root={tmp_path}"]
    plain = run(compose_config(base))
    probed = run(compose_config([*base, "stop.probe_samples=8", "stop.heldout_prompts=4", "stop.rule=entropy"]))
    assert plain["run_id"] != probed["run_id"] and plain["stop"] is None
    assert [s["accuracy"] for s in probed["scores"]] == [s["accuracy"] for s in plain["scores"]]
    assert [r["loss"] for r in probed["loss_curve"]] == [r["loss"] for r in plain["loss_curve"]]
    sig = probed["stop"]["signals"]
    assert [s["step"] for s in sig] == [0, 1, 2, 3]
    assert all(0 <= s["agreement"] <= 1 and s["entropy"] >= 0 and s["length"] > 0 for s in sig)
    assert sig[0]["heldout_change"] == 1.0 and all(s["heldout_entropy"] >= 0 for s in sig)
    assert probed["stop"]["rule"] == "entropy" and probed["stop"]["chosen_step"] in (2, 3)
    metrics = [json.loads(x) for x in (tmp_path / "runs" / probed["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("stage") == "probe"] == [0, 1, 2, 3]
    assert probed["objective"] == "em"
