"""Stable import path for the entropy loss:
every public name of :mod:`em_sweep.training.loss`, where the code lives."""

from em_sweep.training.loss import (  # noqa: F401
    EPS,
    entropy_sum_from_hidden,
    per_token_entropy,
    token_entropies_from_hidden,
    token_entropy,
    token_logprobs_from_hidden,
)
