"""A label-free stopping rule: signals any objective can log without labels, and the step they pick.

After every training step (and before the first) the probe (``stop.probe_samples`` > 0) samples
responses to the training prompt(s) with the training sampling settings (``train.*``, the same for
every objective, so objectives are compared on one yardstick) and records

- ``entropy``: their mean token entropy at the sampling temperature (nats);
- ``agreement``: the share of them giving the most common extracted answer (per prompt, averaged);
- ``length``: their mean length in tokens;
- ``heldout_entropy`` / ``heldout_change``: with ``stop.heldout_prompts`` > 0, the mean token
  entropy of one greedy response to each of the first held-out prompts of the pool (no labels
  read), and its ratio to the step-0 value.

A rule (:func:`choose_step`, pure) turns the signals into the step to keep. Training itself always
runs its configured steps (the default stays a fixed step count); the chosen step is recorded in
``results.json`` (``stop``) and scored by the report against the evaluated step curve. The probe
seeds its own sampling, and every training step and evaluation seeds theirs, so turning the probe
on does not change what a run trains or scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from em_sweep.config import KNOWN_STOP_RULES, StopConfig, TrainConfig
from em_sweep.evaluation.grading import extract_answer
from em_sweep.training.objectives import majority_share

RULES = KNOWN_STOP_RULES
PROBE_SEED = 424_242


def first_step(signals: Sequence[Mapping[str, Any]], key: str, hit: Any) -> int | None:
    """The first step after 0 whose ``key`` satisfies ``hit``; None if none does."""
    for s in signals:
        if s["step"] > 0 and s.get(key) is not None and hit(s[key]):
            return int(s["step"])
    return None


def rule_step(signals: Sequence[Mapping[str, Any]], rule: str, stop: StopConfig) -> int | None:
    """The step ``rule`` picks from per-step signals (step 0 first), before snapping to an
    evaluated step; None when the signal it needs was not logged.

    - agreement: the first step whose answer agreement is >= ``stop.agreement``;
    - heldout_entropy: the first step whose held-out entropy is <= ``stop.heldout_ratio`` x step 0's;
    - entropy: the first step whose probe entropy is <= ``stop.entropy_ratio`` x step 0's.
    A signal that never crosses its threshold picks the last step.
    """
    if not signals:
        return None
    last = int(signals[-1]["step"])
    base = signals[0]
    if rule == "agreement":
        if all(s.get("agreement") is None for s in signals):
            return None
        chosen = first_step(signals, "agreement", lambda a: a >= stop.agreement)
    elif rule in ("heldout_entropy", "entropy"):
        key = rule
        ratio = stop.heldout_ratio if rule == "heldout_entropy" else stop.entropy_ratio
        if base.get(key) is None:
            return None
        chosen = first_step(signals, key, lambda h: h <= ratio * base[key])
    else:
        raise ValueError(f"unknown stopping rule {rule!r}; choose from {RULES}")
    return last if chosen is None else chosen


def snap_to_evaluated(step: int, evaluated: Sequence[int]) -> int:
    """The first evaluated step at or after ``step`` (the last evaluated one if none is)."""
    later = [s for s in sorted(evaluated) if s >= step]
    return later[0] if later else max(evaluated)


def choose_step(signals: Sequence[Mapping[str, Any]], stop: StopConfig, evaluated: Sequence[int]) -> dict[str, Any]:
    """``{"rule", "chosen_step", "by_rule": {rule: step or None}}``: every rule's pick snapped to
    an evaluated step; ``chosen_step`` is ``stop.rule``'s."""
    by_rule: dict[str, int | None] = {}
    for rule in RULES:
        s = rule_step(signals, rule, stop)
        by_rule[rule] = None if s is None else snap_to_evaluated(s, evaluated)
    return {"rule": stop.rule, "chosen_step": by_rule[stop.rule], "by_rule": by_rule}


def stopping_error(curve: Mapping[int, float], chosen: int) -> float:
    """How far below the best evaluated step's score the chosen step's is (>= 0; score units)."""
    return max(curve.values()) - curve[chosen]


# -- the probe (I/O: the model) --------------------------------------------------------------

@torch.no_grad()
def probe_signals(model: Any, tokenizer: Any, train_texts: Sequence[str], heldout_texts: Sequence[str],
                  train: TrainConfig, stop: StopConfig, step: int, base_heldout: float | None) -> dict[str, Any]:
    """The signals of one step (see the module docstring)."""
    from em_sweep.generation.sample import SamplingSettings, sample_responses
    from em_sweep.training.em import micro_batch_entropy_sum, sampling_settings

    n = stop.probe_samples
    texts = [train_texts[i % len(train_texts)] for i in range(n)]
    tau = float(train.sample_temperature)
    out: dict[str, Any] = {"step": step}
    if n:
        batch = sample_responses(model, tokenizer, sorted(texts), sampling_settings(train),
                                 batch_size=train.sample_batch_size, seed=PROBE_SEED)
        out["entropy"] = _mean_entropy(model, batch, tau, train, micro_batch_entropy_sum)
        answers = [extract_answer(t) for t in batch.texts]
        groups: dict[str, list[str | None]] = {}
        for prompt, a in zip(sorted(texts), answers, strict=True):
            groups.setdefault(prompt, []).append(a)
        out["agreement"] = sum(majority_share(g) for g in groups.values()) / len(groups)
        out["length"] = float(batch.response_lengths.float().mean())
    if heldout_texts:
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=train.max_new_tokens,
                                  repetition_penalty=train.repetition_penalty)
        batch = sample_responses(model, tokenizer, list(heldout_texts), greedy, batch_size=train.sample_batch_size)
        h = _mean_entropy(model, batch, tau, train, micro_batch_entropy_sum)
        out["heldout_entropy"] = h
        out["heldout_change"] = h / base_heldout if base_heldout else 1.0
    return out


def _mean_entropy(model: Any, batch: Any, tau: float, train: TrainConfig, entropy_sum: Any) -> float:
    total = 0.0
    for s in range(0, batch.input_ids.shape[0], train.micro_batch_size):
        total += float(entropy_sum(model, batch, slice(s, s + train.micro_batch_size), tau,
                                   train.loss_chunk_tokens)[1])
    return total / max(float(batch.response_mask.sum()), 1.0)
