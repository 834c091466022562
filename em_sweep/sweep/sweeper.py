"""A Hydra sweeper that validates a whole grid in seconds and hands em-sweep's launchers a plan.

Hydra's BasicSweeper composes every job to validate it before the launcher composes it again.
This one expands the same overrides the same way (``hydra.sweeper.params`` from presets, then
the command line; cartesian product in BasicSweeper's order), then plans the sweep with
:func:`em_sweep.sweep.plan.plan_sweep`: every run validated, run ids computed, complete runs
skipped. em-sweep's launchers take the plan as is; any other launcher (Hydra's basic one) gets
the pending runs' overrides as an ordinary batch, recorded in the sweep's manifest first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from em_sweep.sweep import manifest
from em_sweep.sweep.hydra_compat import BasicSweeper
from em_sweep.sweep.launcher import SweepLauncher
from em_sweep.sweep.plan import expand_jobs, plan_sweep

log = logging.getLogger(__name__)


@dataclass
class SweeperConf:
    """``hydra/sweeper=em_sweep``."""

    _target_: str = "hydra_plugins.em_sweep_plugins.EmSweepSweeper"
    # Swept keys of a preset, as BasicSweeper's: {key: "v1,v2" | "range(8)" | ...}.
    params: dict[str, str] | None = None
    # Also check every distinct model.path before submitting (hub ids: local HF cache, then the
    # hub; ~25 s per id where there is no network). The worker checks it again before loading.
    check_model_paths: bool = False


class FastSweeper(BasicSweeper):
    """BasicSweeper's grammar and order; one composition per config-group combination."""

    def __init__(self, params: dict[str, str] | None = None, check_model_paths: bool = False) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.check_model_paths = check_model_paths

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        # hydra.sweeper.params first, then the command line: BasicSweeper's order.
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        jobs = expand_jobs(loader, params + list(arguments))
        plan = plan_sweep(loader, self.config, jobs, check_model_paths=self.check_model_paths)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if isinstance(self.launcher, SweepLauncher):
            return self.launcher.launch_plan(plan)
        manifest.append_already_complete(sweep_dir, plan.runs, plan.complete)
        pending: Sequence[Sequence[str]] = [list(r.overrides) for r in plan.pending]
        log.info("%d runs planned, %d already complete, %d to launch", len(plan.runs), len(plan.complete),
                 len(pending))
        if not pending:
            return []
        # Recorded like em-sweep's own local launcher does, so `em-sweep status` covers these runs too.
        submitted_at = time.time()
        manifest.append_manifest(sweep_dir, (manifest.ManifestEntry(r, "local", submitted_at) for r in plan.pending))
        return [self.launcher.launch(pending, initial_job_idx=0)]
