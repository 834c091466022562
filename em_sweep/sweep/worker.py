"""What one array task runs: a pack of planned runs in one process, sharing one loaded model.

Each run is composed here the stock Hydra way (``load_sweep_config``, as Hydra's own launchers
do on their workers), checked against its planned run id, and run with ``em_sweep.run.run``.
A failing run is recorded in its ``status.json`` and the pack moves on. On preemption or time
limit, submitit signals the task (USR2) and calls :meth:`SweepTask.checkpoint`, which requeues
the task with only its unfinished runs.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict, read_write

from em_sweep import rundir
from em_sweep.sweep.plan import PlannedRun

log = logging.getLogger(__name__)

# Set when submitit has asked this task to checkpoint (USR2): the task is being requeued, so
# whatever happens to the run in progress from then on is an interruption, not a failure.
# (Seen on the test cluster: `scontrol requeue` itself can die of the SIGTERM the requeue sends,
# and that error surfaces inside the run, not as SystemExit.)
_requeue_requested = threading.Event()


class PackFailed(RuntimeError):
    """Some runs of a packed task failed (each one's status.json says why); the others completed."""


@dataclass
class LaunchContext:
    """What a worker needs to compose any run of a sweep, pickled once per sweep.

    Hydra's submitit launcher pickles its launcher and Hydra's global state into every job
    (~65 KB each); here it is written once to the sweep directory and each task only carries
    its runs and this file's path.
    """

    hydra_context: HydraContext
    master_config: DictConfig
    singleton_state: dict[Any, Any]
    # The launch directory: relative paths in configs (paths.root) are relative to it.
    cwd: str

    def save(self, path: Path) -> None:
        import cloudpickle  # submitit's own dependency; pickles by value what a plain pickle cannot

        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(cloudpickle.dumps(self))
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> LaunchContext:
        context = pickle.loads(Path(path).read_bytes())
        assert isinstance(context, LaunchContext)
        return context

    def activate(self) -> None:
        """Install Hydra's global state and the launch directory in this process."""
        Singleton.set_state(self.singleton_state)
        setup_globals()
        os.chdir(self.cwd)

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The run's config as Hydra's launchers build it for a job (hydra node set globally, then removed)."""
        config = self.hydra_context.config_loader.load_sweep_config(self.master_config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.id = os.environ.get("SLURM_JOB_ID", "local")
        HydraConfig.instance().set_config(config)
        task_config = copy.deepcopy(config)
        with read_write(task_config), open_dict(task_config):
            del task_config["hydra"]
        return task_config


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _record_failure(path: Path, error: Exception, recorded_by_run: bool) -> str:
    """Log a failed run; write its status unless run() already did (RunFailed) -- returns the outcome."""
    if recorded_by_run or not _writes():
        # run() recorded the failure itself, or another process owns the run dir right now:
        # either way its status.json is not ours to write.
        log.error("run %s failed: %s", path.name, error)
        return f"failed: {error}"
    reason = _one_line(error)  # bad input, composition error: nothing recorded yet
    rundir.write_status(path, "failed", reason=reason)
    log.error("run %s failed before starting: %s", path.name, reason)
    return f"failed: {reason}"


def run_packed(context: LaunchContext, runs: Sequence[PlannedRun]) -> dict[str, str]:
    """Run ``runs`` in turn with one model cache; returns run id -> done | skipped | failed: reason.

    Never stops at a failing run. Raises PackFailed at the end when any run failed, so SLURM
    marks the task failed while every other run of the pack still completed.
    An interruption (KeyboardInterrupt, SystemExit, or anything once a requeue was requested)
    marks the run in progress pending and propagates at once: the requeued task reruns it.
    """
    outcomes = _run_each(context, runs)
    _raise_if_failed(outcomes, len(runs))
    return outcomes


def _raise_if_failed(outcomes: dict[str, str], n_runs: int) -> None:
    failed = {k: v for k, v in outcomes.items() if v.startswith("failed")}
    if failed:
        raise PackFailed(f"{len(failed)} of {n_runs} runs failed: " + "; ".join(f"{k} {v}" for k, v in failed.items()))


def _writes() -> bool:
    """Whether this process writes run files: one per task, or rank 0 of a train.parallel=fsdp task."""
    return int(os.environ.get("RANK", "0")) == 0


def _ranks() -> int:
    """Processes of this task that run each run together (train.parallel=fsdp), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _mark_interrupted(path: Path) -> None:
    """The run did not fail, it was stopped (requeue, cancel): pending, to restart cleanly."""
    if _writes():
        rundir.write_status(path, "pending", reason="interrupted (preempted, time limit or cancelled)")


def _run_each(context: LaunchContext, runs: Sequence[PlannedRun],
              report: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """The runs in turn on one model cache; ``report(run_id, outcome)`` as each outcome is known."""
    from em_sweep.models import ModelCache  # lazy: torch
    from em_sweep.run import RunFailed, run

    cache = ModelCache()
    outcomes: dict[str, str] = {}

    def record(run_id: str, outcome: str) -> None:
        outcomes[run_id] = outcome
        if report is not None:
            report(run_id, outcome)

    for planned in runs:
        path = Path(planned.run_dir)
        if _ranks() == 1 and rundir.is_complete(path):  # ranks of one run: rank 0 decides, in run()
            record(planned.run_id, "skipped")
            continue
        log.info("run %s: %s", planned.run_id, " ".join(planned.overrides))
        try:
            cfg = context.compose(planned.overrides)
            composed_dir = rundir.run_dir_for(cfg)
            if composed_dir != path:
                raise RuntimeError(f"planned run dir {path}, but the config composed now gives {composed_dir}: "
                                   "conf/ or an input (prompt pool, benchmark file, model files, a hub model "
                                   "downloaded since) changed since the sweep was launched (re-launch it), or "
                                   "the planner and Hydra disagree (please report)")
            run(cfg, cache=cache)
            record(planned.run_id, "done")
        except BaseException as e:
            interrupted = isinstance(e, SystemExit | KeyboardInterrupt) or _requeue_requested.is_set()
            if not interrupted and isinstance(e, Exception):
                record(planned.run_id, _record_failure(path, e, isinstance(e, RunFailed)))
                if _ranks() > 1:  # the ranks may have stopped at different collectives: end the task
                    raise PackFailed(f"run {planned.run_id} failed on rank {os.environ.get('RANK')}; the "
                                     "task's later runs stay pending (em-sweep resubmit)") from None
                continue
            # submitit's requeue (USR2: preemption, time limit) or a cancel: the run did not fail,
            # it was stopped; it restarts cleanly when its task runs again.
            _mark_interrupted(path)
            raise
    return outcomes


def _interrupt_on_usr2(signum: int, frame: Any) -> None:
    _requeue_requested.set()
    raise KeyboardInterrupt("USR2: the task is being requeued")


def _run_share(context_path: str, runs: Sequence[PlannedRun], cpus: int | None, results: Any) -> None:
    """One process of a parallel task: its share of the runs, one after another (its own model
    copy); its outcomes go to ``results`` (a pipe end) as they are known, so a process that dies
    later loses none of them."""
    import signal

    # SLURM signals every process of the step: on USR2 (requeue) this process marks its run in
    # progress pending and stops; SIGTERM (the requeue's own, the parent's exit) must not kill it
    # half-way through writing that, so it is ignored (SLURM's SIGKILL still ends a stuck process).
    signal.signal(signal.SIGUSR2, _interrupt_on_usr2)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format=f"[%(asctime)s][%(name)s][%(levelname)s][pid {os.getpid()}] %(message)s")
    if cpus:
        import torch

        torch.set_num_threads(cpus)
    context = LaunchContext.load(Path(context_path))
    context.activate()
    _run_each(context, runs, report=lambda run_id, outcome: results.send({run_id: outcome}))
    results.close()


def _child_env(index: int) -> dict[str, str]:
    """Process ``index``'s GPU: the task's visible GPUs in turn (all processes on one GPU when it has one)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[index % len(visible)]} if len(visible) > 1 else {}


def run_parallel(context_path: str, runs: Sequence[PlannedRun], processes: int, cpus: int | None = None
                 ) -> dict[str, str]:
    """``runs`` spread over ``processes`` processes at once (run i goes to process i mod n), for
    models small enough that several copies and their runs fit the task's GPU(s); each process runs
    its share in turn with its own model cache (non-daemonic, so a run may start processes of its
    own). Outcomes as :func:`run_packed`, which it raises the same way. A process that dies (e.g.
    killed for memory) fails its run in progress with the exit code as reason; its later runs
    are reported not run (resubmit reruns both); the other processes go on."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot fork
    shares = [list(runs[i::processes]) for i in range(processes) if runs[i::processes]]
    per_process = max(1, cpus // len(shares)) if cpus else None
    children = []
    for index, share in enumerate(shares):
        receive, send = ctx.Pipe(duplex=False)
        saved = dict(os.environ)
        os.environ.update(_child_env(index))  # a spawned child copies the environment at start
        try:
            proc = ctx.Process(target=_run_share, args=(context_path, share, per_process, send), daemon=False)
            proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        send.close()
        children.append((proc, receive, share))
    outcomes: dict[str, str] = {}
    for proc, receive, share in children:
        while True:
            try:
                outcomes.update(receive.recv())
            except EOFError:  # the child closed its end: finished, or died
                break
        proc.join()
        if proc.exitcode != 0:
            reason = f"worker process died (exit code {proc.exitcode}{'; out of memory?' if proc.exitcode == -9 else ''})"
            for planned in share:
                if planned.run_id in outcomes:
                    continue
                path = Path(planned.run_dir)
                status = rundir.read_status(path) or {}
                if _requeue_requested.is_set():  # interrupted for a requeue: the run reruns
                    if status.get("state") in ("running", "failed"):
                        _mark_interrupted(path)
                    continue
                if status.get("state") == "running" and status.get("pid") == proc.pid:
                    rundir.write_status(path, "failed", reason=reason)
                    outcomes[planned.run_id] = f"failed: {reason}"
                else:
                    outcomes[planned.run_id] = f"failed: not run ({reason} before it)"
    _raise_if_failed(outcomes, len(runs))
    return outcomes


class SweepTask:
    """The callable submitit runs in each array task: ``task(runs)`` runs a pack from the sweep's context file."""

    def __init__(self, context_path: str, parallel_runs: int = 1) -> None:
        self.context_path = context_path
        self.parallel_runs = parallel_runs

    def __call__(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # one process per GPU, ranks of train.parallel runs
            from em_sweep.training.distributed import export_slurm_env

            export_slurm_env()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if self.parallel_runs > 1 and len(runs) > 1:
            return run_parallel(self.context_path, runs, self.parallel_runs, int(cpus) if cpus else None)
        if cpus:
            import torch

            # torch would use every core of the node; tasks sharing a node would oversubscribe it.
            torch.set_num_threads(int(cpus))
        context = LaunchContext.load(Path(self.context_path))
        context.activate()
        return run_packed(context, runs)

    def checkpoint(self, runs: Sequence[PlannedRun]) -> Any:
        """Called by submitit on USR2 (preemption, time limit): requeue with only the unfinished runs.

        The run in progress is interrupted; it restarts from scratch in the requeued task
        (``em_sweep.run.run`` clears partial files). Returns None (no requeue) when all are done.
        """
        import submitit

        unfinished = [r for r in runs if not rundir.is_complete(Path(r.run_dir))]
        if not unfinished:
            return None
        _requeue_requested.set()
        if self.parallel_runs > 1:
            # The worker processes mark their runs pending as USR2 reaches them; one that cannot (it
            # was killed, or has not handled the signal yet) leaves its run running: mark it here too.
            for r in unfinished:
                if (rundir.read_status(Path(r.run_dir)) or {}).get("state") == "running":
                    _mark_interrupted(Path(r.run_dir))
        log.warning("requeueing with %d of %d runs unfinished", len(unfinished), len(runs))
        return submitit.helpers.DelayedSubmission(self, unfinished)
