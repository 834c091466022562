"""Stable import path for answer extraction and grading; the code lives in em_sweep/evaluation/grading.py."""

from em_sweep.evaluation.grading import (  # noqa: F401
    DEFAULT_TIMEOUT_S,
    Extraction,
    Grade,
    extract,
    extract_answer,
    grade,
    grade_many,
    is_equivalent,
    normalize_answer,
)
