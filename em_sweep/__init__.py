"""em-sweep: one-shot entropy minimization experiments at sweep scale.

The package by role (the README's "Where things live" maps every module):

- ``training``: what changes the weights (EM, the entropy loss, GRPO, the label-free family).
- ``generation``: responses from a model, for training and evaluation alike.
- ``evaluation``: benchmarks, answer extraction, grading, scores, the code sandbox.
- ``analysis``: collected tables, the report, prompt selection, logits skewness.
- ``sweep``: planning, submitting and tracking a grid of runs.
- at the top, one run's plumbing: ``config`` (every setting), ``run`` (one run end to end),
  ``rundir`` (run identity and the run directory), ``record`` (metrics and W&B), ``models``,
  ``prompts``, ``inputs`` and ``limits`` (checks before compute), ``cli`` (the ``em-sweep`` command),
  ``toymodel`` (the shipped tiny model's recipe).

``em_sweep.loss``, ``em_sweep.grading`` and ``em_sweep.selection`` re-export the public names of
``training.loss``, ``evaluation.grading`` and ``analysis.selection`` at their earlier paths.
"""
