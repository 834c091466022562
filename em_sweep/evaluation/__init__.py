"""Evaluation: benchmarks, answers, grades and scores.

- ``evaluate``: generate answers to a benchmark's problems, extract, grade, score.
- ``benchmarks``: the shipped benchmarks and a user's own files, as one problem type.
- ``grading``: answer extraction and math grading (math-verify in a worker process).
- ``calibration``: confidence against correctness for sampled evaluation.
- ``families``: how code and logic problems are posed and scored.
- ``humaneval``, ``knights``: code (HumanEval) and logic (Knights and Knaves) benchmarks.
- ``sandbox`` (with ``_sandbox_launcher``): running generated code without trusting it.
"""
