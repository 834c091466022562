"""Logits skewness: how post-training reshapes the distribution of a model's next-token scores.

For each model, sample one response to each of N prompts, collect a set of score values from
the positions that produced response tokens, and report the sample skewness of those values
(the biased estimator m3 / m2^1.5, equal to ``scipy.stats.skew``), mean, std and a fixed-bin
histogram; a figure overlays the models' histograms. Two methods (``em-sweep logits logits=<method>``,
keys in :class:`em_sweep.config.RawLogitsConfig` / :class:`em_sweep.config.ReferenceLogitsConfig`):

``raw`` (default)
    The raw logits, all vocabulary entries, of responses to the first N problems of a benchmark
    in its evaluation template; the model is re-run on its responses to get them. Streams: logits
    are computed one micro-batch of responses at a time and folded into running central moments
    (:class:`Moments`, merged with Chan/Pebay's pairwise formulas in float64) and a fixed-bin
    histogram, so no tensor larger than one micro-batch's logits is built (for Qwen 20 x 500 x
    152k logits would be 6 GB in fp32). The histogram's range is the values' [min, max] (a first
    pass over the same responses) unless ``range=[lo,hi]`` is given.

``reference``
    What the reference repository's ``logits_shift.py`` (zitian-gao/one-shot-em) measures:
    ``output.scores`` of ``model.generate``, i.e. the *processed* scores (logits / T, then top-k
    filtering, which sets every other entry to -inf), of one response to each of the first 20
    DSR-sub prompts (``df.head(NUM_SAMPLES)`` of One-Shot RLVR's dsr_sub.parquet, whose prompt is
    the user turn ``problem + " Let's think step by step and output the final answer within
    \\boxed{}."``) rendered by ``tokenizer.apply_chat_template(msg, tokenize=False)`` (no
    generation prompt) and tokenized with the tokenizer's special tokens; T 0.6, 500 new tokens,
    stopping at the model's ``generation_config`` EOS only. Every response of every model in the
    command is cut to the shortest one (``min_len``), ``np.nan_to_num`` turns the -inf entries
    into 0 and ``logits_all != 0`` drops them (an exact 0.0 score goes too, as there), and the
    remaining values of each model are histogrammed in 50 bins over their [min, max]
    (``ax.hist(flat_logits, bins=50)``) with ``scipy.stats.skew``. Where em-sweep differs: it sets
    top_k 50, top_p 1.0 and no repetition penalty explicitly (the reference passes only the
    temperature, so a model's own ``generation_config.json`` could change them; transformers'
    default is top_k 50), and it re-seeds the sampler (seed 42, the reference's
    ``torch.manual_seed(42)``) before each model instead of once for the whole script, so a
    model's samples do not depend on the models before it. The reference loads models in float16
    (``model.dtype=float16`` to match).

Result JSON (``<out_dir>/skewness.json``): a list with one object per model, in the order given::

    [{"model": <as given>, "label": <legend name>, "path": <resolved model path>, "method": "raw" | "reference",
      "skewness": float, "n_values": int, "mean": float, "std": float (population),
      "min": float, "max": float, "divided_by_temperature": bool,
      "n_responses": int, "mean_response_tokens": float, "eos_rate": float,
      "histogram": {"edges": [bins + 1 floats], "counts": [bins ints], "underflow": int, "overflow": int},
      "settings": {every logits.* key of the method},
      # reference only:
      "truncated_to": int | null, "response_lengths": [int per response], "values_per_position": float}, ...]
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_sweep.config import LogitsConfig, ModelConfig, RawLogitsConfig, ReferenceLogitsConfig

if TYPE_CHECKING:  # the command line imports this module; torch loads only when it is used
    import torch


class LogitsError(ValueError):
    """Unusable input to the logits analysis; the message names the key, model or file."""


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
    of responses at a time (``batch`` is a :class:`em_sweep.generation.sample.SampleBatch`).

    Only the logits from the last prompt position on are computed when the model supports
    ``logits_to_keep``; no tensor larger than one micro-batch's logits is built.
    """
    import torch

    from em_sweep.generation.sample import position_ids_for

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



def statistics_record(stats: LogitStatistics) -> dict[str, Any]:
    """The JSON fields every method reports for one model's values."""
    m = stats.moments
    return {"skewness": m.skewness, "n_values": m.n, "mean": m.mean, "std": m.std,
            "min": stats.minimum, "max": stats.maximum,
            "histogram": {"edges": stats.histogram.edges, "counts": stats.histogram.counts,
                          "underflow": stats.histogram.underflow, "overflow": stats.histogram.overflow}}


def _value_range(settings: LogitsConfig) -> tuple[float, float] | None:
    return None if settings.range is None else (float(settings.range[0]), float(settings.range[1]))


# ---------------------------------------------------------------- raw method

def analyse_model(model: Any, tokenizer: Any, questions: Sequence[str], settings: RawLogitsConfig,
                  chunk_values: int = DEFAULT_CHUNK_VALUES) -> dict[str, Any]:
    """Raw method: sample one response per question, then stream the statistics of its response logits.

    Every model analysed with the same questions and seed gets the same prompts and sampler seed.
    """
    from em_sweep.generation.sample import SamplingSettings, sample_responses
    from em_sweep.prompts import format_eval_prompt

    texts = [format_eval_prompt(tokenizer, q, settings.template) for q in questions]
    sampling = SamplingSettings(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                max_new_tokens=settings.max_new_tokens)
    batch = sample_responses(model, tokenizer, texts, sampling, batch_size=settings.sample_batch_size,
                             seed=settings.seed)
    scale = 1.0 / settings.temperature if settings.divide_by_temperature else 1.0
    stats = stream_statistics(lambda: response_logits(model, batch, settings.micro_batch_size), settings.bins,
                              _value_range(settings), scale, chunk_values)
    return {**statistics_record(stats), "divided_by_temperature": settings.divide_by_temperature,
            "n_responses": len(texts), "mean_response_tokens": float(batch.response_lengths.float().mean()),
            "eos_rate": float(batch.hit_eos.float().mean())}


# ---------------------------------------------------------------- reference method (logits_shift.py)

def reference_values(scores: torch.Tensor) -> torch.Tensor:
    """The values logits_shift.py keeps from processed scores (any shape), flattened:
    ``torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)`` then ``x[x != 0]``. This drops the
    -inf that top-k filtering wrote, and (as there) any score that is exactly 0, nan or +inf."""
    import torch

    x = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=0.0, posinf=0.0, neginf=0.0)
    return x[x != 0]


@dataclass
class ScoredResponses:
    """Reference method, one model: per response, the kept processed scores of each generated position."""

    steps: list[list[torch.Tensor]]  # [response][position] -> 1-D float32 CPU tensor
    hit_eos: list[bool]
    token_ids: list[list[int]] = field(default_factory=list)  # [response] -> generated tokens, EOS included
    texts: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.steps]

    def values(self, length: int | None = None) -> Iterator[torch.Tensor]:
        """The kept values of each response's first ``length`` positions (all when None)."""
        for steps in self.steps:
            yield from steps[:length]


def reference_prompt_texts(tokenizer: Any, problems: Sequence[str], instruction: str) -> list[str]:
    """``tokenizer.apply_chat_template([{"role": "user", "content": problem + instruction}], tokenize=False)``:
    the reference's prompt (its parquet holds that user turn; it adds no generation prompt)."""
    if tokenizer.chat_template is None:
        raise LogitsError("logits=reference renders prompts with the tokenizer's chat template, and this "
                          "tokenizer has none (use logits=raw with logits.template=plain)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p + instruction}], tokenize=False)
            for p in problems]


def sample_scored(model: Any, tokenizer: Any, texts: Sequence[str], settings: ReferenceLogitsConfig) -> ScoredResponses:
    """Reference method: ``model.generate(..., do_sample=True, output_scores=True)`` on each batch of
    prompt texts (tokenized with special tokens, as ``tokenizer(text)``), keeping per generated
    position the processed scores that :func:`reference_values` keeps. Stops at the model's
    ``generation_config`` EOS only. Seeds torch with ``settings.seed`` first."""
    import torch
    from transformers import GenerationConfig

    from em_sweep.generation.sample import response_masks

    eos = model.generation_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    gen_cfg = GenerationConfig(do_sample=True, temperature=settings.temperature, top_k=settings.top_k,
                               top_p=settings.top_p, repetition_penalty=1.0, max_new_tokens=settings.max_new_tokens,
                               eos_token_id=eos_ids or None, pad_token_id=pad_id, use_cache=True,
                               return_dict_in_generate=True, output_scores=True)
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    steps: list[list[torch.Tensor]] = []
    hit_eos: list[bool] = []
    token_ids: list[list[int]] = []
    out_texts: list[str] = []
    try:
        for start in range(0, len(texts), settings.sample_batch_size):
            enc = tokenizer(list(texts[start:start + settings.sample_batch_size]), return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            generated = out.sequences[:, ids.shape[1]:]
            _, _, lengths, hit = response_masks(generated, eos_ids, mask)
            for r in range(generated.shape[0]):
                n = int(lengths[r])
                steps.append([reference_values(out.scores[t][r]).cpu() for t in range(n)])
                hit_eos.append(bool(hit[r]))
                token_ids.append(generated[r, :n].tolist())
                out_texts.append(tokenizer.decode(generated[r, :n], skip_special_tokens=True))
            del out
    finally:
        model.train(was_training)
    return ScoredResponses(steps, hit_eos, token_ids, out_texts)


def shortest_length(scored: Iterable[ScoredResponses]) -> int:
    """logits_shift.py's ``min_len``: the fewest generated positions of any response of any model."""
    return min(n for s in scored for n in s.lengths)


def reference_record(scored: ScoredResponses, settings: ReferenceLogitsConfig, length: int | None,
                     chunk_values: int = DEFAULT_CHUNK_VALUES) -> dict[str, Any]:
    """Reference method, one model: statistics of the kept values of each response's first ``length``
    positions (all when None), in ``settings.bins`` bins over their [min, max] unless ``range`` is set."""
    stats = stream_statistics(lambda: scored.values(length), settings.bins, _value_range(settings),
                              chunk_values=chunk_values)
    positions = sum(min(n, length) if length is not None else n for n in scored.lengths)
    return {**statistics_record(stats), "divided_by_temperature": True, "n_responses": len(scored.steps),
            "mean_response_tokens": sum(scored.lengths) / max(len(scored.lengths), 1),
            "eos_rate": sum(scored.hit_eos) / max(len(scored.hit_eos), 1), "truncated_to": length,
            "response_lengths": scored.lengths, "values_per_position": stats.moments.n / max(positions, 1)}


# ---------------------------------------------------------------- the command

@dataclass(frozen=True)
class ModelEntry:
    """One model of the comparison: as given, its legend label, and the model config that loads it."""

    entry: str
    label: str
    model_cfg: ModelConfig


def model_label(entry: str) -> str:
    """A short legend name: the preset name, ``<run id>/step-N`` for run checkpoints, else the last part."""
    parts = Path(entry.rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3][:10]}/{parts[-1]}"
    return parts[-1] if parts else entry


def method_of(settings: LogitsConfig) -> str:
    return type(settings).METHOD  # type: ignore[attr-defined]


def prompt_questions(settings: LogitsConfig) -> list[str]:
    """The method's prompts, before any model loads: raw = the first n problems of the benchmark
    (cycled when it has fewer), reference = the first n rows of the pool."""
    if isinstance(settings, ReferenceLogitsConfig):
        from em_sweep.prompts import load_pool

        items = list(load_pool(settings.pool).values())[:settings.n_responses]
        if len(items) < settings.n_responses:
            raise LogitsError(f"logits.n_responses={settings.n_responses}: pool {settings.pool!r} has only "
                              f"{len(items)} prompts")
        return [it.problem for it in items]
    from em_sweep.evaluation.benchmarks import load_benchmark, resolve_spec

    problems = load_benchmark(resolve_spec(settings.benchmark))
    if not problems:
        raise LogitsError(f"logits.benchmark: {settings.benchmark!r} has no problems")
    return [problems[i % len(problems)].question for i in range(settings.n_responses)]


def _free(model: Any) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_logits(settings: LogitsConfig, models: Sequence[ModelEntry], log: Callable[[str], None] = print
               ) -> list[dict[str, Any]]:
    """Analyse every model with ``settings``' method; write ``skewness.json`` and ``histogram.png`` to
    ``settings.out_dir``; return the records. Prompts and model paths are checked before any model loads;
    each model is loaded once and freed before the next."""
    from em_sweep.models import load_model, load_tokenizer, resolve_model_path

    method = method_of(settings)
    questions = prompt_questions(settings)
    paths = [resolve_model_path(m.model_cfg.path) for m in models]  # a bad path fails before sampling
    records: list[dict[str, Any]] = []
    scored: list[ScoredResponses] = []
    for m, path in zip(models, paths, strict=True):
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(m.model_cfg.path, m.model_cfg.trust_remote_code)
        if isinstance(settings, ReferenceLogitsConfig):
            texts = reference_prompt_texts(tokenizer, questions, settings.instruction)
            model = load_model(m.model_cfg)
            scored.append(sample_scored(model, tokenizer, texts, settings))
            records.append({"model": m.entry, "label": m.label, "path": path, "method": method})
            log(f"{m.label:<24} sampled {len(texts)} responses ({time.perf_counter() - t0:.1f}s)")
        else:
            model = load_model(m.model_cfg)
            records.append({"model": m.entry, "label": m.label, "path": path, "method": method,
                            **analyse_model(model, tokenizer, questions, settings)})
        _free(model)
    if isinstance(settings, ReferenceLogitsConfig):
        length = shortest_length(scored) if settings.truncate_to_shortest else None
        for record, s in zip(records, scored, strict=True):
            record.update(reference_record(s, settings, length))
    for record in records:
        record["settings"] = {"method": method, **asdict(settings)}
        log(f"{record['label']:<24} {method} skewness {record['skewness']:+.4f}  mean {record['mean']:.3f}  "
            f"std {record['std']:.3f}  ({record['n_values']:,} values)")
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "skewness.json").write_text(json.dumps(records, indent=1) + "\n")
    plot_histograms(records, out_dir / "histogram.png")
    log(f"results: {out_dir / 'skewness.json'}\nfigure:  {out_dir / 'histogram.png'}")
    return records


# ---------------------------------------------------------------- figure

VALUE_LABELS = {"raw": "raw logit", "reference": "processed score (logit / T, top-k kept)"}


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
    first = results[0] if results else {}
    method = first.get("method", "raw")
    label = VALUE_LABELS.get(method, method)
    if method == "raw" and first.get("divided_by_temperature"):
        label = "logit / sampling temperature"
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    s = first.get("settings", {})
    ax.set_title(f"{method} method: {s.get('n_responses')} sampled responses per model "
                 f"(T {s.get('temperature')}, {s.get('max_new_tokens')} new tokens)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
