"""Report sections for the label-free family: objectives side by side, the stopping rule, calibration.

Called by :func:`em_sweep.analysis.report.build_report`; each section is omitted when the sweep has no data
for it. What they need beyond the collected table (a run's objective name, its stopping signals
and chosen steps, the reliability bins) is read from the done runs' ``results.json``.

- **Objectives**: final score (the report's score at its evaluation temperature) per objective,
  with the seed spread (std, min, max over runs) and the mean change from step 0.
- **Label-free stopping**: for every run with a chosen step, how many points below the run's best
  evaluated step the chosen step scores, per rule, next to keeping the last step (the fixed count).
- **Calibration**: per benchmark and evaluation temperature with ``n > 1``, ECE and Brier score of
  the majority-share and sequence-probability confidences before (step 0) and after (last step)
  training, and whether the model over-confides (mean confidence above accuracy); a reliability
  diagram of the majority share.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_sweep import rundir
from em_sweep.analysis import aggregate as agg
from em_sweep.training.stopping import RULES, stopping_error


def read_extras(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """{run_id: results.json} of the done runs (objective, stop, scores with reliability bins)."""
    out: dict[str, dict[str, Any]] = {}
    for _, r in runs[runs["status"] == agg.DONE].iterrows():
        results = rundir.read_results(Path(str(r["run_dir"])))
        if results is not None:
            out[str(r["run_id"])] = results
    return out


def objective_of(extra: dict[str, Any] | None, row: pd.Series) -> str:
    if extra and extra.get("objective"):
        return str(extra["objective"])
    from em_sweep.training.objectives import objective_name

    config = extra.get("config") if extra else None
    return objective_name(config) if config else str(row.get("stages", "?"))


def objectives_of(frame: pd.DataFrame, extras: dict[str, dict[str, Any]]) -> pd.Series:
    """Each row's run's objective (named once per run)."""
    firsts = frame.drop_duplicates("run_id")
    by_run = {i: objective_of(extras.get(str(i)), r) for i, (_, r) in zip(firsts["run_id"], firsts.iterrows(),
                                                                          strict=True)}
    return frame["run_id"].map(by_run)


def _main_with_objective(p: Any, extras: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return p.main.assign(objective=objectives_of(p.main, extras))


def objectives_table(main: pd.DataFrame) -> pd.DataFrame:
    """Per objective: runs, mean/std/min/max of the final score, mean score at step 0."""
    final = agg.final_step(main)
    start = main[main["step"] == 0].groupby("objective")["score"].mean()
    rows = []
    for name, g in final.groupby("objective", sort=True):
        s = g["score"].astype(float)
        rows.append({"objective": name, "runs": len(s), "mean": s.mean(), "std": s.std(ddof=1) if len(s) > 1 else 0.0,
                     "min": s.min(), "max": s.max(), "step0": start.get(name, math.nan),
                     "last_step": int(g["step"].max())})
    return pd.DataFrame(rows)


def objectives_section(p: Any, extras: dict[str, dict[str, Any]]) -> list[str]:
    main = _main_with_objective(p, extras)
    if main.empty or main["objective"].nunique() < 2 and main["objective"].iloc[0] == "em":
        return []
    t = objectives_table(main)
    lines = ["## Objectives side by side", "",
             f"Final {p.label} at evaluation temperature {p.eval_t:g} per objective (`rl:<reward>` is the RL "
             "stage with that reward, `/rloo` its leave-one-out advantages, `em_inf` EM-INF decoding, `none` no "
             "training); spread over the runs (seeds) of each objective.", "",
             "| objective | runs | final mean | std | min | max | step 0 mean | change |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        lines.append(f"| `{r['objective']}` | {r['runs']} | {100 * r['mean']:.1f}% | {100 * r['std']:.1f} pp | "
                     f"{100 * r['min']:.1f}% | {100 * r['max']:.1f}% | {100 * r['step0']:.1f}% | "
                     f"{100 * (r['mean'] - r['step0']):+.1f} pp |")
    return lines


def stopping_errors(main: pd.DataFrame, extras: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, rule): the chosen step, the best evaluated step, the error (best score
    minus chosen score), and the same for keeping the last step (rule ``fixed``)."""
    rows = []
    for run_id, g in main.groupby("run_id"):
        stop = (extras.get(str(run_id)) or {}).get("stop")
        curve = {int(s): float(v) for s, v in zip(g["step"], g["score"], strict=True)}
        if not stop or len(curve) < 2:  # nothing to choose between (e.g. EM-INF: step 0 only)
            continue
        best_step = max(curve, key=lambda s: (curve[s], -s))
        picks = {**stop.get("by_rule", {}), "fixed": max(curve)}
        for rule, step in picks.items():
            if step is None or int(step) not in curve:
                continue
            rows.append({"run_id": run_id, "objective": g["objective"].iloc[0], "rule": rule, "chosen": int(step),
                         "best": best_step, "error": stopping_error(curve, int(step))})
    return pd.DataFrame(rows)


def stopping_section(p: Any, extras: dict[str, dict[str, Any]]) -> list[str]:
    main = _main_with_objective(p, extras)
    errors = stopping_errors(main, extras)
    if errors.empty:
        return []
    lines = ["## Label-free stopping", "",
             "Each rule picks a step from signals logged without labels (stop.*; em_sweep/training/stopping.py); the error "
             f"is how far the chosen step's {p.label} lies below the run's best evaluated step, in points. "
             "`fixed` keeps the last step (the default).", "",
             "| rule | runs | mean error | max error | chosen = best | mean chosen step | mean best step |",
             "|---|---|---|---|---|---|---|"]
    for rule in [*RULES, "fixed"]:
        g = errors[errors["rule"] == rule]
        if g.empty:
            continue
        lines.append(f"| {rule} | {len(g)} | {100 * g['error'].mean():.1f} pp | {100 * g['error'].max():.1f} pp | "
                     f"{int((g['chosen'] == g['best']).sum())} | {g['chosen'].mean():.1f} | {g['best'].mean():.1f} |")
    rule = next(iter(extras.values()), {}).get("config", {}).get("stop", {}).get("rule", "agreement")
    by_obj = errors[errors["rule"] == rule].groupby("objective")["error"].agg(["mean", "count"])
    if len(by_obj) > 1:
        lines += ["", f"Rule `{rule}` by objective: " + "; ".join(
            f"`{o}` {100 * r['mean']:.1f} pp ({int(r['count'])} runs)" for o, r in by_obj.iterrows()) + "."]
    return lines


def calibration_table(scores: pd.DataFrame, extras: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per objective x benchmark x evaluation temperature: mean calibration columns at step 0
    and at each run's last step."""
    c = scores[scores["ece_majority"].notna()].copy() if "ece_majority" in scores else pd.DataFrame()
    if c.empty:
        return c
    c["objective"] = objectives_of(c, extras)
    last = c.groupby("run_id")["step"].transform("max")
    c = c[(c["step"] == 0) | (c["step"] == last)].assign(when=lambda f: np.where(f["step"] == 0, "before", "after"))
    cols = ["accuracy", *[k for k in agg.CALIBRATION_COLUMNS if k in c]]
    return c.groupby(["objective", "benchmark", "eval_temperature", "when"])[cols].mean().reset_index()


def calibration_verdict(ece_before: float, d_ece: float, gap_before: float, gap_after: float) -> str:
    """One sentence: whether training moved the majority-share ECE (by more than half a point) and
    whether the model over-confides after it (confidence above maj@n by more than half a point)."""
    tol = 0.005
    moved = ("calibrates it (ECE falls)" if d_ece < -tol else "de-calibrates it (ECE rises)" if d_ece > tol
             else "leaves ECE unchanged (within 0.5 points)")
    if gap_after > tol:
        confide = "over-confides" + (" more than before" if gap_after > gap_before + tol else "")
    elif gap_after < -tol:
        confide = "is under-confident"
    else:
        confide = "is about as confident as it is accurate"
    return (f"majority-share ECE {100 * ece_before:.1f} -> {100 * (ece_before + d_ece):.1f} points: training "
            f"{moved}; confidence minus maj@n {100 * gap_before:+.1f} -> {100 * gap_after:+.1f} pp: after "
            f"training it {confide}.")


def calibration_section(p: Any, extras: dict[str, dict[str, Any]], out_dir: Path) -> list[str]:
    done = p.table[(p.table["status"] == agg.DONE) & p.table["step"].notna()]
    t = calibration_table(done, extras)
    if t.empty:
        return []
    lines = ["## Calibration: does training calibrate or over-confide?", "",
             "Sampled evaluation (n > 1 per problem). Majority share: per problem, the share of samples giving "
             "the most common answer, against whether that answer is right (maj@n). Sequence probability: per "
             "response, exp(mean token log-probability), against whether it is right. ECE over 10 bins; Brier "
             "score; a gap > 0 means the confidence exceeds the accuracy (over-confidence).", "",
             "| objective | benchmark | eval T | when | maj@n | maj. conf. | ECE maj. | Brier maj. | seq. conf. | "
             "accuracy | ECE seq. | Brier seq. |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, scale: float = 100.0, unit: str = "") -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.1f}{unit}"

    for _, r in t.sort_values(["objective", "benchmark", "eval_temperature", "when"],
                              key=lambda s: s.map({"before": 0, "after": 1}) if s.name == "when" else s).iterrows():
        lines.append(f"| `{r['objective']}` | {r['benchmark']} | {r['eval_temperature']:g} | {r['when']} | "
                     f"{f(r.get('majority_accuracy'), unit='%')} | {f(r.get('majority_confidence'), unit='%')} | "
                     f"{f(r.get('ece_majority'))} | {_brier(r.get('brier_majority'))} | "
                     f"{f(r.get('seqprob_confidence'), unit='%')} | {f(r.get('accuracy'), unit='%')} | "
                     f"{f(r.get('ece_seqprob'))} | {_brier(r.get('brier_seqprob'))} |")
    lines += ["", "ECE in points (x100); Brier as a fraction.", ""]
    for name, g in t.groupby("objective", sort=True):
        before, after = g[g["when"] == "before"], g[g["when"] == "after"]
        if before.empty or after.empty:
            continue
        d_ece = float(after["ece_majority"].mean() - before["ece_majority"].mean())
        gap_b = float((before["majority_confidence"] - before["majority_accuracy"]).mean())
        gap_a = float((after["majority_confidence"] - after["majority_accuracy"]).mean())
        lines.append(f"- `{name}`: {calibration_verdict(float(before['ece_majority'].mean()), d_ece, gap_b, gap_a)}")
    plain = t[(t["when"] == "before") & ~t["objective"].str.contains("em_inf")]
    for name, g in t[t["objective"].str.contains("em_inf")].groupby("objective", sort=True):
        if (g["when"] == "after").any() or plain.empty:
            continue
        keys = ["benchmark", "eval_temperature"]
        both = g.merge(plain.groupby(keys)[["ece_majority", "majority_confidence", "majority_accuracy"]].mean()
                       .reset_index(), on=keys, suffixes=("", "_plain"))
        if both.empty:
            continue
        lines.append(f"- `{name}` (no training; against plain decoding of the same model, the other objectives' "
                     f"step 0): majority-share ECE {100 * both['ece_majority_plain'].mean():.1f} -> "
                     f"{100 * both['ece_majority'].mean():.1f} points; confidence minus maj@n "
                     f"{100 * (both['majority_confidence_plain'] - both['majority_accuracy_plain']).mean():+.1f} -> "
                     f"{100 * (both['majority_confidence'] - both['majority_accuracy']).mean():+.1f} pp.")
    fig = plot_reliability(p, extras)
    if fig is not None:
        import matplotlib.pyplot as plt

        fig.savefig(out_dir / "reliability.png", dpi=110)
        plt.close(fig)
        lines += ["", "![reliability diagram](reliability.png)"]
    return lines


def _brier(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def pooled_bins(entries: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Reliability bins of several scores pooled (counts added, means weighted by count)."""
    acc: dict[float, list[float]] = {}
    for bins in entries:
        for b in bins:
            a = acc.setdefault(b["lo"], [0.0, 0.0, 0.0])
            a[0] += b["n"]
            a[1] += b["n"] * b["confidence"]
            a[2] += b["n"] * b["accuracy"]
    return [{"lo": lo, "n": n, "confidence": c / n, "accuracy": a / n} for lo, (n, c, a) in sorted(acc.items())]


def plot_reliability(p: Any, extras: dict[str, dict[str, Any]]):
    """Majority-share reliability diagram, before (step 0) and after (last step), one line per objective."""
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[list[dict[str, float]]]] = {}
    for extra in extras.values():
        scores = [s for s in extra.get("scores", []) if s.get("reliability_majority")]
        if not scores:
            continue
        last = max(int(s["step"]) for s in extra.get("scores", []))
        for s in scores:
            if int(s["step"]) in (0, last):
                when = "before" if int(s["step"]) == 0 else "after"
                groups.setdefault((extra.get("objective", "?"), when), []).append(s["reliability_majority"])
    if not groups:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    names = sorted({name for name, _ in groups})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per objective in both panels
    for ax, when in zip(axes, ("before", "after"), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for (name, w), entries in sorted(groups.items()):
            if w != when:
                continue
            bins = pooled_bins(entries)
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=name,
                    color=colors[name], alpha=0.8)
        ax.set_title(f"{when} training" + (" (plain decoding unless em_inf)" if when == "before" else ""))
        ax.legend(fontsize=7)
        ax.set_xlabel("majority share (confidence)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("maj@n accuracy")
    fig.tight_layout()
    return fig


def sections(p: Any, out_dir: Path) -> list[str]:
    """The three sections' Markdown lines (empty when the sweep has none of their data)."""
    if not p.n_done or p.main.empty:
        return []
    extras = read_extras(p.runs)
    lines: list[str] = []
    for part in (objectives_section(p, extras), stopping_section(p, extras), calibration_section(p, extras, out_dir)):
        if part:
            lines += part + [""]
    return lines
