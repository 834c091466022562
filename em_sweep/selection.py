"""Stable import path for prompt ranking; the code lives in em_sweep/analysis/selection.py."""

from em_sweep.analysis.selection import RankedPrompt, rank_by_variance, variance_table  # noqa: F401
