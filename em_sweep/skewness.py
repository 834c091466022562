"""Logits skewness (MISSION.md s4.8): how EM reshapes the distribution of a model's raw logits.

For each model, sample N responses to the first N problems of a benchmark (the evaluation prompt
template; defaults 20 responses, 500 new tokens, temperature 0.6), re-run the model on them and
take the raw logits at every position that produced a response token (all vocabulary entries),
flattened. Reported per model: the sample skewness of those values (equal to
``scipy.stats.skew`` on the same values, i.e. the biased estimator m3 / m2^1.5), mean, std, and a
fixed-bin histogram; a figure overlays the models' histograms.

It streams. Logits are computed one micro-batch of responses at a time and folded into running
central moments (:class:`Moments`, merged with Chan/Pebay's pairwise formulas in float64) and a
fixed-bin histogram; no tensor larger than one micro-batch's logits is ever built (for Qwen 20 x
500 x 152k logits would be 6 GB in fp32). The histogram's range is the values' [min, max], found
by a first pass over the same responses (forward passes are cheap next to sampling), unless
``range=[lo,hi]`` is given (one pass; values outside are counted as under/overflow).

``divide_by_temperature=true`` divides the logits by the sampling temperature first, as the
reference script did: it rescales the histogram, mean and std; the skewness is scale-invariant.

Result JSON (``<out-dir>/skewness.json``): a list with one object per model, in the order given::

    [{"model": <as given>, "label": <legend name>, "path": <resolved model path>,
      "skewness": float, "n_values": int, "mean": float, "std": float (population),
      "min": float, "max": float, "divided_by_temperature": bool,
      "n_responses": int, "mean_response_tokens": float, "eos_rate": float,
      "histogram": {"edges": [bins + 1 floats], "counts": [bins ints], "underflow": int, "overflow": int},
      "settings": {"n_responses", "max_new_tokens", "temperature", "top_p", "template", "benchmark",
                   "seed", "bins", "range", "micro_batch_size", "divide_by_temperature"}}, ...]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module; torch loads only when it is used
    import torch

# Values per float64 chunk when folding logits into the statistics (bounds the temporaries).
DEFAULT_CHUNK_VALUES = 1 << 22


# ---------------------------------------------------------------- pure statistics

@dataclass(frozen=True)
class Moments:
    """Count, mean and sums of 2nd/3rd powers of deviations from the mean (float64)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0

    @staticmethod
    def of(values: torch.Tensor) -> Moments:
        """The moments of a tensor's values (any shape), computed in float64 on its device."""
        import torch

        x = values.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return Moments()
        mean = x.mean()
        d = x - mean
        d2 = d * d
        return Moments(int(x.numel()), float(mean), float(d2.sum()), float((d2 * d).sum()))

    @property
    def variance(self) -> float:
        """Population variance (ddof=0); NaN for no values."""
        return self.m2 / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.n else math.nan

    @property
    def skewness(self) -> float:
        """m3 / m2^1.5 with population moments: ``scipy.stats.skew(values)`` (bias=True). NaN if constant."""
        if self.n == 0 or self.m2 <= 0:
            return math.nan
        return (self.m3 / self.n) / (self.m2 / self.n) ** 1.5


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two disjoint sets of values (Chan et al.; Pebay 2008)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / n)
    m3 = (a.m3 + b.m3 + delta ** 3 * (a.n * b.n * (a.n - b.n) / (n * n))
          + 3.0 * delta * (a.n * b.m2 - b.n * a.m2) / n)
    return Moments(n, mean, m2, m3)


@dataclass
class Histogram:
    """Fixed bins over [lo, hi] (the last bin includes hi); values outside are counted apart."""

    lo: float
    hi: float
    bins: int
    counts: list[int] = field(default_factory=list)
    underflow: int = 0
    overflow: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.bins < 1:
            raise ValueError(f"histogram needs a finite range and >= 1 bin, got [{self.lo}, {self.hi}], {self.bins}")
        if self.hi <= self.lo:  # all values equal: one unit-wide range around them
            self.lo, self.hi = self.lo - 0.5, self.lo + 0.5
        if not self.counts:
            self.counts = [0] * self.bins

    @property
    def edges(self) -> list[float]:
        width = (self.hi - self.lo) / self.bins
        return [self.lo + i * width for i in range(self.bins)] + [self.hi]

    def add(self, values: torch.Tensor) -> None:
        import torch

        x = values.detach().reshape(-1).to(torch.float64)
        counts = torch.histc(x, bins=self.bins, min=self.lo, max=self.hi)
        self.counts = [c + int(v) for c, v in zip(self.counts, counts.tolist(), strict=True)]
        self.underflow += int((x < self.lo).sum())
        self.overflow += int((x > self.hi).sum())


# ---------------------------------------------------------------- streaming over a model's logits

def response_logits(model: Any, batch: Any, micro_batch_size: int) -> Iterator[torch.Tensor]:
    """Raw logits [positions, vocab] at the positions that produced response tokens, one micro-batch
    of responses at a time (``batch`` is a :class:`em_sweep.sample.SampleBatch`).

    Only the logits from the last prompt position on are computed when the model supports
    ``logits_to_keep``; no tensor larger than one micro-batch's logits is built.
    """
    import torch

    from em_sweep.sample import position_ids_for

    first = batch.prompt_len - 1  # the last prompt position produced the first response token
    seq = batch.input_ids.shape[1]
    kwargs = {"logits_to_keep": seq - first} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, batch.input_ids.shape[0], micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            ids, attn = batch.input_ids[rows], batch.attention_mask[rows]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_for(attn),
                               use_cache=False, **kwargs).logits
            logits = logits[:, -(seq - first):]
            mask = batch.response_mask[rows, first:].bool().to(logits.device)
            selected = logits[mask]
            del logits
            yield selected
    finally:
        model.train(was_training)


def _chunks(values: torch.Tensor, chunk_values: int) -> Iterator[torch.Tensor]:
    rows = max(1, chunk_values // max(values.shape[-1], 1))
    for start in range(0, values.shape[0], rows):
        yield values[start:start + rows]


@dataclass(frozen=True)
class LogitStatistics:
    moments: Moments
    minimum: float
    maximum: float
    histogram: Histogram


def stream_statistics(passes: Callable[[], Iterable[torch.Tensor]], bins: int = 200,
                      value_range: tuple[float, float] | None = None, scale: float = 1.0,
                      chunk_values: int = DEFAULT_CHUNK_VALUES) -> LogitStatistics:
    """Moments, extremes and a ``bins``-bin histogram of every value the streams yield, times ``scale``.

    ``passes`` is a callable returning a fresh iterable of tensors (the same values each time):
    it is called twice without ``value_range`` (moments and range, then the histogram), once
    with it. Each tensor is folded in float64 chunks of at most ``chunk_values`` values.
    """
    import torch

    moments, lo, hi = Moments(), math.inf, -math.inf
    hist = Histogram(*value_range, bins) if value_range is not None else None
    for values in passes():
        for chunk in _chunks(values, chunk_values):
            x = chunk.to(torch.float64) * scale
            moments = merge_moments(moments, Moments.of(x))
            if x.numel():
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            if hist is not None:
                hist.add(x)
    if moments.n == 0:
        raise ValueError("no logits to analyse (no response tokens were generated)")
    if hist is None:
        hist = Histogram(lo, hi, bins)
        for values in passes():
            for chunk in _chunks(values, chunk_values):
                hist.add(chunk.to(torch.float64) * scale)
    return LogitStatistics(moments, lo, hi, hist)


# ---------------------------------------------------------------- one model

@dataclass(frozen=True)
class LogitsSettings:
    """What ``em-sweep logits`` samples and how it bins; defaults follow the paper's analysis."""

    n_responses: int = 20
    max_new_tokens: int = 500
    temperature: float = 0.6
    top_p: float = 1.0
    # Evaluation prompt template (qwen25-math-cot | chat | plain); None = the config's eval.template.
    template: str | None = None
    # Benchmark whose first n_responses problems are the prompts; None = the config's first benchmark.
    benchmark: str | None = None
    # Sampler seed; None = the config's eval.seed.
    seed: int | None = None
    bins: int = 200
    range: tuple[float, float] | None = None
    micro_batch_size: int = 4
    sample_batch_size: int = 20
    divide_by_temperature: bool = False


def analyse_model(model: Any, tokenizer: Any, questions: Sequence[str], settings: LogitsSettings,
                  chunk_values: int = DEFAULT_CHUNK_VALUES) -> dict[str, Any]:
    """Sample one response per question, then stream the statistics of its response logits.

    Every model analysed with the same questions and seed gets the same prompts and sampler seed.
    """
    from em_sweep.prompts import format_eval_prompt
    from em_sweep.sample import SamplingSettings, sample_responses

    texts = [format_eval_prompt(tokenizer, q, settings.template or "qwen25-math-cot") for q in questions]
    sampling = SamplingSettings(temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=settings.max_new_tokens)
    batch = sample_responses(model, tokenizer, texts, sampling, batch_size=settings.sample_batch_size,
                             seed=settings.seed)
    scale = 1.0 / settings.temperature if settings.divide_by_temperature else 1.0
    stats = stream_statistics(lambda: response_logits(model, batch, settings.micro_batch_size), settings.bins,
                              settings.range, scale, chunk_values)
    m = stats.moments
    return {
        "skewness": m.skewness, "n_values": m.n, "mean": m.mean, "std": m.std,
        "min": stats.minimum, "max": stats.maximum, "divided_by_temperature": settings.divide_by_temperature,
        "n_responses": len(texts), "mean_response_tokens": float(batch.response_lengths.float().mean()),
        "eos_rate": float(batch.hit_eos.float().mean()),
        "histogram": {"edges": stats.histogram.edges, "counts": stats.histogram.counts,
                      "underflow": stats.histogram.underflow, "overflow": stats.histogram.overflow},
        "settings": asdict(settings),
    }


# ---------------------------------------------------------------- figure

def plot_histograms(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Overlay the models' histograms (as densities, so different counts compare) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        edges, counts = r["histogram"]["edges"], r["histogram"]["counts"]
        width = (edges[-1] - edges[0]) / max(len(counts), 1)
        total = max(sum(counts), 1)
        ax.stairs([c / (total * width) for c in counts], edges, label=f"{r['label']}  (skew {r['skewness']:.3f})")
    divided = results and results[0]["divided_by_temperature"]
    ax.set_xlabel("logit / sampling temperature" if divided else "raw logit")
    ax.set_ylabel("density")
    s = results[0]["settings"] if results else {}
    ax.set_title(f"Logits of {s.get('n_responses')} sampled responses per model "
                 f"(T {s.get('temperature')}, {s.get('max_new_tokens')} new tokens)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

OWN_KEYS = {"models", "n", "max_new_tokens", "temperature", "top_p", "template", "benchmark", "seed", "bins",
            "range", "micro_batch", "sample_batch", "divide_by_temperature"}


class LogitsArgumentError(ValueError):
    """A bad ``em-sweep logits`` argument; the message names it."""


def parse_list(text: str) -> list[str]:
    """``[a,b]`` or ``a,b`` -> ["a", "b"]."""
    return [s.strip().strip("'\"") for s in text.strip().strip("[]").split(",") if s.strip()]


def parse_arguments(tokens: Sequence[str], defaults: LogitsSettings) -> tuple[list[str], LogitsSettings, list[str]]:
    """(models, settings, Hydra overrides) from ``key=value`` tokens."""
    models: list[str] = []
    overrides: list[str] = []
    values: dict[str, Any] = {}
    casts = {"n": ("n_responses", int), "max_new_tokens": ("max_new_tokens", int),
             "temperature": ("temperature", float), "top_p": ("top_p", float), "template": ("template", str),
             "benchmark": ("benchmark", str), "seed": ("seed", int), "bins": ("bins", int),
             "micro_batch": ("micro_batch_size", int), "sample_batch": ("sample_batch_size", int)}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise LogitsArgumentError(f"argument {tok!r}: expected key=value (e.g. models=[tiny_arith,/ckpt])")
        if key not in OWN_KEYS:
            overrides.append(tok)
        elif key == "models":
            models = parse_list(value)
        elif key == "range":
            bounds = parse_list(value)
            try:
                lo, hi = (float(b) for b in bounds)
            except ValueError:
                raise LogitsArgumentError(f"range={value!r}: expected [lo,hi]") from None
            if not lo < hi:
                raise LogitsArgumentError(f"range={value!r}: lo must be < hi")
            values["range"] = (lo, hi)
        elif key == "divide_by_temperature":
            if value.lower() not in ("true", "false", "1", "0"):
                raise LogitsArgumentError(f"divide_by_temperature={value!r}: expected true or false")
            values["divide_by_temperature"] = value.lower() in ("true", "1")
        else:
            name, cast = casts[key]
            try:
                values[name] = cast(value)
            except ValueError:
                raise LogitsArgumentError(f"{key}={value!r}: expected {cast.__name__}") from None
    settings = replace(defaults, **values)
    for name in ("n_responses", "max_new_tokens", "bins", "micro_batch_size", "sample_batch_size"):
        if getattr(settings, name) < 1:
            raise LogitsArgumentError(f"{name} must be >= 1, got {getattr(settings, name)}")
    if not settings.temperature > 0:
        raise LogitsArgumentError(f"temperature must be > 0 (this analysis samples), got {settings.temperature}")
    if not models:
        raise LogitsArgumentError("models=[...] is required: model presets, checkpoints or HF paths")
    return models, settings, overrides


def model_label(entry: str) -> str:
    """A short legend name: the preset name, ``<run id>/step-N`` for run checkpoints, else the last part."""
    parts = Path(entry.rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3][:10]}/{parts[-1]}"
    return parts[-1] if parts else entry


def model_config_for(entry: str, overrides: Sequence[str], base: Any) -> Any:
    """A preset name (conf/model/<entry>.yaml) composes that preset; anything else is a model path
    loaded with the base config's dtype and device."""
    from omegaconf import OmegaConf

    from em_sweep.cli import CONF_DIR, compose

    if (CONF_DIR / "model" / f"{entry}.yaml").is_file():
        return compose([*overrides, f"model={entry}"]).model
    cfg = OmegaConf.create(OmegaConf.to_container(base.model, resolve=True))
    cfg.path, cfg.name = entry, model_label(entry)
    return cfg


def logits_command(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the analysis for every model; write the JSON and the figure; return the results."""
    import torch

    from em_sweep.benchmarks import load_benchmark, resolve_spec
    from em_sweep.cli import compose
    from em_sweep.models import load_model, load_tokenizer, resolve_model_path

    models, settings, overrides = parse_arguments(args.arguments, LogitsSettings())
    base = compose(overrides)
    settings = replace(settings, template=settings.template or str(base.eval.template),
                       benchmark=settings.benchmark or str(base.eval.benchmarks[0]),
                       seed=int(base.eval.seed) if settings.seed is None else settings.seed)
    model_cfgs = [model_config_for(m, overrides, base) for m in models]
    for cfg in model_cfgs:  # fail on a bad path before sampling anything
        resolve_model_path(cfg.path)
    problems = load_benchmark(resolve_spec(settings.benchmark))
    if not problems:
        raise LogitsArgumentError(f"benchmark {settings.benchmark!r} has no problems")
    questions = [problems[i % len(problems)].question for i in range(settings.n_responses)]
    results = []
    for entry, cfg in zip(models, model_cfgs, strict=True):
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.path, cfg.trust_remote_code)
        model = load_model(cfg)
        record = {"model": entry, "label": model_label(entry), "path": resolve_model_path(cfg.path),
                  **analyse_model(model, tokenizer, questions, settings)}
        results.append(record)
        print(f"{record['label']:<24} skewness {record['skewness']:+.4f}  mean {record['mean']:.3f}  "
              f"std {record['std']:.3f}  ({record['n_values']:,} values, {time.perf_counter() - t0:.1f}s)",
              flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "skewness.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_histograms(results, out_dir / "histogram.png")
    print(f"results: {out_dir / 'skewness.json'}\nfigure:  {out_dir / 'histogram.png'}")
    return results


def cmd_logits(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from em_sweep.benchmarks import BenchmarkError
    from em_sweep.models import ModelLoadError
    from em_sweep.prompts import PromptError

    try:
        logits_command(args)
    except (LogitsArgumentError, ModelLoadError, BenchmarkError, PromptError, HydraException,
            OmegaConfBaseException) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add ``logits`` to the ``em-sweep`` command's subparsers."""
    p = subparsers.add_parser(
        "logits", help="skewness and histogram of the raw logits of sampled responses, per model",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("arguments", nargs="*", metavar="key=value",
                   help="models=[<preset>|<checkpoint>|<HF path>,...] (required); n=20 responses, "
                        "max_new_tokens=500, temperature=0.6, top_p=1.0, template=<eval template>, "
                        "benchmark=<name> (prompts: its first n problems), seed=<eval.seed>, bins=200, "
                        "range=[lo,hi], micro_batch=4, sample_batch=20, divide_by_temperature=false; any other "
                        "key=value is a Hydra override of the base config (e.g. model=qwen25_math_7b sets "
                        "the default template, benchmark and the dtype/device for path entries)")
    p.add_argument("--out-dir", default="outputs/logits", help="where skewness.json and histogram.png go")
    p.set_defaults(func=cmd_logits)
