"""train.save_at_steps writes HF checkpoints that evaluation and the analysis tools load as a model path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from em_sweep.cli import main as cli_main
from tests.conftest import ROOT

FAST = ["train.steps=2", "train.batch_size=8", "train.micro_batch_size=4", "train.max_new_tokens=24",
        "eval.limit=16", "eval.batch_size=16", "logger.mode=disabled"]


def em_sweep(*argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        cli_main(list(argv))
    return int(done.value.code or 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One real `python launch.py` run that saves checkpoints at steps 1 and 2 (and evaluates step 1)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"paths.root={root}", *FAST,
                           "train.save_at_steps=[1,2]", "eval.at_steps=[1]", "train.lr=1e-3"],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run


@pytest.mark.slow
def test_checkpoints_are_saved_at_the_requested_steps_only(trained):
    ckpts = trained / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2"]
    for step in ("step-1", "step-2"):
        assert (ckpts / step / "config.json").is_file() and (ckpts / step / "tokenizer_config.json").is_file()
    w1 = load_file(ckpts / "step-1" / "model.safetensors")
    w2 = load_file(ckpts / "step-2" / "model.safetensors")
    assert any(not w1[k].equal(w2[k]) for k in w1), "step 2 should differ from step 1"


def test_evaluating_a_checkpoint_reproduces_the_runs_score_at_that_step(trained, tmp_path):
    results = json.loads((trained / "results.json").read_text())
    (at_step_1,) = [s for s in results["scores"] if s["step"] == 1]
    ckpt = trained / "checkpoints" / "step-1"
    assert em_sweep("eval", f"model.path={ckpt}", f"paths.root={tmp_path}", *FAST) == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    evaluated = json.loads((run / "results.json").read_text())
    assert evaluated["config"]["model"]["path"] == str(ckpt)
    (score,) = evaluated["final_scores"]
    assert score["accuracy"] == at_step_1["accuracy"] and score["n_problems"] == 16


def test_analysis_tools_accept_a_checkpoint_as_model(trained, tmp_path):
    ckpt = trained / "checkpoints" / "step-2"
    out = tmp_path / "logits"
    assert em_sweep("logits", f"logits.models=[tiny_arith,{ckpt}]", "logits.n_responses=3",
                    "logits.max_new_tokens=16", "logits.bins=20", f"logits.out_dir={out}") == 0
    results = json.loads((out / "skewness.json").read_text())
    assert [r["model"] for r in results] == ["tiny_arith", str(ckpt)]
    assert results[1]["label"].endswith("/step-2") and results[1]["n_values"] > 0
    assert (out / "histogram.png").stat().st_size > 0

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "q1", "problem": "What is 12+7?", "answer": "19"}) + "\n")
    ranking = tmp_path / "ranking.json"
    assert em_sweep("select-prompts", f"model.path={ckpt}", f"select.pool={pool}", "select.k=2", "select.top=1",
                    "select.name=ck", f"select.out_dir={tmp_path / 'prompt'}", f"select.ranking={ranking}") == 0
    record = json.loads(ranking.read_text())
    assert record["model"]["path"] == str(ckpt) and record["ranking"][0]["id"] == "q1"


@pytest.mark.slow
def test_a_restarted_run_starts_clean_over_what_the_interrupted_attempt_left(tmp_path):
    """A run interrupted after saving a checkpoint (results.json never written) is restarted from
    scratch: the old checkpoints, a half-written one and the old W&B files go, the checkpoint is
    written again, and the restart logs to a W&B run of its own (W&B drops steps it has seen)."""
    from em_sweep import rundir
    from em_sweep.run import run
    from tests.conftest import compose_config

    fast = [o for o in FAST if not o.startswith("logger.")]
    cfg = compose_config([f"paths.root={tmp_path}", *fast, "train.save_at_steps=[1]", "eval.at_steps=[]",
                          "logger.mode=offline"])
    first = run(cfg)
    path = Path(first["run_dir"])
    assert (path / rundir.ATTEMPTS).read_text().strip() == "1"
    # What a preemption after the save leaves: no results.json, a "running" status, and a save cut short.
    (path / rundir.RESULTS).unlink()
    rundir.write_status(path, "running")
    (path / "checkpoints" / "step-1.tmp").mkdir()
    (path / "checkpoints" / "step-1.tmp" / "junk.bin").write_bytes(b"x")
    again = run(cfg)
    assert "skipped" not in again
    assert [s["accuracy"] for s in again["final_scores"]] == [s["accuracy"] for s in first["final_scores"]]
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["step-1"]
    assert (path / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert (path / rundir.ATTEMPTS).read_text().strip() == "2" and rundir.read_status(path)["attempt"] == 2
    (wandb_run,) = (path / "wandb").glob("offline-run-*")  # the first attempt's files are gone
    assert wandb_run.name.endswith(f"-{path.name}-2")
    # A run directory from before attempts were counted, interrupted: its restart is not a first attempt.
    (path / rundir.RESULTS).unlink()
    (path / rundir.ATTEMPTS).unlink()
    run(cfg)
    assert rundir.read_status(path)["attempt"] == 2


def test_a_packed_run_does_not_inherit_gradient_checkpointing_from_the_run_before(tmp_path, monkeypatch):
    """Runs of one task share a loaded model (ModelCache restores its weights): a run without
    gradient checkpointing trains without it even after one with it."""
    from em_sweep import run as run_module
    from em_sweep.models import ModelCache, checkpointing_modules
    from em_sweep.training import em
    from tests.conftest import compose_config

    seen = []
    real = em.accumulate_entropy_gradients

    def recording(model, *args, **kwargs):
        seen.append(bool(checkpointing_modules(model)))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(em, "accumulate_entropy_gradients", recording)
    cache = ModelCache()
    for ckpt in ("true", "false"):
        seen.clear()
        # A runs dir each: gradient checkpointing is not part of the run id (the same run otherwise).
        run_module.run(compose_config([f"paths.root={tmp_path}/{ckpt}", *FAST, "train.steps=1", "eval.at_steps=[]",
                                       f"model.gradient_checkpointing={ckpt}"]), cache)
        assert seen == [ckpt == "true"]
