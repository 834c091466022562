"""A sweep's GPU-hours from figures the project measured, not assumed per run.

Each run's work follows from its resolved config (:func:`run_work`): its EM steps, and its
evaluations (evaluation points x responses per evaluation: for each temperature, each
benchmark's problems x samples per problem, as ``em_sweep.evaluation.evaluate`` generates them). The time
that work takes comes from a measured-figures file (``benchmarks/results/measured.json``, written
by ``benchmarks/gpu_session.sh``), per model shape (``model.shape`` in the model preset)::

    run seconds = EM steps x em_step_s
                + evaluation responses x mean response tokens / eval_tokens_per_s

The mean response length is an assumption the file states (``assumed.eval_mean_response_tokens``,
capped by the run's ``eval.max_new_tokens``). A shape without figures, or a run with an RL stage
(no RL step has been measured), is reported as unknown rather than given a made-up number.

Pure functions over plain data; reading the file is :func:`load_figures`. No torch import.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_sweep.config import Config, ConfigError, eval_steps, stage_plan

# The checkout's file; benchmarks/gpu_session.sh writes it on a GPU machine.
DEFAULT_FIGURES = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "measured.json"


@dataclass(frozen=True)
class ShapeFigures:
    """Measured speed of one model shape on one card."""

    em_step_s: float
    eval_tokens_per_s: float
    card: str
    date: str


@dataclass(frozen=True)
class Figures:
    """The measured-figures file: per-shape figures and the stated response-length assumption."""

    path: str
    shapes: dict[str, ShapeFigures]
    eval_mean_response_tokens: float


@dataclass(frozen=True)
class RunWork:
    """What one run computes, in the units the figures price."""

    shape: str | None
    em_steps: int
    rl_steps: int
    # Generated evaluation responses over the whole run (all evaluation points).
    eval_responses: int
    eval_max_new_tokens: int


@dataclass
class ShapeCost:
    """The estimate for the runs of one shape."""

    shape: str
    runs: int = 0
    em_steps: int = 0
    eval_responses: int = 0
    em_hours: float = 0.0
    eval_hours: float = 0.0

    @property
    def hours(self) -> float:
        return self.em_hours + self.eval_hours


@dataclass
class Estimate:
    """The plan's cost: known per shape, and the runs that have no figures (with why)."""

    figures: Figures | None
    known: dict[str, ShapeCost] = field(default_factory=dict)
    # reason -> number of runs
    unknown: dict[str, int] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return sum(c.hours for c in self.known.values())

    @property
    def n_known(self) -> int:
        return sum(c.runs for c in self.known.values())


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}.{key}: must be a number > 0, got {value!r}")
    return float(value)


def parse_figures(data: Any, path: str) -> Figures:
    """Figures from the file's JSON; ConfigError naming the file and key for a malformed one."""
    if not isinstance(data, Mapping) or not isinstance(data.get("shapes"), Mapping):
        raise ConfigError(f"{path}: needs a top-level object with a 'shapes' object")
    shapes = {}
    for name, entry in data["shapes"].items():
        where = f"{path}: shapes.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be an object")
        shapes[str(name)] = ShapeFigures(em_step_s=_number(entry, "em_step_s", where),
                                         eval_tokens_per_s=_number(entry, "eval_tokens_per_s", where),
                                         card=str(entry.get("card", "?")), date=str(entry.get("date", "?")))
    assumed = data.get("assumed")
    tokens = _number(assumed if isinstance(assumed, Mapping) else {}, "eval_mean_response_tokens",
                     f"{path}: assumed")
    return Figures(path=path, shapes=shapes, eval_mean_response_tokens=tokens)


def load_figures(path: str | Path | None) -> Figures | None:
    """The figures at ``path`` (None: the checkout's file); None when that file does not exist.

    A file that exists but cannot be read is a ConfigError naming it."""
    file = Path(path).expanduser() if path else DEFAULT_FIGURES
    if not file.is_file():
        if path:
            raise ConfigError(f"hydra.launcher.cost_figures: no such file {file}")
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not readable JSON ({str(e).splitlines()[0]})") from None
    return parse_figures(data, str(file))


def run_work(config: Config, problems: Callable[[Any, int | None], tuple[int, int]],
             samples: Callable[[Any, int, float], int]) -> RunWork:
    """The work of the run ``config`` (attribute access over the resolved config).

    ``problems(entry, limit)``: (problems, repeats) of an ``eval.benchmarks`` entry, the first
    ``eval.limit`` problems;
    ``samples(eval, repeats, temperature)``: responses per problem (em_sweep.evaluation.evaluate's rule).
    Evaluation points: :func:`em_sweep.config.eval_steps`.
    """
    plan = stage_plan(config)
    points = eval_steps(config)
    per_eval = 0
    for temperature in config.eval.temperatures:
        for entry in config.eval.benchmarks:
            n, repeats = problems(entry, config.eval.limit)
            per_eval += n * samples(config.eval, repeats, float(temperature))
    steps = {name: last - first + 1 for name, first, last in plan}
    return RunWork(shape=config.model.get("shape"), em_steps=max(0, steps.get("em", 0)),
                   rl_steps=max(0, steps.get("rl", 0)), eval_responses=len(points) * per_eval,
                   eval_max_new_tokens=int(config.eval.max_new_tokens))


def estimate(works: Iterable[RunWork], figures: Figures | None) -> Estimate:
    """GPU-hours of ``works`` from ``figures``; runs that cannot be priced are counted by reason."""
    result = Estimate(figures=figures)
    for work in works:
        if figures is None:
            reason = "no measured-figures file"
        elif work.shape is None:
            reason = "model.shape not set in the model preset"
        elif work.shape not in figures.shapes:
            reason = f"shape {work.shape!r}: no measured figures"
        elif work.rl_steps:
            reason = "RL stage: no measured RL step"
        else:
            reason = ""
        if reason:
            result.unknown[reason] = result.unknown.get(reason, 0) + 1
            continue
        assert figures is not None and work.shape is not None
        f = figures.shapes[work.shape]
        tokens = min(figures.eval_mean_response_tokens, work.eval_max_new_tokens)
        cost = result.known.setdefault(work.shape, ShapeCost(work.shape))
        cost.runs += 1
        cost.em_steps += work.em_steps
        cost.eval_responses += work.eval_responses
        cost.em_hours += work.em_steps * f.em_step_s / 3600
        cost.eval_hours += work.eval_responses * tokens / f.eval_tokens_per_s / 3600
    return result


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 10 else f"{h:.2f}"


def describe(result: Estimate, n_runs: int) -> list[str]:
    """The dry-run's cost lines: the total, each shape's figures and sums, the unknown runs."""
    figures = result.figures
    if figures is None:
        return [f"  estimated cost:   unknown for all {n_runs} runs (no measured-figures file: {DEFAULT_FIGURES}; "
                "benchmarks/gpu_session.sh writes it)"]
    scope = "all" if result.n_known == n_runs else f"{result.n_known:,} of {n_runs:,}"
    lines = [f"  estimated cost:   {_hours(result.hours)} GPU-hours for {scope} runs (figures: {figures.path}; "
             f"evaluation responses assumed {figures.eval_mean_response_tokens:g} tokens on average, "
             "capped by eval.max_new_tokens)"]
    for shape, c in sorted(result.known.items()):
        f = figures.shapes[shape]
        lines.append(f"    shape {shape}: {c.runs:,} runs, {_hours(c.hours)} GPU-hours = {c.em_steps:,} EM steps x "
                     f"{f.em_step_s:g} s ({_hours(c.em_hours)} h) + {c.eval_responses:,} evaluation responses at "
                     f"{f.eval_tokens_per_s:,.0f} tokens/s ({_hours(c.eval_hours)} h); {f.card}, {f.date}")
    for reason, count in sorted(result.unknown.items()):
        lines.append(f"    unknown: {count:,} runs ({reason})")
    return lines


def problem_counter() -> Callable[[Any, int | None], tuple[int, int]]:
    """``problems(entry)`` for :func:`run_work` over the real benchmark files, each file read once."""
    from em_sweep.evaluation.benchmarks import load_benchmark, resolve_spec  # lazy: the grader module

    memo: dict[str, tuple[int, int]] = {}

    def problems(entry: Any, limit: int | None = None) -> tuple[int, int]:
        key = json.dumps([entry, limit], sort_keys=True, default=str)
        if key not in memo:
            spec = resolve_spec(dict(entry) if isinstance(entry, Mapping) else entry)
            memo[key] = (len(load_benchmark(spec, limit)), spec.repeats)
        return memo[key]

    return problems


def works_key(config: Mapping[str, Any]) -> str:
    """The parts of a resolved config :func:`run_work` reads, as a memo key."""
    e = config["eval"]
    return json.dumps([config["model"].get("shape"), config["stages"], config["train"]["steps"],
                       config["rl"]["steps"], e["at_steps"], e["temperatures"], e["n_samples"], e["benchmarks"],
                       e["limit"], e["max_new_tokens"]], sort_keys=True, default=str)

