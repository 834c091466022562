"""Calibration of sampled evaluation: does a model's confidence say how often it is right?

When evaluation samples ``n > 1`` responses per problem, two confidences are recorded:

- **majority share** (per problem): the share of the ``n`` responses that give the problem's most
  common extracted answer (:func:`em_sweep.training.objectives.majority_share`); it is scored against
  whether that majority answer is correct (maj@n);
- **sequence probability** (per response): ``exp`` of the response's mean token log-probability
  under the model (temperature 1; the geometric mean of its token probabilities), scored
  against whether that response is correct.

For each: expected calibration error over 10 equal-width bins of confidence
(``ECE = sum_b n_b / N * |accuracy_b - confidence_b|``; bin b holds confidences in
``(b/10, (b+1)/10]``, the first also 0), the Brier score ``mean((confidence - correct)^2)``, and
the reliability diagram's bins. Pure functions except :func:`mean_token_logprobs` (a forward
pass of the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from em_sweep.training.objectives import majority_labels, normalize_answer

N_BINS = 10


def bin_index(confidence: float, n_bins: int = N_BINS) -> int:
    """The bin of ``confidence`` in [0, 1]: ``ceil(c * n) - 1``, clamped (0 goes to the first bin)."""
    return min(max(math.ceil(confidence * n_bins) - 1, 0), n_bins - 1)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool | float], n_bins: int = N_BINS
                     ) -> list[dict[str, float]]:
    """One entry per non-empty bin: ``lo``, ``hi``, ``n``, mean ``confidence``, ``accuracy``."""
    sums: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(n_bins)]
    for c, y in zip(confidence, correct, strict=True):
        b = sums[bin_index(float(c), n_bins)]
        b[0] += 1
        b[1] += float(c)
        b[2] += float(y)
    return [{"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": n, "confidence": c / n, "accuracy": a / n}
            for i, (n, c, a) in enumerate(sums) if n]


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool | float],
                               n_bins: int = N_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins; NaN for no data."""
    total = len(confidence)
    if not total:
        return math.nan
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(confidence, correct, n_bins))


def brier_score(confidence: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean squared difference between confidence and correctness (0/1); NaN for no data."""
    if not confidence:
        return math.nan
    return sum((float(c) - float(y)) ** 2 for c, y in zip(confidence, correct, strict=True)) / len(confidence)


def majority_confidence(records: Sequence[dict[str, Any]], n: int) -> tuple[list[float], list[bool]]:
    """Per problem (``records`` in groups of ``n`` samples of one problem, with ``extracted`` and
    ``correct``): the majority answer's share, and whether the majority answer is correct (a
    problem without any extracted answer: share 0, not correct)."""
    answers = [r["extracted"] for r in records]
    labels = majority_labels(answers, n)
    shares, right = [], []
    for k, label in enumerate(labels):
        group = records[k * n:(k + 1) * n]
        agree = [r for r in group if label is not None and normalize_answer(r["extracted"]) == label]
        shares.append(len(agree) / n)
        right.append(bool(agree) and bool(agree[0]["correct"]))
    return shares, right


def calibration_summary(records: Sequence[dict[str, Any]], n: int,
                        sequence_logprobs: Sequence[float] | None = None) -> dict[str, Any]:
    """The calibration fields of one score (see the module docstring): ``majority_accuracy``,
    ``majority_confidence`` (mean), ``ece_majority``, ``brier_majority``, ``reliability_majority``
    and, given each response's mean token log-probability, the same ``*_seqprob`` fields."""
    shares, right = majority_confidence(records, n)
    out: dict[str, Any] = {
        "majority_accuracy": sum(right) / max(len(right), 1),
        "majority_confidence": sum(shares) / max(len(shares), 1),
        "ece_majority": expected_calibration_error(shares, right),
        "brier_majority": brier_score(shares, right),
        "reliability_majority": reliability_bins(shares, right),
    }
    if sequence_logprobs is not None:
        conf = [math.exp(lp) for lp in sequence_logprobs]
        correct = [bool(r["correct"]) for r in records]
        out.update(seqprob_confidence=sum(conf) / max(len(conf), 1),
                   ece_seqprob=expected_calibration_error(conf, correct),
                   brier_seqprob=brier_score(conf, correct),
                   reliability_seqprob=reliability_bins(conf, correct))
    return out


@torch.no_grad()
def mean_token_logprobs(model: Any, tokenizer: Any, prompt_texts: Sequence[str], responses: Sequence[str],
                        batch_size: int = 16) -> list[float]:
    """Mean log-probability (temperature 1) of each response's tokens after its prompt, the
    response re-tokenized from its text; 0.0 for an empty response."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for s in range(0, len(responses), batch_size):
            rows = []
            for p, r in zip(prompt_texts[s:s + batch_size], responses[s:s + batch_size], strict=True):
                pid = tokenizer(p, add_special_tokens=False)["input_ids"]
                rid = tokenizer(r, add_special_tokens=False)["input_ids"]
                rows.append((pid, rid))
            width = max(len(p) + len(r) for p, r in rows)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (p, r) in enumerate(rows):  # right padding: positions count from the first token
                ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
                mask[i, :len(p) + len(r)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for i, (p, r) in enumerate(rows):
                if not r or not p:
                    out.append(0.0)
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=ids.device)
                tok = ids[i, len(p):len(p) + len(r)]
                out.append(float(logp[i, pos, tok].mean()))
    finally:
        model.train(was_training)
    return out
