"""Stable import path for answer extraction and grading:
every public name of :mod:`em_sweep.evaluation.grading`, where the code lives."""

from em_sweep.evaluation.grading import (  # noqa: F401
    DEFAULT_TIMEOUT_S,
    EXTRACTION_RULES,
    GRADER_PACKAGES,
    MAX_EXTRACT_CHARS,
    STATUSES,
    Extraction,
    Grade,
    cut_at_stop,
    extract,
    extract_answer,
    grade,
    grade_many,
    grader_versions,
    is_equivalent,
    normalize_answer,
    strip_math_delimiters,
    strip_percent_and_separators,
)
