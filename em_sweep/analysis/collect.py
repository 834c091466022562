"""Collect a sweep's run directories into one tidy table (parquet).

``em-sweep collect <dir>`` accepts
- a sweep directory (``hydra.sweep.dir``, holding ``manifest.jsonl``): every run the manifest lists,
  including runs that never started (their state comes from :mod:`em_sweep.sweep.manifest`);
- a ``paths.root`` (holding ``runs/``) or a ``runs/`` directory itself: every run directory in it.

It writes two tables to ``<dir>/collected/`` (or ``--out``):

``scores.parquet``: one row per run x step x benchmark x evaluation temperature. Columns:
- run: ``run_id``, ``run_dir``, ``status`` (done | running | failed | interrupted | pending |
  missing | corrupt | unreadable), ``reason`` (why it is not done; empty for done runs; for corrupt
  and unreadable runs the file and what is wrong with it), ``seconds`` (run wall time);
- config, flattened to dotted keys: always ``name``, ``model.name``, ``seed``, ``temperature``
  (the training temperature), ``train.lr``, ``prompt.name``, ``prompt.ids``, ``prompt.n_ids``
  (len(prompt.ids): 1 = one-shot), ``train.steps``, ``stages``; plus every other key whose value
  differs between the collected runs. Lists are stored as comma-joined strings;
- score: ``step``, ``benchmark``, ``eval_temperature``, ``accuracy``, ``pass_at_n``, ``n``,
  ``n_problems``, ``boxed_rate``, ``grader_failures``, ``template``, ``max_new_tokens``,
  ``family`` (math | code | logic; empty for scores recorded before families: math), and the
  calibration columns of sampled evaluation (``aggregate.CALIBRATION_COLUMNS``; empty for n = 1).
A run that is not done (failed, running, never started) has exactly one row, with empty scores:
its scores are not mixed with complete runs', but it is never dropped.

``train.parquet``: one row per done run x training step (``step``, ``loss``, ``entropy``,
``response_length``, ``grad_norm``) with the same run and config columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_sweep import rundir
from em_sweep.analysis.aggregate import CALIBRATION_COLUMNS, KEY_CONFIG_COLUMNS, SCORE_COLUMNS

SCORES_FILE = "scores.parquet"
TRAIN_FILE = "train.parquet"
COLLECTED_DIR = "collected"
# Config keys outside the run id (where a run is recorded, documentation, speed only): runs that
# differ in them are the same experiment, so they are never listed as varying columns.
NOT_COMPARED_PREFIXES = tuple(f"{k}." for k in rundir.NOT_IN_RUN_ID)
SPEED_ONLY_COLUMNS = frozenset(rundir.NOT_IN_RUN_ID)
# One row per training step; ``stage`` says whose (em: loss = mean token entropy; rl: loss = the
# GRPO loss, with the step's mean reward).
TRAIN_FIELDS = ("step", "updates", "stage", "loss", "entropy", "reward", "response_length", "grad_norm")
INTEGER_COLUMNS = ("step", "n", "n_problems", "grader_failures", "max_new_tokens")
NO_REASON = "(no reason recorded)"


class CollectError(ValueError):
    """The directory holds no runs em-sweep can read; the message says what was looked for."""


@dataclass
class RunRecord:
    """What one run directory says: its state, config and (when done) scores and loss curve."""

    run_id: str
    run_dir: str
    status: str
    reason: str = ""
    seconds: float = math.nan
    config: dict[str, Any] = field(default_factory=dict)
    scores: list[dict[str, Any]] = field(default_factory=list)
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    rl_curve: list[dict[str, Any]] = field(default_factory=list)  # RL stage steps (reward, loss, ...)
    # For a run that never wrote a config: {dotted key: value} parsed from its sweep overrides.
    override_values: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRef:
    """A run to read: its directory, and what a sweep manifest already knows about it."""

    path: Path
    state: str | None = None
    reason: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass
class Collected:
    scores: pd.DataFrame
    train: pd.DataFrame
    source: str
    seconds: float


# ---------------------------------------------------------------- finding runs (I/O)

def find_runs(source: Path) -> tuple[str, list[RunRef]]:
    """(kind, runs) for a sweep dir ("sweep"), a paths.root ("root") or a runs dir ("runs").

    Raises CollectError when ``source`` is none of these.
    """
    source = Path(source)
    if not source.is_dir():
        raise CollectError(f"{source}: not a directory")
    if (source / "manifest.jsonl").is_file():
        return "sweep", _manifest_runs(source)
    if (source / "runs").is_dir():
        return "root", _listed_runs(source / "runs")
    refs = _listed_runs(source)
    if any(_has_run_files(r.path) for r in refs[:50]):
        return "runs", refs
    raise CollectError(f"{source}: no manifest.jsonl, no runs/ and no run directories "
                       "(pass a sweep dir, a paths.root or its runs/ dir)")


def _has_run_files(path: Path) -> bool:
    try:
        return any((path / name).exists() for name in (rundir.CONFIG, rundir.STATUS, rundir.RESULTS))
    except OSError:
        return False


def _listed_runs(runs_dir: Path) -> list[RunRef]:
    try:
        with os.scandir(runs_dir) as it:
            names = sorted(e.name for e in it if _is_dir(e) and not e.name.startswith("."))
    except OSError as e:
        raise CollectError(f"{runs_dir}: cannot be listed ({type(e).__name__}: {e.strerror or e})") from None
    return [RunRef(runs_dir / n) for n in names]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _manifest_runs(sweep_dir: Path) -> list[RunRef]:
    from em_sweep.sweep import manifest

    problems: list[str] = []
    statuses = manifest.sweep_status(sweep_dir, problems=problems)
    for problem in problems:
        print(f"warning: {sweep_dir}: skipped {problem}", file=sys.stderr)
    return [RunRef(Path(s.entry.run.run_dir), s.state, s.reason or manifest.STATE_MEANINGS.get(s.state),
                   tuple(s.entry.run.overrides)) for s in statuses]


# ---------------------------------------------------------------- reading one run (I/O)

def _read_yaml(path: Path) -> tuple[Any, str | None]:
    """(value, None), (None, None) when absent, or (None, why) when it cannot be read or parsed."""
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name}: cannot be read ({type(e).__name__})"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader), None
    except yaml.YAMLError as e:
        return None, f"{path.name}: not valid YAML ({str(e).splitlines()[0][:120]})"


def _list_of_dicts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, dict) for x in value)


def _results_problem(results: dict[str, Any]) -> str | None:
    """Why a parsed results.json cannot be tabled (wrong types), or None."""
    for key in ("scores", "loss_curve", "rl_curve"):
        if results.get(key) is not None and not _list_of_dicts(results[key]):
            return f"{rundir.RESULTS}: {key} is not a list of records"
    if results.get("config") is not None and not isinstance(results["config"], dict):
        return f"{rundir.RESULTS}: config is not a mapping"
    seconds = results.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)):
        return f"{rundir.RESULTS}: seconds {seconds!r} is not a number"
    return None


def read_run(ref: RunRef) -> RunRecord:
    """Read one run directory: results.json when done (verified: it parses and names this run),
    else status + config. Never raises for what the directory holds: a file that cannot be read
    makes the run ``corrupt`` (its results.json) or ``unreadable`` (anything else), with the reason."""
    try:
        return _read_run(ref)
    except Exception as e:  # noqa: BLE001 - one bad run directory must not stop a collect
        return RunRecord(run_id=ref.path.name, run_dir=str(ref.path), status="unreadable",
                         reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                         override_values=values_from_overrides(ref.overrides))


def _read_run(ref: RunRef) -> RunRecord:
    path = ref.path
    state, why, results = rundir.verified_results(path)
    if state == rundir.COMPLETE and results is not None:
        problem = _results_problem(results)
        if problem is None:
            return RunRecord(run_id=path.name, run_dir=str(path), status="done",
                             seconds=float(results.get("seconds", math.nan)), config=results.get("config") or {},
                             scores=results.get("scores") or [], loss_curve=results.get("loss_curve") or [],
                             rl_curve=results.get("rl_curve") or [])
        state, why = rundir.UNREADABLE, problem
    if state in (rundir.CORRUPT, rundir.UNREADABLE):
        return RunRecord(run_id=path.name, run_dir=str(path), status=state, reason=str(why),
                         override_values=values_from_overrides(ref.overrides))
    status, status_problem = rundir.read_json_file(path / rundir.STATUS)
    if status_problem is None and status is not None and not isinstance(status, dict):
        status_problem = f"{rundir.STATUS}: a JSON {type(status).__name__}, not a status record"
    config, config_problem = _read_yaml(path / rundir.CONFIG)
    if config_problem is None and config is not None and not isinstance(config, dict):
        config_problem = f"{rundir.CONFIG}: not a mapping"
    problem = ref.reason if ref.state in ("corrupt", "unreadable") else (status_problem or config_problem)
    if problem:
        return RunRecord(run_id=path.name, run_dir=str(path), status="unreadable", reason=str(problem),
                         override_values=values_from_overrides(ref.overrides))
    status = status or {}
    state = ref.state or status.get("state") or ("pending" if path.exists() else "missing")
    if state == "done":  # status says done but results.json is absent: it died while finishing
        state = "interrupted"
    reason = ref.reason or status.get("reason") or (NO_REASON if state == "failed" else "")
    if isinstance(config, dict):
        return RunRecord(run_id=path.name, run_dir=str(path), status=str(state), reason=str(reason), config=config)
    return RunRecord(run_id=path.name, run_dir=str(path), status=str(state), reason=str(reason),
                     override_values=values_from_overrides(ref.overrides))


_OVERRIDE_CACHE: dict[str, tuple[str, Any] | None] = {}


def values_from_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """{dotted key: value} that a run's sweep overrides set (Hydra's own override parser).

    Best effort for runs that never wrote a config; a group override (``model=qwen25_math_7b``)
    gives its group name as the key, unparsable or delete overrides give nothing.
    """
    if not overrides:
        return {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = None
    out: dict[str, Any] = {}
    for text in overrides:
        if text not in _OVERRIDE_CACHE:
            parser = parser or OverridesParser.create()
            try:
                o = parser.parse_override(text)
                _OVERRIDE_CACHE[text] = None if o.is_delete() else (o.key_or_group, o.value())
            except Exception:  # noqa: BLE001 - an unparsable override just gives no column
                _OVERRIDE_CACHE[text] = None
        parsed = _OVERRIDE_CACHE[text]
        if parsed is not None:
            out[parsed[0]] = parsed[1]
    return out


# ---------------------------------------------------------------- building tables (pure)

def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted key: scalar}; lists become comma-joined strings (lists of dicts: JSON)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _scalar(value)
    return out


def _scalar(value: Any) -> Any:
    if isinstance(value, list | tuple):
        if all(not isinstance(v, Mapping | list | tuple) for v in value):
            return ",".join(str(v) for v in value)
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _n_ids(record: RunRecord) -> int | None:
    prompt = record.config.get("prompt")
    ids = prompt.get("ids") if isinstance(prompt, Mapping) else record.override_values.get("prompt.ids")
    return len(ids) if isinstance(ids, list) else None


@dataclass
class TableParts:
    """The tables of some runs before the config columns are chosen (that needs every run)."""

    configs: pd.DataFrame  # every flattened config key, one row per run
    recorded: set[str]  # keys that come from a recorded config (not only from sweep overrides)
    runs: pd.DataFrame  # run_id, run_dir, status, reason, seconds
    scores: pd.DataFrame  # the score columns, one row per score (one empty row for a run without)
    score_counts: np.ndarray  # rows per run in ``scores``
    curve: pd.DataFrame  # the loss-curve columns
    curve_counts: np.ndarray


def table_parts(records: Sequence[RunRecord]) -> TableParts:
    """What the (scores, train) tables need of each run, for a subset of the runs (:func:`assemble_tables` joins them)."""
    flat = []
    for r in records:
        row = flatten(r.config) if r.config else {k: _scalar(v) for k, v in r.override_values.items()}
        row["prompt.n_ids"] = _n_ids(r)
        flat.append(row)
    configs = pd.DataFrame.from_records(flat, index=range(len(records))) if records else pd.DataFrame()
    recorded = {k for r, row in zip(records, flat, strict=True) if r.config for k in row}
    runs = pd.DataFrame({
        "run_id": pd.Series([r.run_id for r in records], dtype=object),
        "run_dir": pd.Series([r.run_dir for r in records], dtype=object),
        "status": pd.Series([r.status for r in records], dtype=object),
        "reason": pd.Series([r.reason for r in records], dtype=object),
        "seconds": np.array([r.seconds for r in records], dtype=float),
    })
    score_counts = np.array([max(len(r.scores), 1) for r in records], dtype=np.int64)
    score_dicts: list[dict[str, Any]] = []
    for r in records:
        score_dicts.extend(r.scores if r.scores else [{}])
    raw = pd.DataFrame.from_records(score_dicts) if score_dicts else pd.DataFrame()
    raw = raw.rename(columns={"temperature": "eval_temperature"})
    scores = _clean_types(pd.DataFrame({c: raw[c] if c in raw.columns else np.nan for c in SCORE_COLUMNS},
                                       index=range(len(raw))))
    for c in INTEGER_COLUMNS:
        scores[c] = pd.to_numeric(scores[c], errors="coerce").astype("Int64")
    for c in ("eval_temperature", "accuracy", "pass_at_n", "boxed_rate", *CALIBRATION_COLUMNS):
        scores[c] = pd.to_numeric(scores[c], errors="coerce").astype(float)
    curve_counts = np.array([len(r.loss_curve) + len(r.rl_curve) for r in records], dtype=np.int64)
    curve_dicts = [c for r in records for c in (*({"stage": "em", **x} for x in r.loss_curve),
                                                 *({"stage": "rl", **x} for x in r.rl_curve))]
    raw_curve = pd.DataFrame.from_records(curve_dicts) if curve_dicts else pd.DataFrame()
    curve = pd.DataFrame({c: raw_curve[c] if c in raw_curve.columns else np.nan for c in TRAIN_FIELDS},
                         index=range(len(raw_curve)))
    curve["step"] = pd.to_numeric(curve["step"], errors="coerce").astype("Int64")
    return TableParts(configs, recorded, runs, scores, score_counts, curve, curve_counts)


def assemble_tables(parts: Sequence[TableParts]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, train) from the parts of all runs: keeps the key config columns and those that vary."""
    parts = [p for p in parts if len(p.runs)] or list(parts[:1])
    if not parts:
        parts = [table_parts([])]
    configs = pd.concat([p.configs for p in parts], ignore_index=True)
    recorded = set().union(*(p.recorded for p in parts))
    if recorded:  # override-only keys (group names like `model`) say nothing the configs don't
        configs = configs[[c for c in configs.columns if c in recorded or c in KEY_CONFIG_COLUMNS]]
    compared = [c for c in configs.columns if not c.startswith(NOT_COMPARED_PREFIXES) and c not in SPEED_ONLY_COLUMNS]
    varying = [c for c in compared if configs[c].nunique(dropna=False) > 1]
    for c in KEY_CONFIG_COLUMNS:  # always there (empty where no run recorded it), for the report's groupings
        if c not in configs.columns:
            configs[c] = pd.Series([None] * len(configs), index=configs.index, dtype=object)
    keep = list(KEY_CONFIG_COLUMNS)
    keep += sorted(c for c in varying if c not in keep)
    runs = pd.concat([p.runs for p in parts], ignore_index=True)
    runs = pd.concat([runs, _clean_types(configs[keep]) if keep else configs.iloc[:, :0]], axis=1)
    index = np.arange(len(runs))
    score_counts = np.concatenate([p.score_counts for p in parts])
    curve_counts = np.concatenate([p.curve_counts for p in parts])
    table = pd.concat([runs.iloc[np.repeat(index, score_counts)].reset_index(drop=True),
                       pd.concat([p.scores for p in parts], ignore_index=True)], axis=1)
    train = pd.concat([runs.iloc[np.repeat(index, curve_counts)].reset_index(drop=True),
                       pd.concat([p.curve for p in parts], ignore_index=True)], axis=1)
    return table, train


def _clean_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Make every column parquet-storable: mixed-type object columns become strings."""
    out = frame.copy()
    for c in out.columns:
        col = out[c]
        if col.dtype != object:
            continue
        kinds = {type(v) for v in col.dropna()}
        if kinds <= {bool}:
            out[c] = col.astype("boolean")
        elif kinds and kinds <= {int, float} and bool not in kinds:
            out[c] = pd.to_numeric(col)
        elif kinds and not kinds <= {str}:
            out[c] = col.map(lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


# ---------------------------------------------------------------- the collect entry points

CHUNK_RUNS = 500
# Below this many runs, reading in this process is as fast as starting workers.
PARALLEL_MIN_RUNS = 2000


def _read_parts(refs: Sequence[RunRef], name: str | None, kind: str) -> TableParts:
    """Read some runs (in a worker process for large sweeps) and build their table parts."""
    records = [read_run(ref) for ref in refs]
    if name is not None:
        records = [r for r in records
                   if r.config.get("name") == name or (kind == "sweep" and not r.config)]
    return table_parts(records)


class _Progress:
    """A progress bar over runs on stderr: tqdm when installed, else a line every ~10%."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.bar: Any = None
        self.next_line = max(1, total // 10)
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc="collect", unit="run", file=sys.stderr, mininterval=0.5, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line or self.done == self.total:
            print(f"collect: {self.done}/{self.total} runs", file=sys.stderr, flush=True)
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_workers(n_runs: int) -> int:
    """Worker processes for reading ``n_runs``: 1 below PARALLEL_MIN_RUNS, else the CPUs this
    process may use (at most 8: reading is then bound by the file system)."""
    if n_runs < PARALLEL_MIN_RUNS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def collect(source: Path | str, name: str | None = None, progress: bool = True,
            workers: int | None = None) -> Collected:
    """Read every run under ``source`` (see :func:`find_runs`) into the scores and train tables.

    ``name`` keeps runs whose recorded ``config.name`` equals it; runs that never wrote a config
    are kept only when a sweep manifest lists them (they belong to that sweep). Large sweeps are
    read by ``workers`` processes (default :func:`default_workers`) in chunks of CHUNK_RUNS runs;
    the tables are the same whatever the number of workers.
    """
    t0 = time.perf_counter()
    kind, refs = find_runs(Path(source))
    chunks = [refs[i:i + CHUNK_RUNS] for i in range(0, len(refs), CHUNK_RUNS)]
    n_workers = default_workers(len(refs)) if workers is None else max(1, workers)
    bar = _Progress(len(refs), progress)
    parts: list[TableParts] = []
    try:
        if n_workers > 1 and len(chunks) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
            with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
                futures = [pool.submit(_read_parts, chunk, name, kind) for chunk in chunks]
                for chunk, future in zip(chunks, futures, strict=True):
                    parts.append(future.result())
                    bar.update(len(chunk))
        else:
            for chunk in chunks:
                parts.append(_read_parts(chunk, name, kind))
                bar.update(len(chunk))
    finally:
        bar.close()
    scores, train = assemble_tables(parts)
    return Collected(scores=scores, train=train, source=str(source), seconds=time.perf_counter() - t0)


def write_tables(collected: Collected, out_dir: Path) -> tuple[Path, Path]:
    """Write scores.parquet and train.parquet into ``out_dir`` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame, filename in ((collected.scores, SCORES_FILE), (collected.train, TRAIN_FILE)):
        target = out_dir / filename
        tmp = out_dir / f".{filename}.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, target)
        paths.append(target)
    return paths[0], paths[1]


def read_tables(path: Path | str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(scores, train) from a scores.parquet file or a directory holding them (train may be absent)."""
    path = Path(path)
    scores_path = path if path.suffix == ".parquet" else path / SCORES_FILE
    train_path = scores_path.with_name(TRAIN_FILE)
    scores = pd.read_parquet(scores_path)
    train = pd.read_parquet(train_path) if train_path.is_file() else None
    return scores, train


def summary_line(collected: Collected) -> str:
    """Counts per status and rows, e.g. for the command's last line."""
    runs = collected.scores.drop_duplicates("run_id")
    counts = runs["status"].value_counts()
    states = ", ".join(f"{k} {v}" for k, v in counts.items())
    return (f"{len(runs)} runs ({states}); {len(collected.scores)} score rows, {len(collected.train)} train rows; "
            f"{collected.seconds:.1f}s")


def unwritable(what: str, out: Path, e: OSError) -> str:
    """The one-line error of a command whose output directory (``--out``) cannot be written."""
    return (f"error: cannot write the {what} to {out} ({type(e).__name__}: {e.strerror or e}); "
            "choose another directory with --out")


def cmd_collect(args: argparse.Namespace) -> int:
    source = Path(args.dir)
    try:
        collected = collect(source, name=args.name, progress=not args.quiet)
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else source / COLLECTED_DIR
    try:
        scores_path, train_path = write_tables(collected, out)
    except OSError as e:
        print(unwritable("tables", out, e), file=sys.stderr)
        return 2
    print(f"{scores_path}\n{train_path}\n{summary_line(collected)}")
    return 0
