"""Recording a run: local files (the source of truth) and a W&B mirror that can never fail a run.

W&B is optional at every turn: init and finish are bounded by a timeout, any exception turns
the mirror off for the rest of the run (with one warning), and nothing but the resolved config
and metrics is sent (never the environment, so no API key lands in a file or log).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from em_sweep import rundir

log = logging.getLogger(__name__)


def _bounded(fn: Callable[[], Any], timeout_s: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, result or exception)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return False, TimeoutError(f"timed out after {timeout_s:.0f}s")
    return "error" not in box, box.get("error", box.get("value"))


def project_for(project: str, run_id: str, shards: int) -> str:
    """The W&B project of a run: ``project`` itself, or with ``shards`` > 1 ``project-<k>`` where
    k = the (hex) run id mod ``shards``: stable across restarts, even across a sweep's projects."""
    return project if shards <= 1 else f"{project}-{int(run_id, 16) % shards}"


class WandbMirror:
    """Mirrors metrics to W&B (offline by default: run files under ``<run_dir>/wandb``)."""

    def __init__(self, logger_cfg: Any, run_dir: Path, run_id: str, group: str, config: Mapping[str, Any],
                 tags: list[str] | None = None, attempt: int = 1) -> None:
        """``attempt`` > 1 (a restart, which logs from step 0 again) gets a W&B run of its own,
        ``<run_id>-<attempt>``, named ``run_id``: W&B drops steps a resumed run has already logged."""
        self.run: Any = None
        self.timeout = float(logger_cfg.init_timeout_s)
        if logger_cfg.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("W&B: wandb is not installed; logging to local files only")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        project = project_for(logger_cfg.project, run_id, int(getattr(logger_cfg, "project_shards", 1)))

        def init() -> Any:
            return wandb.init(project=project, entity=logger_cfg.entity, group=group,
                              id=run_id if attempt == 1 else f"{run_id}-{attempt}", name=run_id,
                              resume="allow", dir=str(run_dir), mode=logger_cfg.mode, config=dict(config),
                              tags=tags or [], reinit="finish_previous",
                              settings=wandb.Settings(init_timeout=self.timeout, console="off", x_disable_stats=True))

        ok, value = _bounded(init, self.timeout + 5)
        if ok:
            self.run = value
        else:
            log.warning("W&B: init failed (%s); logging to local files only", _one_line(value))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as e:  # noqa: BLE001 - W&B must never fail a run
            log.warning("W&B: log failed (%s); logging to local files only from now on", _one_line(e))
            self.run = None

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(dict(values))
        except Exception as e:  # noqa: BLE001
            log.warning("W&B: summary failed (%s)", _one_line(e))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        ok, value = _bounded(lambda: run.finish(exit_code=exit_code), self.timeout)
        if not ok:
            log.warning("W&B: finish failed (%s); the local files are complete", _one_line(value))


def _one_line(e: Any) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class RunRecorder:
    """Writes metrics.jsonl and eval_records.jsonl in the run directory and mirrors to W&B."""

    def __init__(self, run_dir: Path, wandb_mirror: WandbMirror) -> None:
        self.dir = run_dir
        self.wandb = wandb_mirror

    def step(self, metrics: Mapping[str, Any]) -> None:
        rundir.append_jsonl(self.dir / rundir.METRICS, {"kind": "train", **metrics})
        # EM steps under train/, RL steps under rl/, the stopping probe's signals under stop/ (numbers
        # only: the stage name is the prefix).
        prefix = {"rl": "rl", "probe": "stop"}.get(str(metrics.get("stage")), "train")
        self.wandb.log({f"{prefix}/{k}": float(v) if isinstance(v, bool) else v for k, v in metrics.items()
                        if k not in ("step", "stage") and isinstance(v, int | float)}, step=int(metrics["step"]))

    def eval(self, step: int, scores: list[dict[str, Any]], records: list[dict[str, Any]],
             primary_temperature: float) -> None:
        for s in scores:
            rundir.append_jsonl(self.dir / rundir.METRICS, {"kind": "eval", **s})
        with open(self.dir / "eval_records.jsonl", "a") as f:
            for r in records:
                f.write(rundir.json_line(r))
        # Metric names carry the benchmark only; other eval temperatures live in results.json.
        # Code and logic benchmarks add pass@<k> and accuracy_people<k> (em_sweep.families).
        self.wandb.log({f"eval/{s['benchmark']}/{k}": s[k] for s in scores
                        if s["temperature"] == primary_temperature
                        for k in s if k in ("accuracy", "pass_at_n", "boxed_rate")
                        or k.startswith(("pass@", "accuracy_people"))}, step=step)
