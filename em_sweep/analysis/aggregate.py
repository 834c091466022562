"""Aggregation over the collected table: pure functions, no files, no plotting.

The table (see :mod:`em_sweep.analysis.collect`) has one row per run x step x benchmark x evaluation
temperature. Its columns are the run columns (``run_id``, ``status``, ``reason`` ...), the
run's config values under dotted keys (``model.name``, ``seed``, ``temperature`` = the
*training* temperature, ``train.lr`` ...) and the score columns (``step``, ``benchmark``,
``eval_temperature``, ``accuracy`` ...). Runs that are not done have one row with empty scores.

Everything here takes a DataFrame and returns a new one (or a number); inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Columns that describe the run itself rather than its config.
RUN_COLUMNS = ("run_id", "run_dir", "status", "reason", "seconds")
# Columns that describe one score of a run.
SCORE_COLUMNS = ("step", "updates", "benchmark", "eval_temperature", "accuracy", "pass_at_n", "n", "n_problems",
                 "boxed_rate", "grader_failures", "template", "max_new_tokens", "family")
# Calibration of sampled evaluation (n > 1; em_sweep/evaluation/calibration.py), empty otherwise.
CALIBRATION_COLUMNS = ("majority_accuracy", "majority_confidence", "ece_majority", "brier_majority",
                       "seqprob_confidence", "ece_seqprob", "brier_seqprob")
SCORE_COLUMNS = SCORE_COLUMNS + CALIBRATION_COLUMNS
# Config keys that are always columns (the axes of the paper's findings).
KEY_CONFIG_COLUMNS = ("name", "model.name", "seed", "temperature", "train.lr", "prompt.name", "prompt.ids",
                      "prompt.n_ids", "train.steps", "stages", "train.step_unit")
# Config keys that never make two runs' settings different (identity, bookkeeping).
NOT_SETTINGS = ("seed", "name")
# The benchmark name evaluate.py gives the paper's average of four.
AVERAGE_OF_FOUR = "avg4"
DONE = "done"
# Benchmark families (em_sweep.evaluation.benchmarks.FAMILIES); a score without one (older runs, avg4) is math.
MATH = "math"


def family_of(table: pd.DataFrame) -> pd.Series:
    """Each row's benchmark family; math where the table has none."""
    if "family" not in table.columns:
        return pd.Series(MATH, index=table.index, dtype=object)
    return table["family"].astype(object).where(table["family"].notna(), MATH)


def math_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The math rows, which "score" means when a table mixes families; all rows when it has none."""
    math_only = table[family_of(table) == MATH]
    return math_only if not math_only.empty or table.empty else table


def config_columns(table: pd.DataFrame) -> list[str]:
    """The config columns of the table (everything that is neither a run nor a score column)."""
    return [c for c in table.columns if c not in RUN_COLUMNS and c not in SCORE_COLUMNS and c != "score"]


def setting_columns(table: pd.DataFrame, exclude: Sequence[str] = NOT_SETTINGS) -> list[str]:
    """Config columns that define "identical settings": all of them except the seed and the sweep name."""
    return [c for c in config_columns(table) if c not in exclude]


def varying_columns(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Those of ``columns`` that take more than one value over the table's rows (missing counts as a value)."""
    return [c for c in columns if c in table.columns and table[c].nunique(dropna=False) > 1]


def status_counts(table: pd.DataFrame) -> dict[str, int]:
    """Runs per status (each run counted once, whatever its number of score rows)."""
    runs = table.drop_duplicates("run_id")
    return {str(k): int(v) for k, v in runs["status"].value_counts().sort_index().items()}


def failures(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run that is not done: run_id, status, reason (empty string when none was recorded)."""
    runs = table.drop_duplicates("run_id")
    bad = runs[runs["status"] != DONE]
    out = bad[["run_id", "status", "reason"]].copy()
    out["reason"] = out["reason"].fillna("").astype(str)
    return out.sort_values(["status", "reason", "run_id"]).reset_index(drop=True)


def primary_benchmark(table: pd.DataFrame) -> str | None:
    """The benchmark a "score" means: avg4 when present, else the only benchmark, else None (= mean of
    all). Code and logic benchmarks count only where there are no math ones (their own report columns)."""
    names = sorted(str(b) for b in math_rows(table)["benchmark"].dropna().unique())
    if AVERAGE_OF_FOUR in names:
        return AVERAGE_OF_FOUR
    if len(names) == 1:
        return names[0]
    return None


def score_label(table: pd.DataFrame) -> str:
    """A human label for the score :func:`scores` returns on this table."""
    bench = primary_benchmark(table)
    if bench == AVERAGE_OF_FOUR:
        return "average of four benchmarks (avg4)"
    if bench is not None:
        return f"{bench} accuracy"
    names = sorted(str(b) for b in math_rows(table)["benchmark"].dropna().unique())
    return f"mean accuracy over {len(names)} benchmarks ({', '.join(names)})"


def default_eval_temperature(table: pd.DataFrame) -> float | None:
    """Greedy (0.0) when the table has it, else the lowest evaluation temperature; None without scores."""
    temps = table["eval_temperature"].dropna()
    if temps.empty:
        return None
    return 0.0 if (temps == 0).any() else float(temps.min())


def scores(table: pd.DataFrame, benchmark: str | None = None) -> pd.DataFrame:
    """One score per done run x step x eval temperature, in column ``score`` (a fraction in [0, 1]).

    ``benchmark`` None means :func:`primary_benchmark`: avg4 or the only benchmark; with several
    benchmarks and no avg4, the unweighted mean of the (math, where there are any) benchmarks'
    accuracies. Config columns are kept.
    """
    done = table[(table["status"] == DONE) & table["step"].notna()]
    bench = benchmark if benchmark is not None else primary_benchmark(done)
    keys = [c for c in (*RUN_COLUMNS, *config_columns(done)) if c in done.columns]
    steps = ["step", "updates"] if "updates" in done.columns else ["step"]  # updates: per run and step
    if bench is not None:
        out = done[done["benchmark"] == bench].rename(columns={"accuracy": "score"})
        return out[[*keys, *steps, "eval_temperature", "score"]].reset_index(drop=True)
    rows = math_rows(done[done["benchmark"] != AVERAGE_OF_FOUR])
    out = (rows.groupby([*keys, *steps, "eval_temperature"], dropna=False, sort=True)["accuracy"]
           .mean().rename("score").reset_index())
    return out


def non_math_families(table: pd.DataFrame) -> list[str]:
    """The families other than math among the table's scores (code, logic), sorted."""
    fam = family_of(table[table["benchmark"].notna()]) if "benchmark" in table.columns else pd.Series(dtype=object)
    return sorted(str(f) for f in fam.unique() if f != MATH)


def family_scores(table: pd.DataFrame, family: str) -> pd.DataFrame:
    """Like :func:`scores`, over one family's benchmarks only: their unweighted mean accuracy per
    done run x step x eval temperature (the only one's accuracy when there is one)."""
    rows = table[family_of(table) == family]
    done = rows[(rows["status"] == DONE) & rows["step"].notna()]
    keys = [c for c in (*RUN_COLUMNS, *config_columns(done)) if c in done.columns]
    return (done.groupby([*keys, "step", "eval_temperature"], dropna=False, sort=True)["accuracy"]
            .mean().rename("score").reset_index())


def at_eval_temperature(frame: pd.DataFrame, temperature: float | None) -> pd.DataFrame:
    """Rows evaluated at ``temperature`` (exact match; None returns no rows)."""
    if temperature is None:
        return frame.iloc[0:0]
    return frame[np.isclose(frame["eval_temperature"].astype(float), temperature)]


def final_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last evaluated step."""
    last = frame.groupby("run_id")["step"].transform("max")
    return frame[frame["step"] == last]


def summarize(frame: pd.DataFrame, by: Sequence[str], value: str = "score") -> pd.DataFrame:
    """Per group of ``by``: n (rows), mean, std (sample, ddof=1; NaN for one row), min, max of ``value``."""
    if not by:
        col = frame[value]
        return pd.DataFrame({"n": [int(col.count())], "mean": [col.mean()], "std": [col.std()],
                             "min": [col.min()], "max": [col.max()]})
    grouped = frame.groupby(list(by), dropna=False, sort=True)[value]
    return grouped.agg(n="count", mean="mean", std="std", min="min", max="max").reset_index()


def best_runs(frame: pd.DataFrame, by: Sequence[str], value: str = "score") -> pd.DataFrame:
    """Per group of ``by``: the row with the highest ``value`` (first in table order on ties)."""
    ordered = frame.reset_index(drop=True)
    idx = ordered.groupby(list(by), dropna=False, sort=True)[value].idxmax()
    return ordered.loc[idx.dropna().astype(int)].reset_index(drop=True)


def max_min_ratio(values: Sequence[float]) -> float:
    """max / min of ``values``; inf when the minimum is 0 and the maximum is not; NaN when empty or all 0."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan
    lo, hi = float(arr.min()), float(arr.max())
    if lo == 0:
        return math.inf if hi > 0 else math.nan
    return hi / lo


def seed_spread(frame: pd.DataFrame, settings: Sequence[str], value: str = "score") -> pd.DataFrame:
    """Per identical setting (same values in ``settings``): n_seeds, min, max, ratio = max/min, spread = max-min.

    ``frame`` should hold one row per run (e.g. each run's final step at one eval temperature);
    settings run with a single seed are kept with ratio 1.0.
    """
    keys = list(settings)
    if keys:
        grouped = frame.groupby(keys, dropna=False, sort=True)[value]
        out = grouped.agg(n_seeds="count", min="min", max="max", mean="mean").reset_index()
    else:  # no varying setting at all: every run has the same one
        col = frame[value]
        out = pd.DataFrame({"n_seeds": [int(col.count())], "min": [col.min()], "max": [col.max()],
                            "mean": [col.mean()]})
    out["spread"] = out["max"] - out["min"]
    out["ratio"] = [max_min_ratio([lo, hi]) for lo, hi in zip(out["min"], out["max"], strict=True)]
    return out


def step_curve(frame: pd.DataFrame, by: Sequence[str] = (), value: str = "score") -> pd.DataFrame:
    """The mean/std/min/max of ``value`` per step (per group of ``by``), over the runs in ``frame``."""
    return summarize(frame, [*by, "step"], value)


def peak_step(curve: pd.DataFrame, value: str = "mean") -> tuple[int, float]:
    """(step, value) where ``curve[value]`` is highest; the earliest step on ties."""
    ordered = curve.sort_values("step", kind="stable").reset_index(drop=True)
    i = int(ordered[value].to_numpy().argmax())
    return int(ordered.loc[i, "step"]), float(ordered.loc[i, value])


def paired_difference(frame: pd.DataFrame, column: str, a: float | str, b: float | str,
                      value: str = "score") -> dict[str, float]:
    """Per run, ``value`` at ``column == b`` minus at ``column == a``; mean, std, se and n over runs.

    Only runs that have both are counted; ``se`` is std / sqrt(n) (NaN for fewer than two runs).
    """
    wide = frame[frame[column].isin([a, b])].pivot_table(index="run_id", columns=column, values=value,
                                                          aggfunc="mean")
    if a not in wide.columns or b not in wide.columns:
        return {"mean": math.nan, "std": math.nan, "se": math.nan, "n": 0}
    diff = (wide[b] - wide[a]).dropna()
    n = int(diff.size)
    std = float(diff.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(diff.mean()) if n else math.nan, "std": std,
            "se": std / math.sqrt(n) if n > 1 else math.nan, "n": n}


def before_after(frame: pd.DataFrame, by: Sequence[str] = ("model.name",), value: str = "score") -> pd.DataFrame:
    """Per group of ``by``: the score before training, after each trained run's last step, and the change.

    ``frame`` holds one eval temperature. A run's change is its last-step score minus its own
    step-0 score; a run evaluated only after training is compared with its group's mean step-0
    score (e.g. from ``em-sweep eval`` baseline runs, which have ``train.steps=0``), and runs
    with neither are left out. Columns: n_runs (trained runs counted), final_step (max), before
    (mean of the befores used), after, change (mean), change_std, change_min, change_max,
    change_se = change_std / sqrt(n_runs). ``by`` empty: one row over all runs.
    """
    keys = list(by) or ["_all"]
    frame = frame.assign(_all="all") if not by else frame
    zero = frame[frame["step"] == 0]
    own_before = zero.groupby("run_id")[value].mean()
    group_before = zero.groupby(keys, dropna=False)[value].mean().rename("_group_before").reset_index()
    last = final_step(frame)
    trained = last[last["step"] > 0][["run_id", *keys, "step", value]].rename(columns={value: "after"})
    trained["before"] = trained["run_id"].map(own_before)
    trained = trained.merge(group_before, on=keys, how="left")
    trained["before"] = trained["before"].fillna(trained["_group_before"])
    trained = trained.dropna(subset=["before", "after"])
    trained["change"] = trained["after"] - trained["before"]
    out = (trained.groupby(keys, dropna=False, sort=True)
           .agg(n_runs=("run_id", "count"), final_step=("step", "max"), before=("before", "mean"),
                after=("after", "mean"), change=("change", "mean"), change_std=("change", "std"),
                change_min=("change", "min"), change_max=("change", "max"))
           .reset_index())
    out["change_se"] = out["change_std"] / np.sqrt(out["n_runs"])
    return out.drop(columns=["_all"]) if not by else out


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x; NaN with fewer than two distinct x."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[ok], ys[ok]
    if np.unique(xs).size < 2:
        return math.nan
    return float(np.polyfit(xs, ys, 1)[0])


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent graded samples."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def is_clear(difference: float, se: float, z: float = 2.0) -> bool:
    """True when ``|difference|`` exceeds ``z`` standard errors (False when the se is unknown)."""
    return bool(se == se and abs(difference) > z * se)  # se == se: not NaN


def mean_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """mean(b) - mean(a) for two independent groups of runs, with its (Welch) standard error.

    ``se`` is sqrt(var(a)/n_a + var(b)/n_b) with sample variances; NaN when a group has fewer than two values.
    """
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
    if xa.size == 0 or xb.size == 0:
        return {"mean": math.nan, "se": math.nan, "n_a": int(xa.size), "n_b": int(xb.size)}
    se = (math.sqrt(xa.var(ddof=1) / xa.size + xb.var(ddof=1) / xb.size)
          if xa.size > 1 and xb.size > 1 else math.nan)
    return {"mean": float(xb.mean() - xa.mean()), "se": se, "n_a": int(xa.size), "n_b": int(xb.size)}


def same_partition(frame: pd.DataFrame, a: str, b: str) -> bool:
    """True when columns ``a`` and ``b`` split the rows identically (a one-to-one map between their values)."""
    pairs = frame[[a, b]].drop_duplicates()
    return len(pairs) == frame[a].nunique(dropna=False) == frame[b].nunique(dropna=False)


def distinct_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """``columns`` without those that only repeat an earlier one (e.g. ``train.sample_temperature``
    interpolated from ``temperature``): each kept column splits the rows differently from every earlier one."""
    kept: list[str] = []
    for c in columns:
        if not any(same_partition(frame, k, c) for k in kept):
            kept.append(c)
    return kept


def difference_se(se_between: float, p_a: float, p_b: float, n_graded: int | None,
                  more: Sequence[float] = ()) -> float:
    """Standard error of a difference between two mean scores ``p_a`` and ``p_b``, counting both
    the spread between runs (``se_between``; NaN = unknown, e.g. one run) and the sampling error of
    the evaluation set, which every run shares and averaging over runs does not remove.

    The evaluation part treats the two scores as independent binomial proportions on ``n_graded``
    graded samples each: sqrt(p_a(1-p_a)/n + p_b(1-p_b)/n). For two scores of the same runs on
    the same problems this is conservative (their errors are positively correlated). Returns
    ``se_between`` alone when ``n_graded`` is unknown, NaN when neither part is known. ``more``:
    further scores in the difference (e.g. a difference of two changes has four), counted alike.
    """
    between = 0.0 if se_between != se_between else se_between  # NaN -> 0
    if not n_graded or n_graded <= 0:
        return se_between
    evaluation = sum(max(q * (1 - q), 0.0) for q in (p_a, p_b, *more)) / n_graded
    return math.sqrt(between ** 2 + evaluation)


def seeds_agree(frame: pd.DataFrame, settings: Sequence[str], value: str = "score") -> pd.DataFrame:
    """Per identical setting: n_seeds (runs) and ``identical``: True when every run of the setting has
    the same ``value`` at every step and eval temperature (e.g. sampling so peaked that seeds draw
    the same responses). ``frame`` holds all steps and eval temperatures of the runs."""
    keys = list(settings) or ["_all"]
    frame = frame.assign(_all="all") if not settings else frame
    cells = frame.groupby([*keys, "step", "eval_temperature"], dropna=False)[value].nunique()
    identical = (cells <= 1).groupby(level=list(range(len(keys))), dropna=False).all().rename("identical")
    n_seeds = frame.groupby(keys, dropna=False)["run_id"].nunique().rename("n_seeds")
    out = pd.concat([n_seeds, identical], axis=1).reset_index()
    return out.drop(columns=["_all"]) if not settings else out
