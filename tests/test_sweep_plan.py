"""Sweep planning without a cluster: expansion, validation, run ids, dry runs, chunking, status files."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from em_sweep import rundir
from em_sweep.sweep import manifest
from em_sweep.sweep.launcher import array_chunks, array_layout, pack_runs, slurm_max_array_size
from em_sweep.sweep.plan import PlannedRun, SweepError, expand_jobs, plan_sweep

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture
def loader():
    """Hydra's config loader over the project's conf/, and a multirun master config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config_loader = GlobalHydra.instance().config_loader()
        master = config_loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)
        yield config_loader, master


def full_compose_run_dir(config_loader, master, overrides) -> Path:
    """What Hydra's stock path gives for a job: a full composition, hydra node removed."""
    cfg = config_loader.load_sweep_config(master, list(overrides))
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return rundir.run_dir_for(cfg)


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_planned_run_ids_match_a_full_composition_for_every_run(loader, tmp_path):
    """The in-place plan must give exactly the run dir a full Hydra composition gives, run by run.

    The grid sweeps keys that interpolations read (temperature -> train.*_temperature,
    model.lr -> train.lr, paths.root -> paths.runs_dir), a group, and a list value; a second
    grid has a +key, which takes the full-composition path.
    """
    config_loader, master = loader
    jobs = expand_jobs(config_loader, [
        "model=tiny_arith,qwen25_math_1_5b", "seed=0,7", "temperature=0.1,1", "model.lr=1e-5,3e-5",
        f"paths.root={tmp_path}/a,{tmp_path}/b", "eval.temperatures=[0.0],[0.5,1.0]",
    ])
    plan = plan_sweep(config_loader, master, jobs)
    assert plan.n_jobs == len(jobs) == 64
    assert len(plan.runs) == 64 and not plan.complete
    for run in plan.runs:
        assert Path(run.run_dir) == full_compose_run_dir(config_loader, master, run.overrides), run.overrides

    added = plan_sweep(config_loader, master, expand_jobs(config_loader, ["model=tiny_arith,qwen25_math_1_5b",
                                                                           "seed=0,7", "+train.save_at_steps=[]"]))
    assert len(added.runs) == 4
    for run in added.runs:
        assert Path(run.run_dir) == full_compose_run_dir(config_loader, master, run.overrides), run.overrides


def test_jobs_that_are_the_same_run_are_planned_once_and_complete_runs_are_known(loader, tmp_path):
    config_loader, master = loader
    # seed=15 is the default: "seed=15" and no override name the same run.
    jobs = expand_jobs(config_loader, ["seed=15,15,3", f"paths.root={tmp_path}"])
    plan = plan_sweep(config_loader, master, jobs)
    assert plan.n_jobs == 3 and len(plan.runs) == 2
    done = Path(plan.runs[1].run_dir)
    rundir.write_json_atomic(done / rundir.RESULTS, {"run_id": done.name})  # done: verified results
    again = plan_sweep(config_loader, master, jobs)
    assert again.complete == {plan.runs[1].run_id}
    assert [r.run_id for r in again.pending] == [plan.runs[0].run_id]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.steps=2,-1"], ["train.steps", "train.steps=-1"]),
    (["seed=1,abc"], ["seed=abc", "seed"]),
    (["train.no_such_key=1,2"], ["train.no_such_key"]),
    (["model=tiny_arith,no_such_model"], ["model=no_such_model", "model/no_such_model"]),
    (["prompt.ids=[pi1],[nope]"], ["prompt.ids", "nope"]),
    (["train.batch_size=64,60"], ["train.batch_size", "train.batch_size=60"]),
])
def test_an_invalid_run_anywhere_rejects_the_grid_naming_run_and_key(loader, overrides, expected):
    config_loader, master = loader
    with pytest.raises(SweepError) as info:
        plan_sweep(config_loader, master, expand_jobs(config_loader, ["seed=0,1", *overrides]))
    message = str(info.value)
    assert "nothing was submitted" in message
    for text in expected:
        assert text in message, message


def test_every_run_sharing_a_bad_input_is_counted(loader):
    """Input checks are memoised; the memo must remember failures too."""
    config_loader, master = loader
    with pytest.raises(SweepError, match=r"^3 of 3 runs have an invalid config"):
        plan_sweep(config_loader, master, expand_jobs(config_loader, ["seed=0,1,2", "prompt.ids=[nope]"]))


def test_chunks_keep_array_indices_below_max_array_size_and_packs_group_models():
    chunks = array_chunks(2503, max_array_size=1001, max_tasks_per_array=None)
    assert [len(c) for c in chunks] == [1001, 1001, 501]
    assert all(len(c) <= 1001 for c in chunks)  # indices 0..len-1 < MaxArraySize
    assert sum(len(c) for c in chunks) == 2503 and chunks[1][0] == 1001
    assert [len(c) for c in array_chunks(7, 1001, max_tasks_per_array=3)] == [3, 3, 1]
    assert array_chunks(0, 1001, None) == []
    # The sweep-wide parallelism is shared between the arrays' `%` throttles.
    assert array_layout(2503, 1001, {"array_parallelism": 256})[1] == 85
    assert array_layout(10, 1001, {"array_parallelism": 256})[1] == 256

    runs = [PlannedRun(f"id{i}", f"/r/id{i}", (f"seed={i}",), model_path="ab"[i % 2]) for i in range(5)]
    packs = pack_runs(runs, runs_per_task=2)
    assert [[r.run_id for r in p] for p in packs] == [["id0", "id2"], ["id4", "id1"], ["id3"]]
    with pytest.raises(SweepError, match="runs_per_task"):
        pack_runs(runs, 0)


def test_no_slurm_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SweepError, match="SLURM is not available"):
        slurm_max_array_size()


@pytest.mark.slow
def test_no_slurm_on_the_command_line_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python only: no sbatch/scontrol
    result = launch("-m", "hydra/launcher=slurm", "seed=1,2", f"paths.root={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep", env=env)
    assert result.returncode != 0
    assert "SLURM is not available" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep" / manifest.MANIFEST).exists()


def _queue() -> set[str] | None:
    return manifest.live_slurm_tasks()


@pytest.mark.slow
def test_paper_grid_dry_run_plans_13440_runs_and_submits_nothing(tmp_path):
    """The cost comes from a figures file (here one with round numbers). By hand: 7,680 runs of the
    7b shape (4 presets x 1,920), each 10 EM steps x 10 s + one greedy evaluation of the four
    benchmarks (500 + 272 + 675 + 40 = 1,487 responses) x 800 tokens / 5,000 tokens/s: 213.3 +
    507.6 h; 1,920 runs of 1.5b: 10 x 3 s + 1,487 x 800 / 10,000: 16.0 + 63.4 h; 800.3 h in all.
    The two Llama presets (3,840 runs) have no figures: unknown."""
    figures = tmp_path / "measured.json"
    figures.write_text(json.dumps({"assumed": {"eval_mean_response_tokens": 800}, "shapes": {
        "7b": {"em_step_s": 10, "eval_tokens_per_s": 5000}, "1.5b": {"em_step_s": 3, "eval_tokens_per_s": 10000}}}))
    before = _queue()
    started = time.perf_counter()
    result = launch("-m", "+experiment=paper_grid", "hydra/launcher=slurm", "hydra.launcher.dry_run=true",
                    f"paths.root={tmp_path}", f"hydra.launcher.cost_figures={figures}")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "em-sweep plan: 13440 runs (13440 jobs, 7 compositions" in result.stdout
    assert "already complete: 0" in result.stdout
    assert "estimated cost:   800 GPU-hours for 9,600 of 13,440 runs" in result.stdout, result.stdout
    assert "shape 7b: 7,680 runs, 721 GPU-hours = 76,800 EM steps x 10 s (213 h) + 11,420,160 evaluation " \
           "responses at 5,000 tokens/s (508 h)" in result.stdout, result.stdout
    assert "shape 1.5b: 1,920 runs, 79.4 GPU-hours = 19,200 EM steps x 3 s (16.0 h)" in result.stdout
    assert "unknown: 3,840 runs (shape 'llama3.1-8b': no measured figures)" in result.stdout
    assert "dry run: nothing submitted" in result.stdout
    assert not (tmp_path / "sweeps" / "paper_grid" / manifest.MANIFEST).exists()
    assert not (tmp_path / "sweeps" / "paper_grid" / manifest.CONTEXT).exists()
    if before is not None:
        assert _queue() == before
    assert seconds < 30, f"planning 13,440 runs took {seconds:.1f}s"


def _entry(tmp_path: Path, name: str, job_id: str, submitted_at: float = 100.0) -> manifest.ManifestEntry:
    return manifest.ManifestEntry(PlannedRun(name, str(tmp_path / name), (f"seed={name}",), "m"), job_id,
                                  submitted_at)


def test_status_is_read_from_run_files_and_the_queue(tmp_path):
    sweep = tmp_path / "sweep"
    entries = {name: _entry(tmp_path, name, job) for name, job in
               [("done", "7_0"), ("running", "7_1"), ("killed", "7_2"), ("failed", "7_3"), ("queued", "7_4"),
                ("gone", "7_5"), ("old_failure", "8_0")]}
    manifest.append_manifest(sweep, entries.values())
    rundir.write_json_atomic(tmp_path / "done" / rundir.RESULTS, {"run_id": "done"})
    for name in ("running", "killed"):
        rundir.write_status(tmp_path / name, "running")
    rundir.write_status(tmp_path / "failed", "failed", reason="RuntimeError: boom")
    # A failure recorded before the latest submission, whose task is queued again: pending, not failed.
    rundir.write_json_atomic(tmp_path / "old_failure" / rundir.STATUS, {"state": "failed", "reason": "x", "time": 1})
    live = {"7_1", "7_4", "8_0"}
    states = {s.entry.run.run_id: (s.state, s.reason) for s in manifest.sweep_status(sweep, live=live)}
    assert states == {"done": ("done", None), "running": ("running", None), "killed": ("interrupted", None),
                      "failed": ("failed", "RuntimeError: boom"), "queued": ("pending", None),
                      "gone": ("missing", None), "old_failure": ("pending", None)}
    text = manifest.format_status(sweep, manifest.sweep_status(sweep, live=live))
    assert "1 x RuntimeError: boom" in text


def test_a_local_run_is_running_only_while_its_process_lives(tmp_path):
    """A local sweep has no queue to ask: a run whose process was killed (its status still says
    running) is interrupted, not running forever. Asking takes no lock (a run starting at that
    moment must still get its claim)."""
    import subprocess

    sweep = tmp_path / "sweep"
    entries = [_entry(tmp_path, name, "local") for name in ("live", "killed", "elsewhere", "waiting")]
    manifest.append_manifest(sweep, entries)
    gone = subprocess.Popen(["true"])
    gone.wait()
    rundir.write_status(tmp_path / "live", "running")  # this process
    rundir.write_status(tmp_path / "killed", "running", pid=gone.pid)
    rundir.write_status(tmp_path / "elsewhere", "running", host="another-node", pid=gone.pid)  # cannot tell
    with rundir.claimed(tmp_path / "live") as ours:
        assert ours
        states = {s.entry.run.run_id: s.state for s in manifest.sweep_status(sweep)}
    assert states == {"live": "running", "killed": "interrupted", "elsewhere": "running", "waiting": "pending"}


def test_manifest_keeps_the_latest_submission_of_each_run(tmp_path):
    sweep = tmp_path / "sweep"
    manifest.append_manifest(sweep, [_entry(tmp_path, "a", "1_0"), _entry(tmp_path, "b", "1_1")])
    manifest.append_manifest(sweep, [_entry(tmp_path, "a", "2_0", submitted_at=200.0)])
    latest = manifest.read_manifest(sweep)
    assert [(e.run.run_id, e.job_id) for e in latest.values()] == [("a", "2_0"), ("b", "1_1")]
    lines = (sweep / manifest.MANIFEST).read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["overrides"] == ["seed=a"]


def test_status_finds_every_sweep_below_a_folder(tmp_path, capsys):
    from em_sweep.sweep.cli import cmd_resubmit, cmd_status

    for sweep in ("sweeps/a", "hydra/multirun/2026-01-01/10-00-00"):
        manifest.append_manifest(tmp_path / sweep, [_entry(tmp_path / "runs", sweep.replace("/", "_"), "local")])
    assert manifest.find_sweeps(tmp_path) == [tmp_path / "hydra/multirun/2026-01-01/10-00-00", tmp_path / "sweeps/a"]
    assert manifest.find_sweeps(tmp_path / "sweeps/a") == [tmp_path / "sweeps/a"]

    args = argparse.Namespace(sweep_dir=str(tmp_path), reasons=10)
    assert cmd_status(args) == 0
    out = capsys.readouterr().out
    assert out.count(": 1 runs") == 2 and "sweeps/a" in out
    # Resubmitting needs one sweep.
    assert cmd_resubmit(argparse.Namespace(sweep_dir=str(tmp_path), dry_run=True, reasons=10)) == 2
    assert "holds 2 sweeps" in capsys.readouterr().err
    assert cmd_status(argparse.Namespace(sweep_dir=str(tmp_path / "nothing"), reasons=10)) == 2


def test_parallel_processes_take_the_tasks_gpus_in_turn(monkeypatch):
    from em_sweep.sweep.worker import _child_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert [_child_env(i) for i in range(3)] == [{"CUDA_VISIBLE_DEVICES": d} for d in ("2", "5", "2")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert _child_env(1) == {}  # one GPU: every process shares it
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _child_env(0) == {}


def test_fsdp_runs_submit_one_srun_process_per_gpu(tmp_path):
    """gpus_per_task=2 with train.parallel=fsdp: each array task is one srun step of 2 processes
    (ranks of one run), each seeing both GPUs; a failing rank ends the step."""
    from submitit.slurm.slurm import _make_sbatch_string

    from em_sweep.sweep.launcher import _executor_parameters, sharded_ranks

    settings = {"timeout_min": 60, "cpus_per_task": 4, "job_name": "j", "signal_delay_s": 120,
                "additional_parameters": {}, "setup": [], "gpus_per_task": 2, "parallel_runs": 1}
    runs = [PlannedRun(f"id{i}", f"/r/id{i}", (f"seed={i}",), "m") for i in range(3)]
    assert sharded_ranks(runs, frozenset(), settings) == 1
    ranks = sharded_ranks(runs, frozenset(r.run_id for r in runs), settings)
    assert ranks == 2
    script = _make_sbatch_string("python -m x", tmp_path, **_executor_parameters({**settings, "ranks_per_task": ranks}))
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2", "#SBATCH --nodes=1",
                 "--kill-on-bad-exit=1"):
        assert line in script, script
    assert "--gpus-per-task" not in script
    single = _make_sbatch_string("python -m x", tmp_path, **_executor_parameters({**settings, "ranks_per_task": 1}))
    assert "#SBATCH --gpus-per-task=2" in single and "--ntasks-per-node=2" not in single
    with pytest.raises(SweepError, match="1 of 3 runs use fsdp"):
        sharded_ranks(runs, frozenset({"id0"}), settings)
    with pytest.raises(SweepError, match="parallel_runs: must be 1"):
        sharded_ranks(runs, frozenset(r.run_id for r in runs), {**settings, "parallel_runs": 2})


@pytest.mark.slow
def test_fsdp_sweep_dry_run_says_each_run_spans_the_tasks_gpus(tmp_path):
    result = launch("-m", "hydra/launcher=slurm", "hydra.launcher.dry_run=true", "hydra.launcher.gpus_per_task=4",
                    "train.parallel=fsdp", "train.batch_size=64", "seed=1,2", f"paths.root={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 0, result.stderr
    assert "to run:           2 runs in 2 array tasks (1 per task, each run across 4 GPUs (train.parallel=fsdp))" \
        in result.stdout, result.stdout
    mixed = launch("-m", "hydra/launcher=slurm", "hydra.launcher.dry_run=true", "train.parallel=none,fsdp",
                   f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep2")
    assert mixed.returncode != 0 and "1 of 2 runs use fsdp and the others not" in mixed.stderr, mixed.stderr
