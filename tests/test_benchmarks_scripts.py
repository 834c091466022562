"""The GPU-session scripts, rehearsed end to end on CPU with the tiny shape: they must work the
first time on the device (15 minutes of GPU time for a whole session)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_session_rehearsal_measures_everything_and_survives_a_failing_part(tmp_path):
    """SMOKE run of the real script; the 7B EM part is made to fail: the others still report."""
    # The GPU machine has torch and transformers but not the project's other dependencies:
    # the benchmarks must run without them.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(
        "import sys\nfor name in ('hydra', 'omegaconf', 'wandb', 'submitit', 'math_verify'):\n"
        "    sys.modules[name] = None\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *em_step_7b.json*) echo "injected failure" >&2; exit 3;; esac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "PYTHON": str(wrapper), "OUT": str(out), "PYTHONPATH": str(blocked),
           "BUDGET_S": "3000",
           "PARTS": "check_decode em_step_1.5b em_step_7b cb_7b"}
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "== em_step_7b: rc=3" in r.stdout and "injected failure" in r.stdout
    for part in ("check_decode", "em_step_1.5b", "cb_7b"):
        assert f"== {part}: rc=0" in r.stdout, log[-4000:]
    assert "em_step_1.5b_hf" not in r.stdout  # PARTS filters
    assert sorted(p.name for p in out.glob("*.json")) == ["cb_7b.json", "check_decode.json", "em_step_1.5b.json",
                                                          "measured.json"]

    checks = json.loads((out / "check_decode.json").read_text())["checks"]
    assert checks and all(c["ok"] for c in checks.values())
    # shared / compiled / both / shared checkpointed, fp32 and bf16
    assert sum(name.startswith("loss pass") for name in checks) == 8
    em = json.loads((out / "em_step_1.5b.json").read_text())
    assert "reference" not in em  # the session measures em-sweep's settings only (the reference style is in RESULTS.md)
    assert all(em["project"][k] >= 0 for k in ("sample_s", "loss_s", "optim_s", "step_s"))
    assert em["project"]["steps"][0]["response_length"] == 12  # lengths forced
    assert em["project+compile_loss"]["compile_loss"] and not em["project"]["compile_loss"]
    assert em["project+share_prompt"]["share_prompt_active"] and em["project+share_prompt"]["step_s"] > 0
    assert not em["project"]["share_prompt_active"]
    cb = json.loads((out / "cb_7b.json").read_text())
    assert cb["static"]["tokens_per_s"] > 0 and cb["continuous"]["tokens_per_s"] > 0
    assert cb["ratio_continuous_over_static"] > 0
    measured = json.loads((out / "measured.json").read_text())["shapes"]  # the dry-run's figures, marked smoke
    assert measured["7b"]["smoke"] and measured["7b"]["eval_tokens_per_s"] > 0 and measured["1.5b"]["em_step_s"] > 0
    # The summary the lead pastes into RESULTS.md ends the output.
    assert "| em_step_1.5b | em-sweep em_step, measured |" in r.stdout
    assert "| cb_7b |" in r.stdout


@pytest.mark.slow
def test_profile_decode_times_every_sampling_tail_case(tmp_path):
    out = tmp_path / "tail.json"
    r = subprocess.run([sys.executable, "benchmarks/profile_decode.py", "--shape", "tiny", "--parts", "tail",
                        "--batch", "4", "--reps", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert r.returncode == 0, r.stderr[-3000:]
    tail = json.loads(out.read_text())["tail"]
    assert len(tail) == 10  # 5 cases, eager and compiled
    assert all(isinstance(v, float) and v > 0 for v in tail.values()), tail
