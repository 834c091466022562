"""`em-sweep report`: figures + Markdown that answer the findings from the data, never hiding failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from em_sweep.analysis import report as rep
from em_sweep.analysis.collect import collect
from em_sweep.cli import main as cli_main

FIXTURE = Path(__file__).parent / "fixtures" / "mini_sweep"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The report of a copy of the fixture sweep, made through the CLI."""
    root = tmp_path_factory.mktemp("report") / "outputs"
    shutil.copytree(FIXTURE, root)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(root), "--quiet"])
    assert exit_info.value.code == 0
    return root / "report", (root / "report" / "report.md").read_text()


@pytest.fixture(scope="module")
def prepared() -> rep.Prepared:
    c = collect(FIXTURE / "runs", progress=False)
    return rep.prepare(c.scores, c.train, rep.load_skewness([FIXTURE / "skewness.json"]))


def section(text: str, key: str) -> str:
    start = text.index(f"(`{key}`)\n")
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else text.index("## Findings without data")]


def test_writes_the_report_and_every_figure_it_embeds(built):
    out, text = built
    embedded = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert set(embedded) == {"before_after.png", "step_curve.png", "eval_temperature.png", "train_temperature.png",
                             "seed_spread.png", "shots.png", "skewness.png"}
    for name in embedded:
        assert (out / name).stat().st_size > 10_000, name


def test_failures_are_counted_and_listed_with_reasons(built):
    _, text = built
    assert "7 runs: done 5, failed 1, running 1." in text
    assert "| failed | NonFiniteLoss: step 4: loss=nan grad_norm=nan | 1 | `f300000000000000` |" in text
    assert "| running | - | 1 | `r300000000000000` |" in text


def test_findings_state_the_hand_computed_numbers(built):
    _, text = built
    # 1/6: before .40 for all; after (.5+.6+.7+.35+.45)/5 = .52; per-run change -5..+30 pp
    assert "`tiny_arith`: 40.0% before -> 52.0% after 10 steps; change +12.0 pp (per run -5.0 pp to +30.0 pp; 5 runs" in text
    # SE: between runs std(.1,.2,.3,-.05,.05)/sqrt(5) = 6.04 pp; evaluation sqrt((.4*.6 + .52*.48)/400) = 3.50 pp;
    # together 6.98 pp, so 2 SE = 14.0 pp > 12 pp: not called clear
    assert "within noise, 2 SE = 14.0 pp" in section(text, "one_shot_gain")
    # 2: T=0.3 runs a1, a2, m1: step 5 (.6+.7+.5)/3 = 60.0%, step 10 (.5+.6+.45)/3 = 51.7%: a clear decline
    s2 = section(text, "step_curve")
    assert "training T=0.3 (3 runs): step 0 40.0%, peak 60.0% at step 5, step 10 51.7%" in s2
    assert "then -8.3 pp by step 10 (clear" in s2
    assert "mean 0.95 at step 1 -> 0.5 at step 10; lower at the end in 3 of 3 runs" in s2
    # 3: last step T=1 (.35+.40+.45+.30+.33)/5 = 36.6%; paired change -15.4 pp
    assert "T=0 52.0%, T=1 36.6%" in section(text, "eval_temperature") and "-15.4 pp (clear" in section(text, "eval_temperature")
    # 4: T=0.3 mean 51.7%, std 7.6 pp, best a2 60%; T=0.7 mean 52.5%, std 24.7 pp; difference within noise
    s4 = section(text, "train_temperature")
    assert "| 0.3 | 3 | 51.7% | 7.6 pp | 45.0% | 60.0% (`a200000000000000`) |" in s4
    assert "| 0.7 | 2 | 52.5% | 24.7 pp | 35.0% | 70.0% (`b100000000000000`) |" in s4
    assert "+0.8 pp (within noise" in s4
    # 5: seeds of T=0.7: .70 / .35 = 2.00x; T=0.3 helps: .60/.50 = 1.20x
    s5 = section(text, "seeds")
    assert "largest 2.00x" in s5 and "1 of 2 reach the paper's 2x" in s5
    # 7: one-shot (.5+.6+.7+.35)/4 = 53.8% vs 2 prompts 45.0%
    assert "one-shot: 53.8% over 4 runs" in section(text, "one_vs_multi_shot")
    assert "| `em/step-10` | +0.9000 | +0.4000 |" in section(text, "logits_skewness")


def test_findings_without_data_say_what_is_missing(built):
    _, text = built
    missing = text[text.index("## Findings without data"):]
    assert "**EM before RL helps RL; EM after RL hurts** (`stage_order`)" in missing
    assert "stages here: ['em']" in missing
    assert "needs an RL-tuned model" in section(text, "base_models")


def test_no_done_runs_gives_a_report_of_missing_data(tmp_path):
    root = tmp_path / "outputs"
    shutil.copytree(FIXTURE, root)
    for d in (root / "runs").iterdir():
        (d / "results.json").unlink(missing_ok=True)
        (d / "status.json").write_text(json.dumps({"state": "failed", "reason": "OOM"}))
    c = collect(root, progress=False)
    path = rep.build_report(rep.prepare(c.scores, c.train), tmp_path / "r")
    text = path.read_text()
    assert "7 runs: failed 7." in text
    assert "## Findings with data\n\n## Findings without data" in text
    assert "| failed | OOM | 7 |" in text


def test_figures_state_their_run_counts(prepared):
    import matplotlib.pyplot as plt

    fig = rep.plot_step_curve(prepared)
    titles = [ax.get_title() for ax in fig.axes]
    assert "n = 5 runs; 2 runs not done are excluded" in titles[0]
    assert fig.axes[0].get_xlabel() == rep.STEP_AXIS and fig.axes[0].get_ylabel() == "arith accuracy (%)"
    plt.close(fig)
    fig = rep.plot_seed_spread(prepared)
    assert "n = 4 runs" in fig.axes[0].get_title()  # the two settings with two seeds
    plt.close(fig)


def test_curves_are_split_by_the_preferred_varying_setting(prepared):
    assert prepared.group == "temperature"
    assert prepared.settings == ["temperature", "prompt.name"]  # train.*_temperature only rename temperature
    assert prepared.eval_t == 0.0 and prepared.n_problems == 400


def test_skewness_schema_errors_name_the_file(tmp_path):
    bad = tmp_path / "skewness.json"
    bad.write_text(json.dumps([{"label": "x"}]))
    with pytest.raises(ValueError, match="skewness.json: each entry needs a numeric 'skewness'"):
        rep.load_skewness([bad])
    wrapped = tmp_path / "logits_skewness.json"
    wrapped.write_text(json.dumps({"models": [{"model": "m", "skewness": 1.5}]}))
    assert rep.load_skewness([wrapped])[0]["skewness"] == 1.5
    assert rep.find_skewness_files(tmp_path) == [bad, wrapped]


def test_skewness_finding_states_the_method_and_flags_mixed_methods(prepared):
    import dataclasses

    text = "\n".join(rep.finding_logits_skewness(prepared).lines)  # entries without a method field are raw
    assert "| raw |" in text and "- Method: raw:" in text
    reference = [{**e, "method": "reference"} for e in prepared.skewness]
    text = "\n".join(rep.finding_logits_skewness(dataclasses.replace(prepared, skewness=reference)).lines)
    assert "| reference |" in text and "- Method: reference:" in text and "logits_shift.py" in text
    mixed = [reference[0], *prepared.skewness[1:]]
    assert "not comparable" in "\n".join(rep.finding_logits_skewness(dataclasses.replace(prepared, skewness=mixed)).lines)


def test_report_reads_a_collected_table(built, tmp_path):
    root = built[0].parent
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(root / "collected" / "scores.parquet"), "--out", str(tmp_path / "r"), "--quiet"])
    assert exit_info.value.code == 0
    assert "7 runs: done 5, failed 1, running 1." in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.slow
def test_example_sweep_preset_end_to_end_through_launch_and_report(tmp_path):
    """The example preset, shrunk (2 seeds x 1 temperature, 2 steps, 24 problems), through real Hydra
    (em-sweep's sweeper + local launcher), then `em-sweep report` on its sweep dir."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", "+experiment=example_sweep", f"paths.root={tmp_path}",
           "seed=1,2", "temperature=0.5", "train.steps=2", "eval.at_steps=[0,1,2]", "eval.temperatures=[0.0,1.0]",
           "eval.limit=24", "train.batch_size=8", "train.micro_batch_size=8", "logger.mode=disabled"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "example_sweep"
    assert (sweep_dir / "manifest.jsonl").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(sweep_dir), "--quiet"])
    assert exit_info.value.code == 0
    text = (sweep_dir / "report" / "report.md").read_text()
    assert "2 runs: done 2." in text and "No run is failed, running or missing." in text
    assert "Evaluated steps: 0, 1, 2" in text and "Evaluation temperatures: 0, 1." in text
    assert (sweep_dir / "report" / "step_curve.png").is_file()
    assert (sweep_dir / "collected" / "scores.parquet").is_file()


def test_before_after_table_grows_a_column_per_benchmark_family(tmp_path):
    """Code and logic scores get their own before -> after columns; the main score stays math."""
    root = tmp_path / "outputs"
    shutil.copytree(FIXTURE, root)
    plain = rep.prepare(collect(root / "runs", progress=False).scores)
    for results_path in sorted((root / "runs").glob("*/results.json")):
        results = json.loads(results_path.read_text())
        extra = []
        for s in results["scores"]:
            if s["benchmark"] != "arith":
                continue
            after = s["step"] > 0
            extra.append({**s, "benchmark": "humaneval", "family": "code", "accuracy": 0.25 if after else 0.125,
                          "pass@1": 0.25 if after else 0.125})
            extra.append({**s, "benchmark": "kk", "family": "logic", "accuracy": 0.0 if after else 0.5})
        results["scores"] += extra
        results_path.write_text(json.dumps(results))
    collected = collect(root / "runs", progress=False)
    assert set(collected.scores["family"].dropna()) == {"code", "logic"}  # the fixture's arith has none: math
    p = rep.prepare(collected.scores)
    assert (p.label, p.n_problems) == (plain.label, plain.n_problems)  # arith alone, as before
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(p.main.reset_index(drop=True), plain.main.reset_index(drop=True))
    lines = rep.finding_base_models(p).lines
    assert lines[0].endswith("| code: before -> after | logic: before -> after |")
    row = next(line for line in lines if line.startswith("| `"))
    assert row.endswith("| 12.5% -> 25.0% (+12.5 pp) | 50.0% -> 0.0% (-50.0 pp) |")
