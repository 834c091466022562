"""Recording a run: local files (the source of truth) and a W&B mirror that can never hold a run.

W&B is optional at every turn. Every call into it (init, log, summary, finish, and the
teardown wandb runs when the interpreter exits) runs in a daemon thread bounded by
``logger.init_timeout_s``; any exception turns the mirror off for the rest of the run (with one
warning). A call that does not return in time marks W&B hung for the whole process: the W&B
service process this process started is stopped (killed) so that nothing, wandb's own exit hook
included, can wait for it, and later runs of the process (packed runs) skip W&B at once instead of
paying the timeout again. Nothing but the resolved config and metrics is sent (never the
environment, so no API key lands in a file or log).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_sweep import rundir

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import LoggerConfig

log = logging.getLogger(__name__)

# Why W&B is off for the rest of this process (a call into it did not return in time), or None.
_hung: str | None = None
# Seconds the exit teardown may take (the last mirror's logger.init_timeout_s); None: no W&B run yet.
_exit_timeout_s: float | None = None
# Once hung, the exit teardown gets at most this long: the service is gone, nothing is left to flush.
_HUNG_EXIT_TIMEOUT_S = 5.0


def _bounded(fn: Callable[[], Any], timeout_s: float, what: str, slow_s: float | None = None) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished without error, result or exception).

    A call still running after ``timeout_s`` -- or one that fails only after ``slow_s`` (default
    ``timeout_s``; wandb's own init timeout against an unreachable server) -- marks W&B hung for
    the process (:func:`_mark_hung`).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t0 = time.monotonic()
    t = threading.Thread(target=target, daemon=True, name=f"em-sweep-wandb-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        _mark_hung(f"{what} did not return within {timeout_s:g}s")
        t.join(1.0)  # the service is gone now: the call usually fails at once; never wait longer
        return False, TimeoutError(f"{what} timed out after {timeout_s:g}s")
    if "error" in box and time.monotonic() - t0 >= (timeout_s if slow_s is None else slow_s):
        _mark_hung(f"{what} failed after {time.monotonic() - t0:.0f}s ({_one_line(box['error'])})")
    return "error" not in box, box.get("error", box.get("value"))


def _mark_hung(reason: str) -> None:
    """W&B is off for the rest of this process; its service process (if ours) is stopped."""
    global _hung
    if _hung is None:
        _hung = reason
        log.warning("W&B: %s; W&B is off for the rest of this process (later runs log to local files only)",
                    reason)
    _kill_service()


def _service_pids() -> list[int]:
    """Process ids of the W&B service processes (``wandb-core``) this process started."""
    me, pids = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: the parent pid follows the last ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] != me:
                continue
            argv0 = (stat.parent / "cmdline").read_bytes().split(b"\0", 1)[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if os.path.basename(argv0).startswith(b"wandb-core"):
            pids.append(int(stat.parent.name))
    return pids


def _kill_service() -> None:
    """SIGKILL this process's W&B service processes (a stopped process takes SIGKILL too), so
    calls blocked on them fail and wandb's exit hook, which waits for them, returns."""
    for pid in _service_pids():
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("W&B: stopped its unresponsive service process %d", pid)
        except OSError:
            pass


def _teardown_at_exit() -> None:
    """wandb's interpreter-exit teardown, bounded: runs before wandb's own exit hook (registered
    after it) and unregisters that one; a teardown that does not finish in time marks W&B hung,
    which kills the service the teardown waits for."""
    wandb = sys.modules.get("wandb")
    if wandb is None or _exit_timeout_s is None:
        return
    timeout = min(_exit_timeout_s, _HUNG_EXIT_TIMEOUT_S) if _hung else _exit_timeout_s
    ok, value = _bounded(wandb.teardown, timeout, "teardown at exit")
    if not ok and _hung is None:  # once hung, a failing teardown is expected and was reported
        log.warning("W&B: teardown at exit failed (%s)", _one_line(value))


def _arm_exit_teardown(timeout_s: float) -> None:
    """(Re-)register :func:`_teardown_at_exit` so it runs before every exit hook wandb has
    registered so far (atexit runs the last registered first)."""
    global _exit_timeout_s
    _exit_timeout_s = timeout_s
    atexit.unregister(_teardown_at_exit)
    atexit.register(_teardown_at_exit)


def project_for(project: str, run_id: str, shards: int) -> str:
    """The W&B project of a run: ``project`` itself, or with ``shards`` > 1 ``project-<k>`` where
    k = the (hex) run id mod ``shards``: stable across restarts, even across a sweep's projects."""
    return project if shards <= 1 else f"{project}-{int(run_id, 16) % shards}"


class WandbMirror:
    """Mirrors metrics to W&B (offline by default: run files under ``<run_dir>/wandb``)."""

    def __init__(self, logger_cfg: LoggerConfig, run_dir: Path, run_id: str, group: str, config: Mapping[str, Any],
                 tags: list[str] | None = None, attempt: int = 1) -> None:
        """``attempt`` > 1 (a restart, which logs from step 0 again) gets a W&B run of its own,
        ``<run_id>-<attempt>``, named ``run_id``: W&B drops steps a resumed run has already logged."""
        self.run: Any = None
        self.timeout = float(logger_cfg.init_timeout_s)
        if logger_cfg.mode == "disabled":
            return
        if _hung is not None:
            log.warning("W&B: off in this process since %s; logging to local files only", _hung)
            return
        try:
            import wandb
        except ImportError:
            log.warning("W&B: wandb is not installed; logging to local files only")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        # wandb's own usage telemetry: sent to the server besides our metrics, and its exit hook
        # waits up to ~30 s for an unreachable server. Only the config and metrics are sent.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        project = project_for(logger_cfg.project, run_id, int(logger_cfg.project_shards))

        def init() -> Any:
            return wandb.init(project=project, entity=logger_cfg.entity, group=group,
                              id=run_id if attempt == 1 else f"{run_id}-{attempt}", name=run_id,
                              resume="allow", dir=str(run_dir), mode=logger_cfg.mode, config=dict(config),
                              tags=tags or [], reinit="finish_previous",
                              settings=wandb.Settings(init_timeout=self.timeout, x_service_wait=self.timeout,
                                                      console="off", x_disable_stats=True))

        # wandb gives up after init_timeout itself (an unreachable server); 5 s more for it to say so.
        # A failure that took (nearly) that long is a timeout too: 10% slack for the clock of the service.
        ok, value = _bounded(init, self.timeout + 5, "init", slow_s=0.9 * self.timeout)
        _arm_exit_teardown(self.timeout)  # after init: wandb registers its exit hook while starting its service
        if ok:
            self.run = value
        elif _hung is None:  # (a hang was reported as such)
            log.warning("W&B: init failed (%s); logging to local files only", _one_line(value))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is None:
            return
        run = self.run
        ok, value = _bounded(lambda: run.log(dict(metrics), step=step), self.timeout, "log")
        if not ok:
            log.warning("W&B: log failed (%s); logging to local files only from now on", _one_line(value))
            self.run = None

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        run = self.run
        ok, value = _bounded(lambda: run.summary.update(dict(values)), self.timeout, "summary")
        if not ok:
            log.warning("W&B: summary failed (%s)", _one_line(value))
            if _hung:
                self.run = None  # nothing left to finish

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        ok, value = _bounded(lambda: run.finish(exit_code=exit_code), self.timeout, "finish")
        _arm_exit_teardown(self.timeout)
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
        # Code and logic benchmarks add pass@<k> and accuracy_people<k> (em_sweep.evaluation.families).
        self.wandb.log({f"eval/{s['benchmark']}/{k}": s[k] for s in scores
                        if s["temperature"] == primary_temperature
                        for k in s if k in ("accuracy", "pass_at_n", "boxed_rate")
                        or k.startswith(("pass@", "accuracy_people"))}, step=step)
