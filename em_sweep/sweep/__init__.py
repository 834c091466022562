"""Sweeps at cluster scale: plan a grid fast, submit it as chunked SLURM arrays, run packed tasks.

- ``plan``: expand Hydra multirun overrides into runs, validate every run's config and compute
  its run id without composing each run from scratch.
- ``launcher``: submit the pending runs (SLURM arrays via submitit, or in this process), write
  the sweep manifest, print a dry-run plan.
- ``worker``: what one array task runs: several packed runs sharing one loaded model, with
  requeue of the unfinished ones on preemption or time limit.
- ``cost``: the plan's GPU-hours from measured figures per model shape (``benchmarks/results/measured.json``).
- ``manifest``: the sweep directory's files and the status of every run, read from run dirs.
- ``cli``: ``em-sweep status`` and ``em-sweep resubmit``.
- ``sweeper``: the Hydra sweeper that validates a whole grid and hands the launchers a plan.
- ``hydra_compat``: the private Hydra and OmegaConf parts the planner relies on, checked in one place.

The Hydra plugin classes that make these usable as ``hydra/sweeper`` and ``hydra/launcher``
choices live in ``hydra_plugins/em_sweep_plugins`` (Hydra only loads plugins from there).
Nothing here imports torch at module level: Hydra imports the plugins on every start.
"""

# How many distinct failure reasons a sweep's status lists (em-sweep status/resubmit --reasons).
REASONS_SHOWN = 10
