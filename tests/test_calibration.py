"""Calibration of sampled evaluation (em_sweep/evaluation/calibration.py): ECE, Brier and confidences by hand."""

import math

import pytest
import torch

from em_sweep.evaluation.calibration import (
    bin_index,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    majority_confidence,
    mean_token_logprobs,
    reliability_bins,
)
from em_sweep.prompts import format_prompt, load_pool
from tests.conftest import compose_config


def test_bins_are_right_closed_tenths():
    assert [bin_index(c) for c in (0.0, 0.05, 0.1, 0.100001, 0.5, 0.55, 0.95, 1.0)] == [0, 0, 0, 1, 4, 5, 9, 9]


def test_ece_and_brier_by_hand():
    # one confidence per bin: ECE is the mean absolute gap
    conf, right = [0.95, 0.85, 0.55, 0.5, 0.05], [1, 0, 1, 0, 0]
    assert expected_calibration_error(conf, right) == pytest.approx((0.05 + 0.85 + 0.45 + 0.5 + 0.05) / 5)
    assert brier_score(conf, right) == pytest.approx((0.0025 + 0.7225 + 0.2025 + 0.25 + 0.0025) / 5)
    # three confidences share the bin (0.6, 0.7]: their mean 0.6367 against accuracy 2/3, weight 3/4
    conf, right = [0.62, 0.68, 0.61, 0.1], [1, 1, 0, 0]
    want = 0.75 * abs(2 / 3 - (0.62 + 0.68 + 0.61) / 3) + 0.25 * 0.1
    assert expected_calibration_error(conf, right) == pytest.approx(want)
    bins = reliability_bins(conf, right)
    assert [(b["lo"], b["n"]) for b in bins] == [(0.0, 1), (pytest.approx(0.6), 3)]
    assert bins[1]["accuracy"] == pytest.approx(2 / 3)
    # perfectly calibrated and perfectly confident-and-right
    assert expected_calibration_error([1.0, 1.0, 0.0], [1, 1, 0]) == 0.0
    assert brier_score([1.0, 0.0], [True, False]) == 0.0
    assert math.isnan(expected_calibration_error([], [])) and math.isnan(brier_score([], []))


def records(extracted, correct):
    return [{"extracted": e, "correct": c} for e, c in zip(extracted, correct, strict=True)]


def test_majority_confidence_per_problem_with_ties_and_no_answers():
    recs = records(["5", "5", "6", None] + [None] * 4 + ["1", "2", "2", "1"],
                   [True, True, False, False] + [False] * 4 + [False, True, True, False])
    shares, right = majority_confidence(recs, 4)
    assert shares == [0.5, 0.0, 0.5]
    assert right == [True, False, False]  # the tie goes to "1", which is wrong
    s = calibration_summary(recs, 4, [math.log(0.9)] * 12)
    assert s["majority_accuracy"] == pytest.approx(1 / 3)
    assert s["ece_majority"] == pytest.approx(expected_calibration_error([0.5, 0.0, 0.5], [1, 0, 0]))
    assert s["brier_majority"] == pytest.approx((0.25 + 0.0 + 0.25) / 3)
    assert s["seqprob_confidence"] == pytest.approx(0.9)
    assert s["brier_seqprob"] == pytest.approx((4 * 0.01 + 8 * 0.81) / 12)  # 4 right at 0.9, 8 wrong
    assert "ece_seqprob" not in calibration_summary(recs, 4)


def test_mean_token_logprobs_are_the_models_own_and_ignore_padding(tiny):
    model, tok = tiny
    p = load_pool("arith_pool")
    prompts = [format_prompt(tok, p[i].problem, None, True) for i in ("arith1", "arith2")]
    responses = ["12+3=15 \\boxed{15}", "7"]
    both = mean_token_logprobs(model, tok, prompts, responses)
    alone = [mean_token_logprobs(model, tok, [q], [r])[0] for q, r in zip(prompts, responses, strict=True)]
    assert both == pytest.approx(alone, abs=1e-5)
    ids = tok(prompts[0] + responses[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_p = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    direct = float(lp[torch.arange(n_p - 1, ids.shape[1] - 1), ids[0, n_p:]].mean())
    assert both[0] == pytest.approx(direct, abs=1e-5)


def test_sampled_evaluation_records_calibration_and_greedy_does_not(tiny):
    from em_sweep.evaluation.evaluate import evaluate
    model, tok = tiny
    cfg = compose_config(["eval.limit=12", "eval.temperatures=[0.0,1.0]", "eval.n_samples=3"])
    scores, recs = evaluate(model, tok, cfg.eval, 0)
    greedy, sampled = scores
    assert greedy["n"] == 1 and greedy["ece_majority"] is None and greedy["reliability_majority"] is None
    assert sampled["n"] == 3 and 0 <= sampled["ece_majority"] <= 1 and 0 <= sampled["brier_seqprob"] <= 1
    assert sum(b["n"] for b in sampled["reliability_majority"]) == 12
    assert sum(b["n"] for b in sampled["reliability_seqprob"]) == 36
    assert all("mean_logprob" in r for r in recs if r["temperature"] == 1.0)
