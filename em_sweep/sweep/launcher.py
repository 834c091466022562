"""Hydra launchers for planned sweeps: SLURM job arrays through submitit, or this process.

The SLURM launcher pickles the Hydra context once, packs ``runs_per_task`` runs per array task
(runs of one model together), submits the packs with submitit ``map_array`` in chunks whose
indices stay below the cluster's ``MaxArraySize``, each with a ``%`` throttle, appends every
chunk to the manifest as soon as it is queued, and returns; ``wait=true`` blocks until the
sweep's tasks have left the queue. ``dry_run=true`` prints the plan and submits nothing.

The Hydra plugin classes are thin subclasses in ``hydra_plugins/em_sweep_plugins``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from em_sweep.config import ConfigError
from em_sweep.sweep import cost, manifest
from em_sweep.sweep.plan import PlannedRun, SweepError, SweepPlan, plan_sweep
from em_sweep.sweep.worker import LaunchContext, PackFailed, SweepTask, run_packed

log = logging.getLogger(__name__)

# SLURM's own default, assumed for a dry-run plan when the cluster cannot be asked.
DEFAULT_MAX_ARRAY_SIZE = 1001


@dataclass
class SweepLauncherConf:
    """Settings shared by em-sweep's launchers."""

    # Validate and print the plan (runs, tasks, already complete, cost); submit nothing.
    dry_run: bool = False
    # Measured figures the plan's GPU-hours are computed from (em_sweep/sweep/cost.py);
    # null = the checkout's benchmarks/results/measured.json.
    cost_figures: str | None = None


@dataclass
class SlurmLauncherConf(SweepLauncherConf):
    """Submit a sweep to SLURM as job arrays (``hydra/launcher=slurm``)."""

    _target_: str = "hydra_plugins.em_sweep_plugins.EmSweepSlurmLauncher"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # GPUs of one array task. With train.parallel=fsdp runs, one run spans them: the task is one
    # srun step of gpus_per_task processes (one per GPU, ranks of one FSDP run; docs/cluster.md).
    gpus_per_task: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    # Time limit of one array task (all its packed runs), minutes.
    timeout_min: int = 60
    # Most array tasks running at once over the whole sweep (split over its arrays: the `%` throttle).
    array_parallelism: int = 256
    # Runs per array task, run in one process sharing one loaded model.
    runs_per_task: int = 1
    # Processes per array task running its runs at once on the task's GPU(s), each with its own
    # model copy (run i in process i mod n): for models small enough that several runs fit one
    # card (peak memory x n below the card's). 1 = the runs one after another in one process.
    # With CUDA MPS (e.g. `nvidia-cuda-mps-control -d` in `setup`) their kernels overlap. With
    # gpus_per_task > 1 process i gets visible GPU i mod n. Not for eval.backend=vllm runs: each
    # process would size vLLM's memory share from the same free memory.
    parallel_runs: int = 1
    # Cap on tasks per array below MaxArraySize (null: MaxArraySize as `scontrol show config` reports).
    max_tasks_per_array: int | None = None
    # Requeues after a time limit; each requeue carries only the task's unfinished runs.
    max_num_timeout: int = 3
    # Seconds before the time limit at which SLURM sends USR2 so the task can requeue itself.
    signal_delay_s: int = 120
    job_name: str = "em-sweep-${name}"
    # Extra sbatch options, e.g. {constraint: a100, exclusive: true}.
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # Shell lines run before the task starts (module load, environment activation).
    setup: list[str] = field(default_factory=list)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # Block until the sweep's tasks have left the queue, then report (off: submit and return).
    wait: bool = False
    # Seconds between queue checks while waiting.
    poll_s: float = 10.0


@dataclass
class LocalLauncherConf(SweepLauncherConf):
    """Run a sweep's pending runs one after another in this process, sharing one loaded model."""

    _target_: str = "hydra_plugins.em_sweep_plugins.EmSweepLocalLauncher"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def slurm_max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it). Raises SweepError without SLURM."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise SweepError("SLURM is not available: no `sbatch`/`scontrol` on PATH. Run from a SLURM login node, "
                         "or use hydra/launcher=local to run here.")
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SweepError("SLURM is not reachable: `scontrol show config` timed out after 60 s") from None
    if result.returncode != 0:
        raise SweepError(f"SLURM is not reachable: `scontrol show config` failed: {_first_line(result.stderr)}")
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def pack_runs(runs: Sequence[PlannedRun], runs_per_task: int) -> list[list[PlannedRun]]:
    """Group runs into tasks of ``runs_per_task``, runs of one model next to each other."""
    if runs_per_task < 1:
        raise SweepError(f"hydra.launcher.runs_per_task: must be >= 1, got {runs_per_task}")
    ordered = sorted(runs, key=lambda r: r.model_path)  # stable: Hydra's order within a model
    return [ordered[i:i + runs_per_task] for i in range(0, len(ordered), runs_per_task)]


def array_chunks(n_tasks: int, max_array_size: int, max_tasks_per_array: int | None) -> list[range]:
    """Task index ranges, one per array; each array's indices run 0..len-1 < MaxArraySize."""
    size = max(1, min(max_array_size, max_tasks_per_array or max_array_size))
    return [range(start, min(start + size, n_tasks)) for start in range(0, n_tasks, size)]


def array_layout(n_tasks: int, max_array_size: int, settings: dict[str, Any]) -> tuple[list[range], int]:
    """The arrays to submit and the `%` throttle of each (the sweep-wide parallelism shared between them)."""
    chunks = array_chunks(n_tasks, max_array_size, settings.get("max_tasks_per_array"))
    per_array = max(1, settings["array_parallelism"] // len(chunks)) if chunks else 0
    return chunks, per_array


def _executor_parameters(settings: dict[str, Any]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from the launcher settings."""
    params: dict[str, Any] = {
        "time": settings["timeout_min"],
        "cpus_per_task": settings["cpus_per_task"],
        "job_name": settings["job_name"],
        "signal_delay_s": settings["signal_delay_s"],
        "additional_parameters": dict(settings["additional_parameters"]),
        "setup": list(settings["setup"]),
    }
    for key in ("partition", "account", "qos", "gpus_per_task"):
        if settings.get(key) is not None:
            params[key] = settings[key]
    ranks = int(settings.get("ranks_per_task") or 1)
    if ranks > 1:
        # train.parallel=fsdp: srun starts one process per GPU, each seeing all of the task's GPUs
        # (rank i uses GPU i); a rank that fails ends the others instead of leaving them waiting.
        params.pop("gpus_per_task", None)
        params.update(nodes=1, ntasks_per_node=ranks, gpus_per_node=ranks, srun_args=["--kill-on-bad-exit=1"])
    if settings.get("mem_gb") is not None:
        params["mem"] = f"{int(settings['mem_gb'] * 1024)}MB"
    return params


def submit_to_slurm(sweep_dir: Path, runs: Sequence[PlannedRun], settings: dict[str, Any],
                    max_array_size: int | None = None) -> list[str]:
    """Submit ``runs`` as chunked, throttled arrays of packed tasks; returns the array job ids.

    Each chunk is appended to the manifest as soon as SLURM accepted it, so a failure part-way
    leaves an exact record of what is queued. The sweep's context file must exist.
    """
    import submitit  # lazy: Hydra imports the plugins at every start

    max_array_size = max_array_size or slurm_max_array_size()
    packs = pack_runs(runs, settings["runs_per_task"])
    chunks, per_array = array_layout(len(packs), max_array_size, settings)
    executor = submitit.SlurmExecutor(folder=settings["submitit_folder"], max_num_timeout=settings["max_num_timeout"])
    executor.update_parameters(**_executor_parameters(settings), array_parallelism=per_array)
    task = SweepTask(str(Path(sweep_dir).absolute() / manifest.CONTEXT), settings.get("parallel_runs", 1))
    array_ids = []
    for chunk in chunks:
        chunk_packs = [packs[i] for i in chunk]
        try:
            jobs = executor.map_array(task, chunk_packs)
        except Exception as e:  # sbatch refused: say why in one line, keep what was queued
            done = f"; {len(array_ids)} earlier arrays were queued (see manifest)" if array_ids else ""
            raise SweepError(f"sbatch failed: {_first_line(str(e)) or type(e).__name__}{done}") from None
        submitted_at = time.time()
        manifest.append_manifest(sweep_dir, (manifest.ManifestEntry(run, job.job_id, submitted_at)
                                             for job, pack in zip(jobs, chunk_packs, strict=True) for run in pack))
        array_ids.append(jobs[0].job_id.split("_")[0])
    return array_ids


def sharded_ranks(pending: Sequence[PlannedRun], sharded: frozenset[str], settings: dict[str, Any]) -> int:
    """Processes per array task: gpus_per_task for a sweep of train.parallel=fsdp runs, else 1.

    SweepError for a sweep that mixes sharded and single-process runs (their tasks differ in
    shape) or packs sharded runs into parallel processes."""
    n = sum(r.run_id in sharded for r in pending)
    if n == 0:
        return 1
    if n < len(pending):
        raise SweepError(f"train.parallel: {n} of {len(pending)} runs use fsdp and the others not; "
                         "submit them as two sweeps (their array tasks differ in shape)")
    if int(settings.get("parallel_runs", 1)) > 1:
        raise SweepError("hydra.launcher.parallel_runs: must be 1 for train.parallel=fsdp runs "
                         "(one run already spans the task's GPUs)")
    return int(settings.get("gpus_per_task") or 1)


def wait_for_tasks(sweep_dir: Path, poll_s: float) -> None:
    """Block until none of the sweep's submitted tasks is queued or running."""
    job_ids = {e.job_id for e in manifest.read_manifest(sweep_dir).values()}
    while True:
        live = manifest.live_slurm_tasks()
        if live is None or not (job_ids & live):
            return
        time.sleep(poll_s)


class SweepLauncher(Launcher):
    """Base of em-sweep's launchers: plans a batch handed over by any sweeper, prints plans, dry-runs."""

    kind = "abstract"

    def __init__(self, **settings: Any) -> None:
        self.settings = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                         for k, v in settings.items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    @property
    def sweep_dir(self) -> Path:
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Entry from a stock sweeper: plan the batch here (em-sweep's sweeper calls launch_plan directly)."""
        assert self.hydra_context is not None and self.config is not None
        plan = plan_sweep(self.hydra_context.config_loader, self.config, job_overrides)
        return self.launch_plan(plan)

    def launch_plan(self, plan: SweepPlan) -> Sequence[JobReturn]:
        raise NotImplementedError

    def describe(self, plan: SweepPlan, tasks_line: str) -> str:
        pending = plan.pending
        lines = [
            f"em-sweep plan: {len(plan.runs)} runs ({plan.n_jobs} jobs, {plan.n_group_combinations} compositions; "
            f"every config validated in {plan.seconds:.1f}s)",
            f"  already complete: {len(plan.complete)}",
        ]
        if plan.queued:
            lines.append(f"  already queued:   {len(plan.queued)} (submitted earlier to this sweep, not resubmitted)")
        lines.append(f"  to run:           {len(pending)} runs {tasks_line}")
        try:
            figures = cost.load_figures(self.settings.get("cost_figures"))
        except ConfigError as e:
            raise SweepError(str(e)) from None
        lines += cost.describe(cost.estimate((plan.works[r.run_id] for r in pending if r.run_id in plan.works),
                                             figures), len(pending))
        lines.append(f"  sweep dir:        {self.sweep_dir}")
        return "\n".join(lines)

    def write_context(self) -> Path:
        assert self.hydra_context is not None and self.config is not None
        path = self.sweep_dir / manifest.CONTEXT
        LaunchContext(self.hydra_context, self.config, Singleton.get_state(), os.getcwd()).save(path)
        return path


class SlurmSweepLauncher(SweepLauncher):
    """Chunked, throttled, packed SLURM arrays through submitit; returns once queued (unless ``wait``)."""

    kind = "slurm"

    def launch_plan(self, plan: SweepPlan) -> Sequence[JobReturn]:
        settings = self.settings
        dry_run = bool(settings["dry_run"])
        if int(settings.get("parallel_runs", 1)) < 1:
            raise SweepError(f"hydra.launcher.parallel_runs: must be >= 1, got {settings['parallel_runs']}")
        try:
            max_array_size = slurm_max_array_size()
            where = f"MaxArraySize {max_array_size}"
        except SweepError as e:
            if not dry_run:
                raise
            max_array_size, where = DEFAULT_MAX_ARRAY_SIZE, f"SLURM not reachable, assumed MaxArraySize {DEFAULT_MAX_ARRAY_SIZE}: {e}"
        previous = manifest.read_manifest(self.sweep_dir)
        if previous:
            live = manifest.live_slurm_tasks() or set()
            plan.queued = frozenset(e.run.run_id for e in previous.values()
                                    if e.job_id in live and e.run.run_id not in plan.complete)
        pending = plan.pending
        settings = {**settings, "ranks_per_task": sharded_ranks(pending, plan.sharded, settings)}
        n_tasks = math.ceil(len(pending) / max(1, settings["runs_per_task"]))
        chunks, throttle = array_layout(n_tasks, max_array_size, settings)
        at_once = f", {settings['parallel_runs']} at once" if settings.get("parallel_runs", 1) > 1 else ""
        if settings["ranks_per_task"] > 1:
            at_once += f", each run across {settings['ranks_per_task']} GPUs (train.parallel=fsdp)"
        print(self.describe(plan, f"in {n_tasks} array tasks ({settings['runs_per_task']} per task{at_once}), "
                                  f"{len(chunks)} array(s) of <= {len(chunks[0]) if chunks else 0} tasks "
                                  f"({where}), <= {throttle} running per array"), flush=True)
        if dry_run:
            print("dry run: nothing submitted", flush=True)
            return []
        manifest.append_already_complete(self.sweep_dir, plan.runs, plan.complete)
        if not pending:
            print("nothing to submit", flush=True)
            return []
        self.write_context()
        # Absolute paths and the launch directory, so `em-sweep resubmit` works from anywhere and
        # tasks start where the launch ran (the checkout is importable, relative paths hold).
        settings = {**settings, "submitit_folder": str(Path(settings["submitit_folder"]).absolute()),
                    "additional_parameters": {"chdir": os.getcwd(), **settings["additional_parameters"]}}
        manifest.write_launcher_settings(self.sweep_dir, {"kind": self.kind, **settings})
        started = time.perf_counter()
        array_ids = submit_to_slurm(self.sweep_dir, pending, settings, max_array_size)
        print(f"submitted {len(pending)} runs as {len(array_ids)} array(s) ({', '.join(array_ids)}) in "
              f"{time.perf_counter() - started:.1f}s; follow with: em-sweep status {self.sweep_dir}", flush=True)
        if settings["wait"]:
            wait_for_tasks(self.sweep_dir, settings["poll_s"])
            statuses = manifest.sweep_status(self.sweep_dir)
            print(manifest.format_status(self.sweep_dir, statuses), flush=True)
            # This launch's runs (earlier entries of the sweep may name runs whose inputs changed since).
            planned = {r.run_dir for r in plan.runs}
            unfinished = [s for s in statuses if s.state != manifest.DONE and s.entry.run.run_dir in planned]
            if unfinished:
                raise SweepError(f"{len(unfinished)} of {len(planned)} runs did not complete "
                                 f"(em-sweep status {self.sweep_dir})")
        return []


class LocalSweepLauncher(SweepLauncher):
    """Runs the pending runs here, in order, with one model cache (no reload between runs of one model)."""

    kind = "local"

    def launch_plan(self, plan: SweepPlan) -> Sequence[JobReturn]:
        assert self.hydra_context is not None and self.config is not None
        pending = sorted(plan.pending, key=lambda r: r.model_path)
        print(self.describe(plan, "in this process"), flush=True)
        if self.settings["dry_run"]:
            print("dry run: nothing run", flush=True)
            return []
        manifest.append_already_complete(self.sweep_dir, plan.runs, plan.complete)
        if not pending:
            return []
        submitted_at = time.time()
        manifest.append_manifest(self.sweep_dir, (manifest.ManifestEntry(r, "local", submitted_at) for r in pending))
        context = LaunchContext(self.hydra_context, self.config, Singleton.get_state(), os.getcwd())
        try:
            outcomes = run_packed(context, pending)
        except PackFailed as e:
            raise SweepError(str(e)) from None
        print(f"completed {sum(v == 'done' for v in outcomes.values())} runs", file=sys.stdout, flush=True)
        return []
