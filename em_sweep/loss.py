"""Stable import path for the entropy loss; the code lives in em_sweep/training/loss.py."""

from em_sweep.training.loss import (  # noqa: F401
    entropy_sum_from_hidden,
    per_token_entropy,
    token_entropies_from_hidden,
    token_entropy,
    token_logprobs_from_hidden,
)
