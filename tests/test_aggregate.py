"""Aggregation functions against numbers computed by hand on small tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from em_sweep.analysis import aggregate as agg


def score_table() -> pd.DataFrame:
    """Two models; greedy (T=0) and T=1 scores at steps 0, 5, 10; one failed run with no scores.

    run  model  seed  temperature  T=0: step0 step5 step10   T=1: step0 step10
    r1   base   1     0.5               .40   .60   .50            .30   .40
    r2   base   2     0.5               .40   .80   .20            .30   .10
    r3   base   1     0.9               .40   .50   .70            .30   .60
    r4   rl     1     0.5               .80   .70   .60            .70   .65
    r5   base   3     0.5          failed
    """
    rows = []
    data = {
        "r1": ("base", 1, 0.5, {0: 0.4, 5: 0.6, 10: 0.5}, {0: 0.3, 10: 0.4}),
        "r2": ("base", 2, 0.5, {0: 0.4, 5: 0.8, 10: 0.2}, {0: 0.3, 10: 0.1}),
        "r3": ("base", 1, 0.9, {0: 0.4, 5: 0.5, 10: 0.7}, {0: 0.3, 10: 0.6}),
        "r4": ("rl", 1, 0.5, {0: 0.8, 5: 0.7, 10: 0.6}, {0: 0.7, 10: 0.65}),
    }
    for run, (model, seed, temp, greedy, hot) in data.items():
        for t, accs in ((0.0, greedy), (1.0, hot)):
            for step, acc in accs.items():
                rows.append({"run_id": run, "status": "done", "reason": "", "model.name": model, "seed": seed,
                             "temperature": temp, "step": step, "benchmark": "arith", "eval_temperature": t,
                             "accuracy": acc, "n_problems": 400})
    rows.append({"run_id": "r5", "status": "failed", "reason": "NonFiniteLoss", "model.name": "base", "seed": 3,
                 "temperature": 0.5, "step": np.nan, "benchmark": None, "eval_temperature": np.nan,
                 "accuracy": np.nan, "n_problems": np.nan})
    return pd.DataFrame(rows)


@pytest.fixture
def greedy() -> pd.DataFrame:
    s = agg.scores(score_table())
    return agg.at_eval_temperature(s, 0.0)


def test_scores_keep_done_runs_and_name_the_score():
    table = score_table()
    s = agg.scores(table)
    assert set(s["run_id"]) == {"r1", "r2", "r3", "r4"}  # the failed run has no scores
    assert len(s) == 4 * 5
    assert agg.primary_benchmark(table) == "arith"
    assert agg.score_label(table) == "arith accuracy"
    assert agg.default_eval_temperature(s) == 0.0
    assert agg.status_counts(table) == {"done": 4, "failed": 1}
    f = agg.failures(table)
    assert list(f["run_id"]) == ["r5"] and f["reason"].iloc[0] == "NonFiniteLoss"


def test_scores_average_benchmarks_without_avg4_and_prefer_avg4():
    base = {"run_id": "x", "status": "done", "reason": "", "seed": 1, "step": 0, "eval_temperature": 0.0}
    two = pd.DataFrame([{**base, "benchmark": "a", "accuracy": 0.2}, {**base, "benchmark": "b", "accuracy": 0.6}])
    assert agg.scores(two)["score"].tolist() == pytest.approx([0.4])
    assert agg.score_label(two) == "mean accuracy over 2 benchmarks (a, b)"
    with_avg = pd.concat([two, pd.DataFrame([{**base, "benchmark": "avg4", "accuracy": 0.9}])])
    assert agg.scores(with_avg)["score"].tolist() == pytest.approx([0.9])


def test_summarize_mean_std_min_max_by_group(greedy):
    last = agg.final_step(greedy)
    stats = agg.summarize(last, ["model.name", "temperature"])
    base05 = stats[(stats["model.name"] == "base") & (stats["temperature"] == 0.5)].iloc[0]
    # finals .5 and .2: mean .35, sample std |.5-.2|/sqrt(2)
    assert base05["n"] == 2
    assert base05["mean"] == pytest.approx(0.35)
    assert base05["std"] == pytest.approx(0.3 / math.sqrt(2))
    assert (base05["min"], base05["max"]) == pytest.approx((0.2, 0.5))
    single = stats[(stats["model.name"] == "rl")].iloc[0]
    assert single["n"] == 1 and math.isnan(single["std"])
    overall = agg.summarize(last, [])
    assert overall["mean"].iloc[0] == pytest.approx((0.5 + 0.2 + 0.7 + 0.6) / 4)


def test_best_runs_per_group(greedy):
    best = agg.best_runs(agg.final_step(greedy), ["model.name"])
    assert dict(zip(best["model.name"], best["run_id"], strict=True)) == {"base": "r3", "rl": "r4"}
    assert dict(zip(best["model.name"], best["score"], strict=True)) == pytest.approx({"base": 0.7, "rl": 0.6})


def test_max_min_ratio_edge_cases():
    assert agg.max_min_ratio([0.2, 0.4, 0.3]) == pytest.approx(2.0)
    assert agg.max_min_ratio([0.0, 0.1]) == math.inf
    assert math.isnan(agg.max_min_ratio([0.0, 0.0]))
    assert math.isnan(agg.max_min_ratio([]))
    assert agg.max_min_ratio([0.5, float("nan")]) == pytest.approx(1.0)


def test_seed_spread_groups_identical_settings(greedy):
    last = agg.final_step(greedy)
    spread = agg.seed_spread(last, ["model.name", "temperature"])
    row = spread[(spread["model.name"] == "base") & (spread["temperature"] == 0.5)].iloc[0]
    assert row["n_seeds"] == 2
    assert row["ratio"] == pytest.approx(0.5 / 0.2)  # 2.5x
    assert row["spread"] == pytest.approx(0.3)
    assert len(spread) == 3  # (base, .5), (base, .9), (rl, .5)
    lone = spread[(spread["model.name"] == "base") & (spread["temperature"] == 0.9)].iloc[0]
    assert lone["n_seeds"] == 1 and lone["ratio"] == pytest.approx(1.0)


def test_step_curve_and_peak_step(greedy):
    base = greedy[greedy["model.name"] == "base"]
    curve = agg.step_curve(base)
    # step 0: .4; step 5: (.6+.8+.5)/3 = .6333; step 10: (.5+.2+.7)/3 = .4667
    assert curve["mean"].tolist() == pytest.approx([0.4, 1.9 / 3, 1.4 / 3])
    assert agg.peak_step(curve) == (5, pytest.approx(1.9 / 3))
    tie = pd.DataFrame({"step": [10, 0, 5], "mean": [0.5, 0.5, 0.1]})
    assert agg.peak_step(tie) == (0, 0.5)  # earliest step wins a tie


def test_paired_difference_per_run(greedy):
    base = greedy[greedy["model.name"] == "base"]
    d = agg.paired_difference(base, "step", 5, 10)
    # per run (step 10 - step 5): -.1, -.6, +.2 -> mean -.1667, sample std .4041
    diffs = np.array([-0.1, -0.6, 0.2])
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["std"] == pytest.approx(diffs.std(ddof=1))
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
    assert agg.paired_difference(base, "step", 5, 99)["n"] == 0


def test_before_after_per_model(greedy):
    table = agg.before_after(greedy, ["model.name"])
    base = table[table["model.name"] == "base"].iloc[0]
    rl = table[table["model.name"] == "rl"].iloc[0]
    # base: before .4, after (.5+.2+.7)/3, per-run change +.1 -.2 +.3
    assert base["n_runs"] == 3 and base["final_step"] == 10
    assert base["before"] == pytest.approx(0.4)
    assert base["after"] == pytest.approx(1.4 / 3)
    assert base["change"] == pytest.approx(0.2 / 3)
    assert (base["change_min"], base["change_max"]) == pytest.approx((-0.2, 0.3))
    assert base["change_se"] == pytest.approx(np.std([0.1, -0.2, 0.3], ddof=1) / math.sqrt(3))
    assert rl["change"] == pytest.approx(-0.2)  # EM hurts the "RL-tuned" model here
    overall = agg.before_after(greedy, [])
    assert overall["n_runs"].iloc[0] == 4
    assert overall["change"].iloc[0] == pytest.approx((0.1 - 0.2 + 0.3 - 0.2) / 4)


def test_before_after_uses_a_baseline_run_when_a_run_has_no_step_zero():
    rows = [
        # a train.steps=0 baseline of model m (em-sweep eval) and two runs evaluated at the end only
        {"run_id": "base", "model.name": "m", "step": 0, "score": 0.30},
        {"run_id": "t1", "model.name": "m", "step": 10, "score": 0.50},
        {"run_id": "t2", "model.name": "m", "step": 10, "score": 0.40},
        {"run_id": "u1", "model.name": "other", "step": 10, "score": 0.90},  # no before anywhere: left out
    ]
    table = agg.before_after(pd.DataFrame(rows), ["model.name"])
    assert list(table["model.name"]) == ["m"]
    row = table.iloc[0]
    assert row["n_runs"] == 2
    assert row["before"] == pytest.approx(0.30)
    assert row["change"] == pytest.approx(0.15)


def test_slope_binomial_se_and_clear_differences():
    assert agg.slope([0.1, 0.5, 0.9], [0.2, 0.4, 0.6]) == pytest.approx(0.5)
    assert math.isnan(agg.slope([0.5, 0.5], [0.1, 0.2]))
    assert agg.binomial_se(0.5, 400) == pytest.approx(0.025)
    assert math.isnan(agg.binomial_se(0.5, 0))
    assert agg.is_clear(0.06, 0.025) and not agg.is_clear(0.04, 0.025)
    assert not agg.is_clear(0.5, float("nan"))


def test_mean_difference_welch_se():
    d = agg.mean_difference([0.2, 0.4], [0.5, 0.7, 0.9])
    assert d["mean"] == pytest.approx(0.7 - 0.3)
    assert d["se"] == pytest.approx(math.sqrt(0.02 / 2 + 0.04 / 3))
    assert math.isnan(agg.mean_difference([0.2], [0.5, 0.7])["se"])


def test_distinct_columns_drop_renamings():
    frame = pd.DataFrame({"temperature": [0.3, 0.3, 0.7], "train.sample_temperature": [0.3, 0.3, 0.7],
                          "prompt.name": ["a", "b", "a"], "prompt.n_ids": [1, 2, 1]})
    assert agg.distinct_columns(frame, list(frame.columns)) == ["temperature", "prompt.name"]
    assert agg.varying_columns(frame.iloc[:2], list(frame.columns)) == ["prompt.name", "prompt.n_ids"]


def test_inputs_are_not_modified(greedy):
    before = greedy.copy()
    agg.before_after(greedy, [])
    agg.seed_spread(greedy, ["model.name"])
    agg.summarize(greedy, [])
    pd.testing.assert_frame_equal(greedy, before)


def test_difference_se_adds_the_evaluation_sampling_error():
    # between runs 0.03; evaluation sqrt((.4*.6 + .5*.5) / 400) = 0.035
    assert agg.difference_se(0.03, 0.4, 0.5, 400) == pytest.approx(math.sqrt(0.03 ** 2 + 0.49 / 400))
    assert agg.difference_se(float("nan"), 0.4, 0.5, 400) == pytest.approx(0.035)  # one run: evaluation only
    assert agg.difference_se(0.03, 0.4, 0.5, None) == 0.03
    assert math.isnan(agg.difference_se(float("nan"), 0.4, 0.5, None))


def test_seeds_agree_flags_settings_whose_seeds_scored_identically():
    rows = []
    for run, setting, accs in (("s1", "a", (0.4, 0.5)), ("s2", "a", (0.4, 0.5)),   # identical seeds
                               ("s3", "b", (0.4, 0.5)), ("s4", "b", (0.4, 0.6))):  # differ at step 5
        for step, acc in zip((0, 5), accs, strict=True):
            rows.append({"run_id": run, "setting": setting, "step": step, "eval_temperature": 0.0, "score": acc})
    out = agg.seeds_agree(pd.DataFrame(rows), ["setting"])
    assert dict(zip(out["setting"], out["identical"], strict=True)) == {"a": True, "b": False}
    assert out["n_seeds"].tolist() == [2, 2]
