"""The sweep report: figures and one Markdown file answering the paper's findings (docs/method.md, section 4) one by one.

``em-sweep report <dir>`` collects ``<dir>`` (see :mod:`em_sweep.analysis.collect`; or reads a collected
``scores.parquet`` / its directory), then writes ``<dir>/report/report.md`` with PNG figures.

What is promised:
- Each finding (FINDINGS, named by content: finding_step_curve, ...) gets a section. It says what was measured, with numbers, when the
  sweep has the data, and what data is missing when it has not. Wording follows the numbers: a
  difference is called clear only when it exceeds two standard errors (between runs), otherwise
  it is reported as within noise.
- Only complete runs (``results.json``) enter figures and numbers. Every figure states how many
  runs it uses; the report counts runs per status and lists every run that is not done, with
  its reason.
- "Score" is the paper's average of four (avg4) when the sweep has it, else the only benchmark,
  else the mean over benchmarks; figures over steps and training temperature use greedy
  evaluation (eval temperature 0) when present, else the lowest evaluation temperature.

Logits skewness (the ``logits_skewness`` finding) is read from the ``em-sweep logits`` output: a JSON list of objects
with at least ``skewness`` and ``label`` (or ``model``); optional ``method`` (raw | reference; raw
when absent), ``n_values``, ``n_responses``, ``mean``, ``std`` and ``settings.temperature``.
Found at ``<dir>/skewness.json``, ``<dir>/logits_skewness.json`` or ``<dir>/logits/skewness.json``, or given with ``--skewness``.

The plotting functions take the :class:`Prepared` data and return a matplotlib Figure, so the
notebooks draw the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_sweep.analysis import aggregate as agg
from em_sweep.analysis import objectives_report

REPORT_DIR = "report"
REPORT_FILE = "report.md"
SKEWNESS_FILES = ("skewness.json", "logits_skewness.json", "logits/skewness.json")
# Preferred axes for grouping curves, most telling first.
CURVE_GROUP_PREFERENCE = ("temperature", "train.lr", "model.name", "prompt.name", "prompt.n_ids", "stages")
MAX_CURVES = 8
MAX_LISTED_FAILURES = 50
PAPER_SEED_RATIO = 2.0
STEP_AXIS = "training step (optimizer updates)"
REFERENCE_STEP_AXIS = "reference step (train.py loop steps; the optimizer updates are the `updates` column)"


def step_axis(frame: pd.DataFrame) -> str:
    """What the step axis of ``frame``'s runs counts (``train.step_unit``, docs/reproducing.md)."""
    units = set(frame["train.step_unit"].dropna()) if "train.step_unit" in frame else set()
    if units == {"micro_step"}:
        return REFERENCE_STEP_AXIS
    if "micro_step" in units:
        return "step (mixed: optimizer updates for train.step_unit=update runs, reference steps for micro_step runs)"
    return STEP_AXIS
EVAL_T_AXIS = "evaluation temperature (0 = greedy)"
TRAIN_T_AXIS = "training temperature τ (sampling and loss)"
LOSS_AXIS = "train loss: mean token entropy at τ (nats)"
# How a config column is named in labels (the bare `temperature` is the training temperature).
DISPLAY_NAMES = {"temperature": "training T"}


# ---------------------------------------------------------------- data preparation (pure)

@dataclass
class Prepared:
    """The collected table, reduced to what the figures and findings need."""

    table: pd.DataFrame  # the collected scores table, all runs
    train: pd.DataFrame | None  # the collected train table (done runs), if any
    runs: pd.DataFrame  # one row per run
    scores: pd.DataFrame  # one score per done run x step x eval temperature (agg.scores)
    eval_t: float | None  # the eval temperature used by step/temperature/seed figures
    main: pd.DataFrame  # scores at eval_t
    label: str  # what "score" means here
    settings: list[str]  # config columns that vary among done runs (seed excluded)
    group: str | None  # the column curves are split by, if any
    n_problems: int | None  # graded samples behind one score (median problems x samples; summed for avg4)
    skewness: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_done(self) -> int:
        return int((self.runs["status"] == agg.DONE).sum())

    @property
    def n_not_done(self) -> int:
        return int(len(self.runs) - self.n_done)


def graded_per_score(done: pd.DataFrame, bench: str | None) -> int | None:
    """Graded samples behind one score: the median n_problems x n of its benchmark; for avg4 or a
    mean over benchmarks, the sum of those medians over the benchmarks averaged (an approximation:
    an unweighted mean of accuracies on unequal sets)."""
    sized = done[done["n_problems"].notna()].assign(
        graded=lambda f: f["n_problems"].astype(float) * f["n"].astype(float).fillna(1.0))
    if sized.empty:
        return None
    if bench is not None and bench != agg.AVERAGE_OF_FOUR:
        sized = sized[sized["benchmark"] == bench]
        return int(sized["graded"].median()) if not sized.empty else None
    if bench == agg.AVERAGE_OF_FOUR:
        from em_sweep.evaluation.benchmarks import PAPER_FOUR

        sized = sized[sized["benchmark"].isin(PAPER_FOUR)]
    per_benchmark = agg.math_rows(sized).groupby("benchmark")["graded"].median()  # the score's benchmarks
    return int(per_benchmark.sum()) if not per_benchmark.empty else None


def choose_group(frame: pd.DataFrame, settings: Sequence[str]) -> str | None:
    """The varying setting that splits curves: the first of CURVE_GROUP_PREFERENCE (then any other)
    with at most MAX_CURVES values; None when nothing varies or every axis has too many values."""
    candidates = [c for c in settings if frame[c].nunique(dropna=False) <= MAX_CURVES]
    ranked = sorted(candidates, key=lambda c: (CURVE_GROUP_PREFERENCE.index(c)
                                               if c in CURVE_GROUP_PREFERENCE else len(CURVE_GROUP_PREFERENCE), c))
    return ranked[0] if ranked else None


def prepare(table: pd.DataFrame, train: pd.DataFrame | None = None,
            skewness: Sequence[dict[str, Any]] = ()) -> Prepared:
    """Reduce the collected table (see :mod:`em_sweep.analysis.collect`) for the report's figures and findings."""
    runs = table.drop_duplicates("run_id").reset_index(drop=True)
    scores = agg.scores(table)
    eval_t = agg.default_eval_temperature(scores) if not scores.empty else None
    main = agg.at_eval_temperature(scores, eval_t)
    settings = agg.varying_columns(main, agg.setting_columns(main)) if not main.empty else []
    settings = agg.distinct_columns(main, settings)
    bench = agg.primary_benchmark(table[table["status"] == agg.DONE])
    n_problems = graded_per_score(table[table["status"] == agg.DONE], bench)
    done_train = None
    if train is not None and not train.empty:
        done_train = train[train["status"] == agg.DONE]
        if "stage" in done_train.columns:  # the loss findings are EM's entropy; RL steps aside
            done_train = done_train[done_train["stage"].fillna("em") == "em"]
    return Prepared(table=table, train=done_train, runs=runs, scores=scores, eval_t=eval_t, main=main,
                    label=agg.score_label(table[table["status"] == agg.DONE]) if not scores.empty else "score",
                    settings=settings, group=choose_group(main, settings) if not main.empty else None,
                    n_problems=n_problems, skewness=list(skewness))


def curve_groups(p: Prepared, frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per value of the curve-splitting setting ``p.group``; one group when there is none."""
    if p.group is None:
        return [("all runs", frame)]
    name = DISPLAY_NAMES.get(p.group, p.group)
    return [(f"{name}={_fmt_value(v)}", g) for v, g in frame.groupby(p.group, dropna=False, sort=True)]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def pct(x: float) -> str:
    # round(.., 9) first: a mean of equal values (0.42250000000000004) prints like the values (42.2%)
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{round(100 * x, 9):.1f}%"


def pp(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{round(100 * x, 9):+.1f} pp"


def _pp_abs(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} pp"


def judged(diff: float, se_between: float, p_a: float, p_b: float, n_graded: int | None,
           more: Sequence[float] = ()) -> str:
    """'clear, 2 SE = x pp' / 'within noise, 2 SE = x pp' for a difference of two mean scores, where
    the SE counts the spread between runs and the evaluation set's sampling error
    (:func:`em_sweep.analysis.aggregate.difference_se`)."""
    se = agg.difference_se(se_between, p_a, p_b, n_graded, more)
    if se != se:  # NaN
        return "noise unknown: one run and no sample count"
    if se == 0:
        return "no noise measured" if diff == 0 else "clear: every run changed by the same amount"
    word = "clear" if agg.is_clear(diff, se) else "within noise"
    return f"{word}, 2 SE = {200 * se:.1f} pp"


def _runs_note(n: int, p: Prepared) -> str:
    note = f"n = {n} runs"
    if p.n_not_done:
        note += f"; {p.n_not_done} runs not done are excluded"
    return note


# ---------------------------------------------------------------- figures

def _figure(ncols: int = 1, width: float = 6.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.4), squeeze=False)
    return fig, list(axes[0])


def _percent_axis(ax: Any, label: str) -> None:
    ax.set_ylabel(f"{label} (%)")
    ax.grid(alpha=0.3)


def _noise_bar(ax: Any, p: Prepared, level: float) -> None:
    """A black bar of +-2 binomial SE of one score at ``level``, at the left edge: the scale at which
    differences on this evaluation set are noise (narrow y ranges make small steps look large)."""
    if not p.n_problems or level != level:
        return
    se = agg.binomial_se(level, p.n_problems)
    lo, hi = ax.get_xlim()
    x = lo + 0.02 * (hi - lo)
    ax.errorbar([x], [100 * level], yerr=[200 * se], fmt="none", ecolor="black", capsize=4, linewidth=1.5,
                label=f"±2 SE of one score ({p.n_problems} samples)")
    ax.set_xlim(lo, hi)


def plot_step_curve(p: Prepared):
    """Score vs training step per curve group (mean line, min-max band over runs, peak marked),
    and the training loss per step beside it when the train table is there."""
    fig, (ax, ax_loss) = _figure(2)
    n_runs = p.main["run_id"].nunique()
    for name, g in curve_groups(p, p.main):
        curve = agg.step_curve(g)
        line, = ax.plot(curve["step"], 100 * curve["mean"], marker="o", label=f"{name} ({g['run_id'].nunique()} runs)")
        ax.fill_between(curve["step"].astype(float), 100 * curve["min"], 100 * curve["max"], alpha=0.15,
                        color=line.get_color())
        step, value = agg.peak_step(curve)
        ax.plot([step], [100 * value], marker="*", markersize=16, color=line.get_color(), markeredgecolor="black")
    ax.set_xlabel(step_axis(p.main))
    _percent_axis(ax, p.label)
    _noise_bar(ax, p, float(p.main["score"].mean()) if not p.main.empty else math.nan)
    ax.set_title(f"Score by step (eval T={_fmt_value(p.eval_t)}); line = mean, band = min-max, "
                 f"★ = peak\n{_runs_note(n_runs, p)}", fontsize=9)
    ax.legend(fontsize=8)
    if p.train is not None and not p.train.empty:
        for name, g in curve_groups(p, p.train):
            curve = agg.step_curve(g, value="loss")
            line, = ax_loss.plot(curve["step"], curve["mean"], label=name)
            ax_loss.fill_between(curve["step"].astype(float), curve["min"], curve["max"], alpha=0.15,
                                 color=line.get_color())
        ax_loss.set_title(f"Training loss per step; line = mean, band = min-max\n"
                          f"n = {p.train['run_id'].nunique()} runs", fontsize=9)
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss curves collected", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel(step_axis(p.main))
    ax_loss.set_ylabel(LOSS_AXIS)
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_eval_temperature(p: Prepared):
    """Mean score vs evaluation temperature before training (step 0) and after (each run's last step)."""
    fig, (ax,) = _figure(1)
    last = agg.final_step(p.scores)
    panels = [("after EM (last step)", last[last["step"] > 0]), ("before EM (step 0)", p.scores[p.scores["step"] == 0])]
    for name, frame in panels:
        if frame.empty:
            continue
        curve = agg.summarize(frame, ["eval_temperature"])
        line, = ax.plot(curve["eval_temperature"], 100 * curve["mean"], marker="o",
                        label=f"{name}, {frame['run_id'].nunique()} runs")
        ax.fill_between(curve["eval_temperature"], 100 * curve["min"], 100 * curve["max"], alpha=0.15,
                        color=line.get_color())
    ax.set_xlabel(EVAL_T_AXIS)
    _percent_axis(ax, p.label)
    _noise_bar(ax, p, float(last["score"].mean()) if not last.empty else math.nan)
    ax.set_title(f"Score vs evaluation temperature; line = mean, band = min-max over runs\n"
                 f"{_runs_note(p.scores['run_id'].nunique(), p)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_train_temperature(p: Prepared):
    """Last-step score vs training temperature: every run (dots), mean ± std, and the best run."""
    fig, (ax,) = _figure(1)
    last = agg.final_step(p.main)
    last = last[last["step"] > 0]
    ax.scatter(last["temperature"], 100 * last["score"], s=14, alpha=0.4, color="gray", label="each run")
    stats = agg.summarize(last, ["temperature"])
    ax.errorbar(stats["temperature"], 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o",
                capsize=4, label="mean ± std over runs")
    best = agg.best_runs(last, ["temperature"])
    ax.plot(best["temperature"], 100 * best["score"], marker="^", linestyle="--", label="best run")
    ax.set_xlabel(TRAIN_T_AXIS)
    _percent_axis(ax, p.label)
    _noise_bar(ax, p, float(last["score"].mean()) if not last.empty else math.nan)
    ax.set_title(f"Score after training vs training temperature (eval T={_fmt_value(p.eval_t)}, last step)\n"
                 f"{_runs_note(last['run_id'].nunique(), p)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _setting_labels(frame: pd.DataFrame, settings: Sequence[str]) -> list[str]:
    if not settings:
        return ["all runs"] * len(frame)
    return [", ".join(f"{DISPLAY_NAMES.get(c, c)}={_fmt_value(v)}" for c, v in zip(settings, row, strict=True))
            for row in frame[list(settings)].itertuples(index=False)]


def plot_seed_spread(p: Prepared):
    """Per identical setting: each seed's last-step score (dots) and the max/min ratio beside it;
    a histogram of the ratios instead when there are more than 30 settings."""
    last = agg.final_step(p.main)
    last = last[last["step"] > 0]
    spread = agg.seed_spread(last, p.settings)
    spread = spread[spread["n_seeds"] >= 2].reset_index(drop=True)
    n_runs = int(spread["n_seeds"].sum())
    how = "dot = seed, label = max/min ratio"
    if len(spread) > 30:
        how = f"histogram over {len(spread)} settings"
        fig, (ax,) = _figure(1)
        ax.hist(spread["ratio"].replace(np.inf, np.nan).dropna(), bins=30)
        ax.set_xlabel("max / min score over seeds, per setting (ratio)")
        ax.set_ylabel("settings (count)")
    else:
        fig, (ax,) = _figure(1, width=7.5)
        fig.set_figheight(max(3.0, 0.45 * (len(spread) + 1) + 1.8))
        labels = _setting_labels(spread, agg.varying_columns(spread, p.settings))
        for i, row in spread.iterrows():
            mask = np.ones(len(last), dtype=bool)
            for c in p.settings:
                mask &= (last[c] == row[c]).to_numpy() | (last[c].isna() & pd.isna(row[c])).to_numpy()
            vals = last.loc[mask, "score"]
            ax.scatter(100 * vals, np.full(len(vals), i), s=24)
            ax.plot([100 * row["min"], 100 * row["max"]], [i, i], color="gray", linewidth=1)
            ratio = "inf" if math.isinf(row["ratio"]) else f"{row['ratio']:.2f}x"
            ax.annotate(ratio, (100 * row["max"], i), textcoords="offset points", xytext=(6, -3), fontsize=8)
        if p.n_problems and len(spread):
            level = float(spread["mean"].mean())
            se = agg.binomial_se(level, p.n_problems)
            ax.errorbar([100 * level], [-1], xerr=[200 * se], fmt="none", ecolor="black", capsize=4)
            labels = [*labels, f"±2 SE of one score\n({p.n_problems} samples)"]
            ticks = [*range(len(spread)), -1]
        else:
            ticks = list(range(len(spread)))
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.set_ylabel("setting (same config except seed)")
        ax.set_xlabel(f"{p.label} (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15)
    ax.set_title(f"Seed spread at the last step (eval T={_fmt_value(p.eval_t)}); {how}\n"
                 f"{_runs_note(n_runs, p)}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_before_after(p: Prepared):
    """Mean score before (step 0) and after training (last step) per base model; bars = mean, whiskers = std."""
    table = agg.before_after(p.main, ["model.name"])
    fig, (ax,) = _figure(1)
    x = np.arange(len(table))
    ax.bar(x - 0.2, 100 * table["before"], width=0.4, label="before (step 0)")
    ax.bar(x + 0.2, 100 * table["after"], width=0.4, label="after (last step)",
           yerr=100 * table["change_std"].fillna(0), capsize=4)
    ax.set_xticks(x, [f"{m}\n({n} runs)" for m, n in zip(table["model.name"], table["n_runs"], strict=True)],
                  fontsize=8)
    ax.set_xlabel("base model")
    _percent_axis(ax, p.label)
    ax.set_title(f"Before vs after EM per base model (eval T={_fmt_value(p.eval_t)}); whisker = std of the "
                 f"per-run change\n{_runs_note(int(table['n_runs'].sum()), p)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_final_by(p: Prepared, column: str, xlabel: str):
    """Last-step score per value of ``column``: every run (dots) and the mean ± std (bars)."""
    last = agg.final_step(p.main)
    last = last[last["step"] > 0]
    stats = agg.summarize(last, [column])
    fig, (ax,) = _figure(1)
    x = np.arange(len(stats))
    ax.bar(x, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), capsize=4, alpha=0.6)
    for i, v in enumerate(stats[column]):
        vals = last.loc[last[column] == v, "score"]
        ax.scatter(np.full(len(vals), i), 100 * vals, s=14, color="black")
    ax.set_xticks(x, [f"{_fmt_value(v)}\n({n} runs)" for v, n in zip(stats[column], stats["n"], strict=True)])
    ax.set_xlabel(xlabel)
    _percent_axis(ax, p.label)
    ax.set_title(f"Score after training by {column} (eval T={_fmt_value(p.eval_t)}, last step); "
                 f"bar = mean ± std, dot = run\n{_runs_note(last['run_id'].nunique(), p)}", fontsize=9)
    fig.tight_layout()
    return fig


# `em-sweep logits` methods (em_sweep/analysis/skewness.py); entries written before methods existed are raw.
SKEWNESS_METHODS = {
    "raw": "raw: raw logits (all vocabulary entries) of responses to benchmark problems.",
    "reference": "reference: as the reference's logits_shift.py, processed scores (logits / T, top-k kept) "
                 "of DSR-sub responses, every response cut to the shortest.",
    "mixed": "mixed: the entries come from different methods, whose values are not comparable.",
}


def skewness_method(entries: Sequence[dict[str, Any]]) -> str:
    """The `em-sweep logits` method of the entries: raw, reference, or mixed."""
    methods = {str(e.get("method", "raw")) for e in entries}
    return methods.pop() if len(methods) == 1 else "mixed"


def plot_skewness(entries: Sequence[dict[str, Any]]):
    """Sample skewness of the flattened logits per model (bars)."""
    fig, (ax,) = _figure(1)
    labels = [str(e.get("label") or e.get("model")) for e in entries]
    ax.bar(range(len(entries)), [float(e["skewness"]) for e in entries])
    ax.set_xticks(range(len(entries)), labels, rotation=20, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("model")
    ax.set_ylabel(f"sample skewness, {skewness_method(entries)} method (unitless)")
    ax.set_title(f"Logits skewness per model ({len(entries)} models)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- findings (pure: numbers -> text)

@dataclass
class Finding:
    key: str  # the finding's name, e.g. step_curve (its function is finding_<key>)
    title: str
    has_data: bool
    lines: list[str]
    figure: str | None = None  # PNG file name


def _trained_last(p: Prepared) -> pd.DataFrame:
    last = agg.final_step(p.main)
    return last[last["step"] > 0]


def _varies_besides(p: Prepared, column: str) -> str:
    """' Averaged over: ...' naming the other settings that vary (not those that merely rename ``column``)."""
    others = [c for c in p.settings if c != column
              and not (column in p.main and agg.same_partition(p.main, column, c))]
    return f" Averaged over: {', '.join(others)}." if others else ""


def finding_one_shot_gain(p: Prepared) -> Finding:
    title = "One prompt and ~10 steps lift a base model's math scores"
    table = agg.before_after(p.main, ["model.name"]) if not p.main.empty else pd.DataFrame()
    if table.empty:
        return Finding("one_shot_gain", title, False, ["No run has both a before score (step 0, or a `train.steps=0` baseline "
                                         "of the same model) and a trained last step."])
    lines = []
    for _, r in table.iterrows():
        lines.append(f"- `{r['model.name']}`: {pct(r['before'])} before -> {pct(r['after'])} after "
                     f"{int(r['final_step'])} steps; change {pp(r['change'])} "
                     f"(per run {pp(r['change_min'])} to {pp(r['change_max'])}; {int(r['n_runs'])} runs; "
                     f"{judged(r['change'], r['change_se'], r['before'], r['after'], p.n_problems)}).")
    amc = p.scores.iloc[0:0]
    done = p.table[(p.table["status"] == agg.DONE) & (p.table["benchmark"] == "amc23")]
    if not done.empty:
        amc = agg.final_step(agg.at_eval_temperature(agg.scores(p.table, "amc23"), p.eval_t))
        amc = amc[(amc["step"] > 0) & (amc["model.name"] == "qwen25_math_7b")]
    if not amc.empty:
        lines.append(f"- Paper: AMC23 70.3 for Qwen2.5-Math-7B after one-shot EM; here: mean "
                     f"{pct(amc['score'].mean())}, best {pct(amc['score'].max())} over {len(amc)} runs.")
    else:
        lines.append("- The paper's anchor (AMC23 70.3 for Qwen2.5-Math-7B) needs `amc23` scores of "
                     "`qwen25_math_7b`; this sweep has none.")
    return Finding("one_shot_gain", title, True, lines, "before_after.png")


def finding_step_curve(p: Prepared) -> Finding:
    title = "Step curve: loss keeps falling, score peaks (near step 10 in the paper), then declines"
    steps = sorted(p.main["step"].dropna().unique()) if not p.main.empty else []
    if len(steps) < 3:
        return Finding("step_curve", title, False, [f"Needs evaluation at three or more steps per run "
                                         f"(`eval.at_steps`); evaluated steps: {[int(s) for s in steps]}."])
    lines = [f"Evaluated steps: {', '.join(str(int(s)) for s in steps)}; curves split by "
             f"{p.group or 'nothing (one curve)'}; eval temperature {_fmt_value(p.eval_t)}."
             + _varies_besides(p, p.group or "") + f" Step axis: {step_axis(p.main)}."]
    if "updates" in p.main and step_axis(p.main) != STEP_AXIS:
        pairs = p.main[["step", "updates"]].dropna().drop_duplicates().sort_values("step")
        lines.append("Optimizer updates at each step: " + ", ".join(
            f"step {int(r.step)} = {int(r.updates)}" for r in pairs.itertuples()) + ".")
    for name, g in curve_groups(p, p.main):
        curve = agg.step_curve(g)
        peak, value = agg.peak_step(curve)
        last_step = int(curve["step"].max())
        last_value = float(curve.loc[curve["step"] == last_step, "mean"].iloc[0])
        first_value = float(curve.loc[curve["step"] == curve["step"].min(), "mean"].iloc[0])
        if peak == last_step:
            shape = "highest at the last evaluated step (no decline measured)"
        elif peak == int(curve["step"].min()) and peak == 0:
            d = agg.paired_difference(g, "step", 0, last_step)
            shape = (f"no step after training beats step 0; step {last_step} minus step 0: {pp(d['mean'])} "
                     f"({judged(d['mean'], d['se'], value, last_value, p.n_problems)})")
        else:
            d = agg.paired_difference(g, "step", peak, last_step)
            shape = (f"peak at step {peak}, then {pp(d['mean'])} by step {last_step} "
                     f"({judged(d['mean'], d['se'], value, last_value, p.n_problems)})")
        rise = agg.paired_difference(g, "step", int(curve["step"].min()), peak)
        if peak != int(curve["step"].min()):
            shape += (f"; the rise to the peak, {pp(rise['mean'])}, is "
                      f"{judged(rise['mean'], rise['se'], first_value, value, p.n_problems)}")
        lines.append(f"- {name} ({g['run_id'].nunique()} runs): step {int(curve['step'].min())} "
                     f"{pct(first_value)}, peak {pct(value)} at step {peak}, step {last_step} {pct(last_value)}; "
                     f"{shape}.")
    if p.train is not None and not p.train.empty:
        for name, g in curve_groups(p, p.train):
            curve = agg.step_curve(g, value="loss")
            first, last = curve.iloc[0], curve.iloc[-1]
            per_run = g.sort_values("step").groupby("run_id")["loss"].agg(["first", "last"])
            falling = int((per_run["last"] < per_run["first"]).sum())
            rises = int((np.diff(curve["mean"].to_numpy()) > 0).sum())
            lines.append(f"- loss, {name}: mean {first['mean']:.4g} at step {int(first['step'])} -> "
                         f"{last['mean']:.4g} at step {int(last['step'])}; lower at the end in {falling} of "
                         f"{len(per_run)} runs; the mean curve rises at {rises} of {len(curve) - 1} steps.")
    else:
        lines.append("- No loss curves collected (train table missing).")
    return Finding("step_curve", title, True, lines, "step_curve.png")


def finding_eval_temperature(p: Prepared) -> Finding:
    title = "Eval temperature: EM-trained models get worse as eval temperature rises"
    temps = sorted(p.scores["eval_temperature"].dropna().unique()) if not p.scores.empty else []
    if len(temps) < 2:
        return Finding("eval_temperature", title, False, [f"Needs two or more evaluation temperatures (`eval.temperatures`); "
                                         f"has {[float(t) for t in temps]}."])
    lo, hi = float(temps[0]), float(temps[-1])
    last = agg.final_step(p.scores)
    trained = last[last["step"] > 0]
    lines = [f"Evaluation temperatures: {', '.join(_fmt_value(float(t)) for t in temps)}."]
    if not trained.empty:
        means = trained.groupby("eval_temperature")["score"].mean()
        d = agg.paired_difference(trained, "eval_temperature", lo, hi)
        lines.append(f"- After EM (last step, {trained['run_id'].nunique()} runs): "
                     + ", ".join(f"T={_fmt_value(float(t))} {pct(v)}" for t, v in means.items())
                     + f"; from T={_fmt_value(lo)} to T={_fmt_value(hi)} the score changes by "
                       f"{pp(d['mean'])} ({judged(d['mean'], d['se'], means[lo], means[hi], p.n_problems)}).")
    before = p.scores[p.scores["step"] == 0]
    if not before.empty:
        means = before.groupby("eval_temperature")["score"].mean()
        d = agg.paired_difference(before, "eval_temperature", lo, hi)
        lines.append("- Before EM (step 0): " + ", ".join(f"T={_fmt_value(float(t))} {pct(v)}"
                                                         for t, v in means.items())
                     + f"; T={_fmt_value(lo)} -> T={_fmt_value(hi)}: {pp(d['mean'])}.")
        gains = []
        for t in temps:
            ba = agg.before_after(agg.at_eval_temperature(p.scores, float(t)), [])
            if not ba.empty:
                gains.append(f"T={_fmt_value(float(t))} {pp(float(ba['change'].iloc[0]))}")
        if gains:
            lines.append(f"- EM's change (last step - step 0) per evaluation temperature: {', '.join(gains)}.")
        lines.append(_gain_shift(p, lo, hi))
    lines.append("- The paper's contrast (RL-trained models improve with temperature) needs RL-trained runs "
                 "(`stages` with rl); see the stage_order finding.")
    return Finding("eval_temperature", title, True, lines, "eval_temperature.png")


def _gain_shift(p: Prepared, lo: float, hi: float) -> str:
    """Whether EM's change at the highest eval temperature differs from its change at the lowest (per run)."""
    last = agg.final_step(p.scores)[["run_id", "step"]].drop_duplicates()
    rows = p.scores.merge(last.rename(columns={"step": "last"}), on="run_id")
    rows = rows[(rows["last"] > 0) & ((rows["step"] == 0) | (rows["step"] == rows["last"]))
                & rows["eval_temperature"].isin([lo, hi])]
    wide = rows.pivot_table(index="run_id", columns=["eval_temperature", "step"], values="score", aggfunc="mean")
    wide.columns = [f"{t}@{'after' if s > 0 else 'before'}" for t, s in wide.columns]
    need = [f"{lo}@before", f"{lo}@after", f"{hi}@before", f"{hi}@after"]
    if any(c not in wide.columns for c in need):
        return "- EM's change could not be compared across evaluation temperatures (missing step-0 scores)."
    wide = wide[need].dropna()
    shift = (wide[need[3]] - wide[need[2]]) - (wide[need[1]] - wide[need[0]])
    n = len(shift)
    se = float(shift.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    means = [float(wide[c].mean()) for c in need]
    verdict = judged(float(shift.mean()), se, means[0], means[1], p.n_problems,
                     more=means[2:])
    return (f"- EM's change at T={_fmt_value(hi)} minus its change at T={_fmt_value(lo)}: {pp(float(shift.mean()))} "
            f"over {n} runs ({verdict}); negative means EM helps less (or hurts more) at high eval temperature.")


def finding_train_temperature(p: Prepared) -> Finding:
    title = ("Training temperature: mean score trends up with it; the best run rises then falls past ~0.5; "
             "0.5 gives most variance")
    last = _trained_last(p)
    temps = sorted(last["temperature"].dropna().unique()) if not last.empty and "temperature" in last else []
    if len(temps) < 2:
        return Finding("train_temperature", title, False, [f"Needs trained runs at two or more training temperatures "
                                         f"(`temperature`); has {[float(t) for t in temps]}."])
    stats = agg.summarize(last, ["temperature"])
    best = agg.best_runs(last, ["temperature"])
    lines = ["| training T | runs | mean | std | min | best run |", "|---|---|---|---|---|---|"]
    for (_, s), (_, b) in zip(stats.iterrows(), best.iterrows(), strict=True):
        lines.append(f"| {_fmt_value(s['temperature'])} | {int(s['n'])} | {pct(s['mean'])} | "
                     f"{_pp_abs(s['std'])} | {pct(s['min'])} | "
                     f"{pct(b['score'])} (`{b['run_id']}`) |")
    lo, hi = float(temps[0]), float(temps[-1])
    at_lo, at_hi = last.loc[last["temperature"] == lo, "score"], last.loc[last["temperature"] == hi, "score"]
    d = agg.mean_difference(at_lo, at_hi)
    trend = agg.slope(stats["temperature"], stats["mean"])
    lines.append("")
    lines.append(f"- Mean: slope {100 * trend:+.1f} pp per unit of temperature; T={_fmt_value(hi)} minus "
                 f"T={_fmt_value(lo)}: {pp(d['mean'])} "
                 f"({judged(d['mean'], d['se'], at_lo.mean(), at_hi.mean(), p.n_problems)})."
                 + _varies_besides(p, "temperature"))
    i_best = int(best["score"].to_numpy().argmax())
    t_best = float(best["temperature"].iloc[i_best])
    where = ("at the lowest temperature" if i_best == 0 else "at the highest temperature"
             if i_best == len(best) - 1 else "inside the range: it rises then falls")
    lines.append(f"- Best run: highest at T={_fmt_value(t_best)} ({pct(best['score'].iloc[i_best])}), {where}.")
    if (stats["std"].fillna(0) > 0).any():
        i_var = int(stats["std"].fillna(-1).to_numpy().argmax())
        lines.append(f"- Largest spread between runs: T={_fmt_value(float(stats['temperature'].iloc[i_var]))} "
                     f"(std {100 * stats['std'].iloc[i_var]:.1f} pp).")
    elif stats["std"].notna().any():
        lines.append("- No spread between runs at any training temperature: runs of one temperature scored the same.")
    return Finding("train_temperature", title, True, lines, "train_temperature.png")


def finding_seeds(p: Prepared) -> Finding:
    title = "Seeds: identical settings, average score differs up to 2x across seeds"
    last = _trained_last(p)
    spread = agg.seed_spread(last, p.settings) if not last.empty else pd.DataFrame()
    multi = spread[spread["n_seeds"] >= 2] if not spread.empty else spread
    if multi.empty:
        return Finding("seeds", title, False, ["Needs two or more seeds of an identical setting (same config except "
                                         "`seed`), trained and complete."])
    finite = multi["ratio"].replace(np.inf, np.nan)
    worst = multi.iloc[int(multi["spread"].to_numpy().argmax())]
    lines = [f"- {len(multi)} setting(s) with {int(multi['n_seeds'].min())}-{int(multi['n_seeds'].max())} seeds each "
             f"(last step, eval T={_fmt_value(p.eval_t)}).",
             f"- max/min ratio across seeds: median {finite.median():.2f}x, largest "
             f"{'inf (a seed scored 0)' if np.isinf(multi['ratio']).any() else f'{finite.max():.2f}x'}; "
             f"{int((multi['ratio'] >= PAPER_SEED_RATIO).sum())} of {len(multi)} reach the paper's 2x.",
             f"- widest: {', '.join(_setting_labels(worst.to_frame().T, p.settings))}: "
             f"{pct(worst['min'])} to {pct(worst['max'])} ({100 * worst['spread']:.1f} pp).",
             f"- mean max-min spread: {100 * multi['spread'].mean():.1f} pp."]
    trained_runs = p.scores[p.scores["run_id"].isin(last["run_id"])]
    agree = agg.seeds_agree(trained_runs, p.settings)
    agree = agree[agree["n_seeds"] >= 2]
    if agree["identical"].any():
        same = agree[agree["identical"]]
        lines.append(f"- In {len(same)} of {len(agree)} settings every seed gave exactly the same scores at every "
                     f"step and eval temperature ({', '.join(_setting_labels(same, p.settings))}): "
                     "the seed changed nothing measurable there.")
        if p.train is not None and not p.train.empty:
            losses = p.train.rename(columns={"loss": "score"}).assign(eval_temperature=0.0)
            same_loss = agg.seeds_agree(losses[losses["run_id"].isin(last["run_id"])], p.settings)
            same_loss = same_loss[same_loss["n_seeds"] >= 2]
            lines.append(f"- Training losses were identical across seeds at every step in {int(same_loss['identical'].sum())} "
                         f"of {len(same_loss)} settings (identical losses: the seeds drew the same samples; "
                         "different losses but equal scores: the updates differed too little to change an answer).")
    if p.n_problems:
        se = agg.binomial_se(float(last["score"].mean()), p.n_problems)
        lines.append(f"- For scale: one score is graded on ~{p.n_problems} samples, so its sampling standard "
                     f"error alone is ~{100 * se:.1f} pp at the mean score.")
    return Finding("seeds", title, True, lines, "seed_spread.png")


def family_before_after(p: Prepared) -> dict[str, dict[str, str]]:
    """Per benchmark family other than math (code, logic) in the done runs: per model, "before -> after
    (change)" at the report's eval temperature. Empty when every benchmark is math."""
    out: dict[str, dict[str, str]] = {}
    for family in agg.non_math_families(p.table[p.table["status"] == agg.DONE]):
        frame = agg.at_eval_temperature(agg.family_scores(p.table, family), p.eval_t)
        table = agg.before_after(frame, ["model.name"]) if not frame.empty else pd.DataFrame()
        out[family] = {r["model.name"]: f"{pct(r['before'])} -> {pct(r['after'])} ({pp(r['change'])})"
                       for _, r in table.iterrows()}
    return out


def finding_base_models(p: Prepared) -> Finding:
    title = "Base models: EM helps base models and hurts RL-tuned ones (SimpleRL-Zoo)"
    table = agg.before_after(p.main, ["model.name"]) if not p.main.empty else pd.DataFrame()
    if table.empty:
        return Finding("base_models", title, False, ["No model has both before (step 0) and after scores."])
    families = family_before_after(p)
    lines = ["| model | runs | before | after | change | per-run change range | |"
             + "".join(f" {f}: before -> after |" for f in families),
             "|---|---|---|---|---|---|---|" + "---|" * len(families)]
    for _, r in table.iterrows():
        lines.append(f"| `{r['model.name']}` | {int(r['n_runs'])} | {pct(r['before'])} | {pct(r['after'])} | "
                     f"{pp(r['change'])} | {pp(r['change_min'])} .. {pp(r['change_max'])} | "
                     f"{judged(r['change'], r['change_se'], r['before'], r['after'], p.n_problems)} |"
                     + "".join(f" {cells.get(r['model.name'], '-')} |" for cells in families.values()))
    lines.append("")
    if families:
        lines.append(f"- before/after: {p.label}; {', '.join(families)}: the mean accuracy of that family's "
                     "benchmarks (code: pass@1 for greedy evaluation; logic: Knights and Knaves puzzles fully "
                     "solved), each run against its own step 0.")
    if len(table) < 2:
        lines.append(f"- One base model only (`{table['model.name'].iloc[0]}`): the base vs RL-tuned contrast "
                     "needs an RL-tuned model (e.g. `model=qwen25_math_7b_simplerl_zoo`) in the sweep.")
    else:
        lines.append("- Which models are RL-tuned is not recorded in the config; read the names above.")
    return Finding("base_models", title, True, lines, "before_after.png")


def finding_one_vs_multi_shot(p: Prepared) -> Finding:
    title = "One-shot beats multi-shot EM (same steps, N distinct prompts)"
    last = _trained_last(p)
    counts = sorted(last["prompt.n_ids"].dropna().unique()) if "prompt.n_ids" in last and not last.empty else []
    if len(counts) < 2 or counts[0] != 1:
        return Finding("one_vs_multi_shot", title, False, [f"Needs one-shot (1 prompt id) and multi-shot (several prompt ids) runs; "
                                         f"numbers of prompt ids here: {[int(c) for c in counts]}."])
    one = last.loc[last["prompt.n_ids"] == 1, "score"]
    lines = [f"- one-shot: {pct(one.mean())} over {len(one)} runs."]
    for c in counts[1:]:
        many = last.loc[last["prompt.n_ids"] == c, "score"]
        d = agg.mean_difference(many, one)
        lines.append(f"- {int(c)} prompts: {pct(many.mean())} over {len(many)} runs; one-shot minus this "
                     f"{pp(d['mean'])} ({judged(d['mean'], d['se'], many.mean(), one.mean(), p.n_problems)}).")
    if "train.steps" in p.settings:
        lines.append("- `train.steps` varies in this sweep: compare within equal steps.")
    return Finding("one_vs_multi_shot", title, True, lines + [_varies_besides(p, "prompt.n_ids").strip()], "shots.png")


def finding_logits_skewness(p: Prepared) -> Finding:
    title = "Logits skewness: EM raises it, RL lowers it, EM then RL falls back toward RL's"
    entries = [e for e in p.skewness if "skewness" in e]
    if not entries:
        return Finding("logits_skewness", title, False, ["No logits analysis results (run `em-sweep logits logits.models=[...]` and put "
                                         "its skewness.json in the sweep dir, or pass `--skewness`)."])
    first = float(entries[0]["skewness"])
    lines = ["| model | skewness | vs first | values | responses | sampling T | method |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        t = (e.get("settings") or {}).get("temperature", e.get("temperature", ""))
        lines.append(f"| `{e.get('label') or e.get('model')}` | {float(e['skewness']):+.4f} | "
                     f"{float(e['skewness']) - first:+.4f} | {e.get('n_values', '')} | "
                     f"{e.get('n_responses', '')} | {t} | {e.get('method', 'raw')} |")
    lines.append("")
    lines.append(f"- Method: {SKEWNESS_METHODS.get(skewness_method(entries), skewness_method(entries))}")
    lines.append(f"- Differences are relative to the first model listed (`{entries[0].get('label') or entries[0].get('model')}`).")
    return Finding("logits_skewness", title, True, lines, "skewness.png")


def finding_stage_order(p: Prepared) -> Finding:
    title = "EM before RL helps RL; EM after RL hurts"
    last = _trained_last(p)
    stages = sorted(str(s) for s in last["stages"].dropna().unique()) if "stages" in last and not last.empty else []
    if len(stages) < 2 or not any("rl" in s.split(",") for s in stages):
        return Finding("stage_order", title, False, [f"Needs runs with different stage orders including RL "
                                         f"(`stages=[em,rl]`, `[rl,em]`, `[rl]`); stages here: {stages}."])
    stats = agg.summarize(last, ["stages"])
    steps = {str(k): sorted(int(x) for x in g["step"].dropna().unique()) for k, g in last.groupby("stages")}
    lines = [f"- `{r['stages']}`: {pct(r['mean'])} (std {100 * r['std']:.1f} pp, {int(r['n'])} runs, "
             f"after {'/'.join(map(str, steps.get(str(r['stages']), [])))} steps)"
             for _, r in stats.iterrows()]
    if len({tuple(v) for v in steps.values()}) > 1:
        lines.append("- The orders ran different numbers of steps in all (one stage vs two): compare a two-stage "
                     "order with its first stage alone as well as with the other orders.")
    return Finding("stage_order", title, True, lines, "stages.png")


FINDINGS = (finding_one_shot_gain, finding_step_curve, finding_eval_temperature, finding_train_temperature,
            finding_seeds, finding_base_models, finding_one_vs_multi_shot, finding_logits_skewness,
            finding_stage_order)


def figure_for(name: str, p: Prepared):
    """The Figure saved as ``name`` in the report."""
    makers = {
        "before_after.png": plot_before_after,
        "step_curve.png": plot_step_curve,
        "eval_temperature.png": plot_eval_temperature,
        "train_temperature.png": plot_train_temperature,
        "seed_spread.png": plot_seed_spread,
        "shots.png": lambda q: plot_final_by(q, "prompt.n_ids", "prompt ids per run (1 = one-shot)"),
        "skewness.png": lambda q: plot_skewness(q.skewness),
        "stages.png": lambda q: plot_final_by(q, "stages", "stages (in order)"),
    }
    return makers[name](p)


# ---------------------------------------------------------------- the Markdown report (I/O at the edge)

def runs_section(p: Prepared) -> list[str]:
    """Counts per status and every run that is not done, with its reason."""
    counts = agg.status_counts(p.table)
    lines = ["## Runs", "", f"{len(p.runs)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
             "Only done runs (results.json written) enter the figures and numbers below."]
    bad = agg.failures(p.table)
    if bad.empty:
        lines.append("No run is failed, running or missing.")
        return lines
    lines += ["", "Runs that are not done, by reason:", "", "| status | reason | runs | run ids |", "|---|---|---|---|"]
    for (status, reason), g in bad.groupby(["status", "reason"], sort=True):
        ids = list(g["run_id"])
        shown = ", ".join(f"`{i}`" for i in ids[:MAX_LISTED_FAILURES])
        more = f" and {len(ids) - MAX_LISTED_FAILURES} more" if len(ids) > MAX_LISTED_FAILURES else ""
        lines.append(f"| {status} | {reason.replace('|', '/') or '-'} | {len(ids)} | {shown}{more} |")
    return lines


def setup_section(p: Prepared) -> list[str]:
    lines = ["## What was measured", "",
             f"- Score: {p.label}; evaluation temperature for the step, training-temperature and seed "
             f"figures: {_fmt_value(p.eval_t)}.",
             f"- Settings that vary among done runs (besides `seed`): "
             f"{', '.join(f'`{c}`' for c in p.settings) or 'none'}."]
    for c in p.settings:
        vals = sorted({_fmt_value(v) for v in p.main[c].dropna().unique()})
        lines.append(f"  - `{c}`: {', '.join(vals[:20])}{' ...' if len(vals) > 20 else ''}")
    if "seed" in p.main:
        lines.append(f"- Seeds: {', '.join(_fmt_value(s) for s in sorted(p.main['seed'].dropna().unique()))}.")
    if p.n_problems:
        mean = float(p.main["score"].mean())
        lines.append(f"- One score is graded on ~{p.n_problems} samples (problems x samples per problem): its "
                     f"binomial standard error is ~{100 * agg.binomial_se(mean, p.n_problems):.1f} pp at the "
                     f"mean score {pct(mean)}. A difference is called clear when it exceeds 2 standard errors, "
                     "counting both the spread between runs and this sampling error of the evaluation set "
                     "(shared by all runs, so averaging runs does not remove it).")
    return lines


def build_report(p: Prepared, out_dir: Path, source: str = "") -> Path:
    """Write report.md and its figures into ``out_dir``; returns the report's path."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    findings = [f(p) for f in FINDINGS]
    made: set[str] = set()
    for f in findings:
        if f.has_data and f.figure and f.figure not in made:
            fig = figure_for(f.figure, p)
            fig.savefig(out_dir / f.figure, dpi=110)
            plt.close(fig)
            made.add(f.figure)
    lines = [f"# em-sweep report{f': {source}' if source else ''}", ""]
    lines += ["The paper's findings (docs/method.md, section 4), answered from this sweep's data only.", ""]
    lines += runs_section(p) + [""]
    if p.n_done:
        lines += setup_section(p) + [""]
    with_data = [f for f in findings if f.has_data]
    without = [f for f in findings if not f.has_data]
    lines += ["## Findings with data", ""]
    for f in with_data:
        lines += [f"### {f.title} (`{f.key}`)", ""]
        if f.figure:
            lines += [f"![{f.title}]({f.figure})", ""]
        lines += [line for line in f.lines if line is not None] + [""]
    lines += ["## Findings without data in this sweep", ""]
    for f in without:
        lines.append(f"- **{f.title}** (`{f.key}`): {' '.join(f.lines)}")
    family = objectives_report.sections(p, out_dir)  # objectives, label-free stopping, calibration
    if family:
        lines += [""] + family
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def load_skewness(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Entries of every skewness JSON in ``paths`` (a list of objects, or {"models": [...]}).

    Raises ValueError naming the file when an entry has no numeric ``skewness``.
    """
    entries: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        items = data.get("models", data.get("results", [])) if isinstance(data, dict) else data
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("skewness"), int | float):
                raise ValueError(f"{path}: each entry needs a numeric 'skewness' (and a 'label' or 'model')")
            entries.append(item)
    return entries


def find_skewness_files(source: Path) -> list[Path]:
    return [source / name for name in SKEWNESS_FILES if (source / name).is_file()]


def cmd_report(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from em_sweep.analysis.collect import (
        COLLECTED_DIR,
        CollectError,
        collect,
        read_tables,
        unwritable,
        write_tables,
    )

    source = Path(args.dir)
    try:
        if source.suffix == ".parquet" or (source / "scores.parquet").is_file() and not (source / "runs").is_dir() \
                and not (source / "manifest.jsonl").is_file():
            table, train = read_tables(source)
            base = source.parent if source.suffix == ".parquet" else source
            if base.name == COLLECTED_DIR:  # <sweep>/collected: the report and skewness.json live in <sweep>
                base = base.parent
        else:
            collected = collect(source, name=args.name, progress=not args.quiet)
            try:
                write_tables(collected, source / COLLECTED_DIR)
            except OSError as e:  # a read-only sweep: the report needs no copy of the tables
                print(f"warning: tables not saved to {source / COLLECTED_DIR} ({type(e).__name__}: "
                      f"{e.strerror or e})", file=sys.stderr)
            table, train = collected.scores, collected.train
            base = source
    except (CollectError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        skew = load_skewness([Path(s) for s in args.skewness] if args.skewness else find_skewness_files(base))
    except (ValueError, json.JSONDecodeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = prepare(table, train, skew)
    out = Path(args.out) if args.out else base / REPORT_DIR
    try:
        path = build_report(p, out, str(source))
    except OSError as e:
        print(unwritable("report", out, e), file=sys.stderr)
        return 2
    print(f"{path}\n{len(p.runs)} runs ({p.n_done} done); figures in {out}")
    return 0
