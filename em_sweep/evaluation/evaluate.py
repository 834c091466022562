"""Evaluation: generate answers to benchmark problems, extract, grade, score.

Generation, extraction and grading are separate steps (extraction and grading live in
:mod:`em_sweep.evaluation.grading`). Generation has one interface, :func:`generate_responses`, over two
backends (``eval.backend``): ``hf``, the run's in-memory model through :mod:`em_sweep.generation.sample`
(prompts sorted by length so each batch pads little), and ``vllm``
(:mod:`em_sweep.generation.vllm_backend`, the saved weights at the model's path). ``hf`` decodes with
``eval.generation_backend``: by default continuous batching (all of a benchmark's prompts in one
call, ``eval.batch_size`` slots), else static batches. The sampling seed is the same at every
training step so steps are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.evaluation import families
from em_sweep.evaluation.benchmarks import PAPER_FOUR, Problem, load_benchmark, resolve_spec
from em_sweep.evaluation.calibration import calibration_summary, mean_token_logprobs
from em_sweep.evaluation.grading import EXTRACTION_RULES, cut_at_stop, extract, grade_many, grader_versions
from em_sweep.generation.sample import (
    CONTINUOUS,
    SampleBatch,
    SamplingSettings,
    resolve_backend,
    sample_responses,
)
from em_sweep.training.objectives import em_inf_processor

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import EvalConfig


@dataclass(frozen=True)
class Score:
    """One benchmark's score at one training step and evaluation temperature."""

    benchmark: str
    step: int
    temperature: float
    accuracy: float  # mean correctness over all samples (avg@n)
    pass_at_n: float  # share of problems with at least one correct sample
    n: int  # samples per problem
    n_problems: int
    boxed_rate: float  # share of responses whose answer came from a \boxed{}
    grader_failures: int  # timeouts or grader errors (counted as wrong)
    template: str
    max_new_tokens: int
    seconds: float
    # Responses by the extraction rule that gave their answer (em_sweep.evaluation.grading.EXTRACTION_RULES).
    extraction_boxed: int = 0
    extraction_gsm8k: int = 0
    extraction_answer_is: int = 0
    extraction_last_number: int = 0
    extraction_none: int = 0
    last_number_fallback: bool = True
    # The grader's packages: math-verify's verdicts may change with them.
    math_verify_version: str = ""
    latex2sympy2_extended_version: str = ""
    antlr4_version: str = ""
    family: str = "math"  # math | code | logic (em_sweep.evaluation.benchmarks.FAMILIES)
    # Family figures (code: pass@k; logic: accuracy_people<k>); flat in the score's dict.
    metrics: dict[str, Any] = field(default_factory=dict)


    # Calibration (n > 1 samples per problem; em_sweep/evaluation/calibration.py): None when n = 1.
    majority_accuracy: float | None = None
    majority_confidence: float | None = None
    ece_majority: float | None = None
    brier_majority: float | None = None
    reliability_majority: list[dict[str, float]] | None = None
    seqprob_confidence: float | None = None
    ece_seqprob: float | None = None
    brier_seqprob: float | None = None
    reliability_seqprob: list[dict[str, float]] | None = None


def score_dict(score: Score) -> dict[str, Any]:
    """A score as one flat dict (what metrics.jsonl, results.json and W&B get)."""
    out = asdict(score)
    out.update(out.pop("metrics"))
    return out


def samples_per_problem(eval_cfg: EvalConfig, repeats: int, temperature: float) -> int:
    """Greedy decoding gives the same answer every time: 1 sample; else max(n_samples, repeats)."""
    return 1 if temperature == 0 else max(eval_cfg.n_samples, repeats)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_strings: list[str]) -> set[int]:
    """Ids of the stop strings that are single tokens which decoding drops (special tokens such
    as Qwen's ``<|im_end|>``): a decoded response no longer shows them, so responses are cut at
    these ids before decoding (the other stop strings are cut in the text)."""
    ids = set()
    for stop in stop_strings:
        enc = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and tokenizer.decode(enc, skip_special_tokens=True) == "":
            ids.add(enc[0])
    return ids


def response_texts(batch: SampleBatch, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> list[str]:
    """The decoded responses of ``batch``, each cut before its first token in ``stop_ids``."""
    texts = list(batch.texts)
    if not stop_ids:
        return texts
    generated = batch.input_ids[:, batch.prompt_len:]
    kept = batch.attention_mask[:, batch.prompt_len:].bool()
    for r in range(len(texts)):
        ids = generated[r][kept[r]].tolist()
        cut = next((j for j, t in enumerate(ids) if t in stop_ids), None)
        # A stop id as the last token (usually EOS) is dropped by decoding anyway.
        if cut is not None and cut < len(ids) - 1:
            texts[r] = tokenizer.decode(ids[:cut], skip_special_tokens=True)
    return texts


def evaluation_backend(model: PreTrainedModel, eval_cfg: EvalConfig, requested: str | None = None) -> str:
    """The generation backend evaluation runs on for this model: ``vllm``; ``hf`` with EM-INF (its
    logits processor runs inside HF generate); else ``requested`` (the sampling settings' backend;
    default ``eval.generation_backend``) resolved for the model."""
    if eval_cfg.backend == "vllm":
        return "vllm"
    if em_inf_processor(eval_cfg) is not None:
        return "hf"
    return resolve_backend(model, eval_cfg.generation_backend if requested is None else requested)


def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int,
                       settings: SamplingSettings, eval_cfg: EvalConfig) -> list[list[str]]:
    """``n`` responses to each prompt text, as ``[prompt][sample]``, from ``eval_cfg.backend``."""
    backend = evaluation_backend(model, eval_cfg, settings.backend)
    if backend == "vllm":
        from em_sweep.generation import vllm_backend  # lazy: vLLM is optional

        # The weights on disk: config.validate allows vllm only when nothing is trained in memory.
        if not isinstance(model, vllm_backend.SavedModel):
            raise TypeError("eval.backend=vllm scores a vllm_backend.SavedModel (vllm_backend.saved_model(cfg.model)), "
                            f"not a loaded {type(model).__name__}")
        return vllm_backend.generate(model, tokenizer, texts, n, settings, seed=eval_cfg.seed)
    stop_ids = stop_token_ids(tokenizer, list(eval_cfg.stop_strings))
    em_inf = em_inf_processor(eval_cfg)  # EM-INF adjusts logits inside HF generate
    processors = LogitsProcessorList([em_inf]) if em_inf is not None else None
    responses = [[""] * n for _ in texts]
    if backend in CONTINUOUS:  # never under EM-INF (its processor needs HF generate)
        jobs = [(i, k) for i in range(len(texts)) for k in range(n)]  # one call: it orders and batches them
        out = sample_responses(model, tokenizer, [texts[i] for i, _ in jobs], settings,
                               batch_size=eval_cfg.batch_size, seed=eval_cfg.seed)
        for (i, k), text in zip(jobs, response_texts(out, tokenizer, stop_ids), strict=True):
            responses[i][k] = text
        return responses
    jobs = sorted(((i, k) for i in range(len(texts)) for k in range(n)), key=lambda ik: len(texts[ik[0]]))
    for b, start in enumerate(range(0, len(jobs), eval_cfg.batch_size)):
        chunk = jobs[start:start + eval_cfg.batch_size]
        out = sample_responses(model, tokenizer, [texts[i] for i, _ in chunk], settings,
                               batch_size=eval_cfg.batch_size, seed=eval_cfg.seed + b, logits_processor=processors)
        for (i, k), text in zip(chunk, response_texts(out, tokenizer, stop_ids), strict=True):
            responses[i][k] = text
    return responses


def version_fields() -> dict[str, str]:
    """The grader's package versions as :class:`Score` fields."""
    v = grader_versions()
    return {"math_verify_version": v["math-verify"], "latex2sympy2_extended_version": v["latex2sympy2_extended"],
            "antlr4_version": v["antlr4-python3-runtime"]}


def evaluate_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: EvalConfig,
                       benchmark: str | Mapping[str, Any], step: int, temperature: float
                       ) -> tuple[Score, list[dict[str, Any]]]:
    """Score one ``eval.benchmarks`` entry (a name or a custom mapping); returns the score and one
    record per (problem, sample), both under the benchmark's name."""
    t0 = time.perf_counter()
    spec = resolve_spec(benchmark)
    name = spec.name
    problems: list[Problem] = load_benchmark(spec, limit=eval_cfg.limit)
    n = samples_per_problem(eval_cfg, spec.repeats, temperature)
    texts = [families.prompt_text(tokenizer, spec.family, p, eval_cfg.template) for p in problems]
    settings = SamplingSettings(temperature=temperature, top_p=eval_cfg.top_p, max_new_tokens=eval_cfg.max_new_tokens,
                                backend=eval_cfg.generation_backend)
    responses = generate_responses(model, tokenizer, texts, n, settings, eval_cfg)  # [problem][sample]
    # The toolkit's rules: cut at the stop strings, then extract (boxed, "####", "the answer is",
    # the last number); docs/evaluation.md.
    responses = [[cut_at_stop(r, eval_cfg.stop_strings) for r in row] for row in responses]
    if spec.family != "math":  # code runs in the sandbox, logic parses roles: em_sweep.evaluation.families
        fields, family_records = families.score(spec, problems, responses, n, eval_cfg, step, temperature, t0)
        return Score(**fields), family_records
    order = [(i, k) for i in range(len(problems)) for k in range(n)]
    extractions = [extract(responses[i][k], last_number=eval_cfg.last_number_fallback) for i, k in order]
    extracted = [e.answer for e in extractions]
    grades = grade_many(extracted, [problems[i].answers for i, _ in order], timeout_s=eval_cfg.grade_timeout_s)
    records = [
        {"benchmark": name, "id": problems[i].id, "step": step, "temperature": temperature, "sample": k,
         "response": responses[i][k], "extracted": e.answer, "extraction": e.rule,
         "gold": list(problems[i].answers), "correct": g.correct, "grade_status": g.status}
        for (i, k), e, g in zip(order, extractions, grades, strict=True)
    ]
    by_rule = {rule: sum(e.rule == rule for e in extractions) for rule in EXTRACTION_RULES}
    calibration: dict[str, Any] = {}
    if n > 1:  # each problem's confidence: its majority share, and each response's sequence probability
        seq_lp = None
        if eval_cfg.backend == "hf":
            seq_lp = mean_token_logprobs(model, tokenizer, [texts[i] for i, _ in order],
                                         [responses[i][k] for i, k in order], batch_size=eval_cfg.batch_size)
            for r, lp in zip(records, seq_lp, strict=True):
                r["mean_logprob"] = lp
        calibration = calibration_summary(records, n, seq_lp)
    correct = [r["correct"] for r in records]
    per_problem = [any(correct[i * n:(i + 1) * n]) for i in range(len(problems))]
    score = Score(
        benchmark=name, step=step, temperature=temperature,
        accuracy=sum(correct) / max(len(correct), 1),
        pass_at_n=sum(per_problem) / max(len(problems), 1),
        n=n, n_problems=len(problems),
        boxed_rate=by_rule["boxed"] / max(len(extractions), 1),
        grader_failures=sum(g.status in ("timeout", "error") for g in grades),
        template=eval_cfg.template, max_new_tokens=eval_cfg.max_new_tokens,
        seconds=time.perf_counter() - t0,
        **{f"extraction_{rule}": count for rule, count in by_rule.items()},
        last_number_fallback=bool(eval_cfg.last_number_fallback),
        **version_fields(),
        **calibration,
    )
    return score, records


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: EvalConfig, step: int
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All configured benchmarks at all configured temperatures; adds the paper's average of four."""
    scores: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for temperature in eval_cfg.temperatures:
        accs = {}
        for benchmark in eval_cfg.benchmarks:
            score, recs = evaluate_benchmark(model, tokenizer, eval_cfg, benchmark, step, float(temperature))
            scores.append(score_dict(score))
            records.extend(recs)
            accs[score.benchmark] = score.accuracy
        if all(b in accs for b in PAPER_FOUR):
            scores.append({"benchmark": "avg4", "step": step, "temperature": float(temperature),
                           "accuracy": sum(accs[b] for b in PAPER_FOUR) / len(PAPER_FOUR), **version_fields()})
    return scores, records
