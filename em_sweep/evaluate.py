"""Evaluation: generate answers to benchmark problems, extract, grade, score.

Generation, extraction and grading are separate steps (extraction and grading live in
:mod:`em_sweep.grading`). Generation has one interface, :func:`generate_responses`, over two
backends (``eval.backend``): ``hf``, the run's in-memory model through :mod:`em_sweep.sample`
(prompts sorted by length so each batch pads little), and ``vllm``
(:mod:`em_sweep.vllm_backend`, the saved weights at the model's path). ``hf`` decodes with
``eval.generation_backend``: by default continuous batching (all of a benchmark's prompts in one
call, ``eval.batch_size`` slots), else static batches. The sampling seed is the same at every
training step so steps are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.benchmarks import PAPER_FOUR, Problem, load_benchmark, resolve_spec
from em_sweep.grading import extract_answer, grade_many
from em_sweep.prompts import format_eval_prompt
from em_sweep.sample import CONTINUOUS, SamplingSettings, resolve_backend, sample_responses


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
    boxed_rate: float  # share of responses with an extractable answer
    grader_failures: int  # timeouts or grader errors (counted as wrong)
    template: str
    max_new_tokens: int
    seconds: float


def samples_per_problem(eval_cfg: Any, repeats: int, temperature: float) -> int:
    """Greedy decoding gives the same answer every time: 1 sample; else max(n_samples, repeats)."""
    return 1 if temperature == 0 else max(eval_cfg.n_samples, repeats)


def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int,
                       settings: SamplingSettings, eval_cfg: Any) -> list[list[str]]:
    """``n`` responses to each prompt text, as ``[prompt][sample]``, from ``eval_cfg.backend``."""
    if eval_cfg.backend == "vllm":
        from em_sweep import vllm_backend  # lazy: vLLM is optional

        # The weights on disk: config.validate allows vllm only when nothing is trained in memory.
        if not isinstance(model, vllm_backend.SavedModel):
            raise TypeError("eval.backend=vllm scores a vllm_backend.SavedModel (vllm_backend.saved_model(cfg.model)), "
                            f"not a loaded {type(model).__name__}")
        return vllm_backend.generate(model, tokenizer, texts, n, settings, seed=eval_cfg.seed)
    if resolve_backend(model, settings.backend) in CONTINUOUS:  # one call; it orders and batches the prompts
        jobs = [(i, k) for i in range(len(texts)) for k in range(n)]
        out = sample_responses(model, tokenizer, [texts[i] for i, _ in jobs], settings,
                               batch_size=eval_cfg.batch_size, seed=eval_cfg.seed)
        responses = [[""] * n for _ in texts]
        for (i, k), text in zip(jobs, out.texts, strict=True):
            responses[i][k] = text
        return responses
    jobs = sorted(((i, k) for i in range(len(texts)) for k in range(n)), key=lambda ik: len(texts[ik[0]]))
    responses = [[""] * n for _ in texts]
    for b, start in enumerate(range(0, len(jobs), eval_cfg.batch_size)):
        chunk = jobs[start:start + eval_cfg.batch_size]
        out = sample_responses(model, tokenizer, [texts[i] for i, _ in chunk], settings,
                               batch_size=eval_cfg.batch_size, seed=eval_cfg.seed + b)
        for (i, k), text in zip(chunk, out.texts, strict=True):
            responses[i][k] = text
    return responses


def evaluate_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: Any,
                       benchmark: str | Mapping[str, Any], step: int, temperature: float
                       ) -> tuple[Score, list[dict[str, Any]]]:
    """Score one ``eval.benchmarks`` entry (a name or a custom mapping); returns the score and one
    record per (problem, sample), both under the benchmark's name."""
    t0 = time.perf_counter()
    spec = resolve_spec(benchmark)
    name = spec.name
    problems: list[Problem] = load_benchmark(spec, limit=eval_cfg.limit)
    n = samples_per_problem(eval_cfg, spec.repeats, temperature)
    texts = [format_eval_prompt(tokenizer, p.question, eval_cfg.template) for p in problems]
    settings = SamplingSettings(temperature=temperature, top_p=eval_cfg.top_p, max_new_tokens=eval_cfg.max_new_tokens,
                                backend=eval_cfg.generation_backend)
    responses = generate_responses(model, tokenizer, texts, n, settings, eval_cfg)  # [problem][sample]
    order = [(i, k) for i in range(len(problems)) for k in range(n)]
    extracted = [extract_answer(responses[i][k]) for i, k in order]
    grades = grade_many(extracted, [problems[i].answers for i, _ in order], timeout_s=eval_cfg.grade_timeout_s)
    records = [
        {"benchmark": name, "id": problems[i].id, "step": step, "temperature": temperature, "sample": k,
         "response": responses[i][k], "extracted": ans, "gold": list(problems[i].answers),
         "correct": g.correct, "grade_status": g.status}
        for (i, k), ans, g in zip(order, extracted, grades, strict=True)
    ]
    correct = [r["correct"] for r in records]
    per_problem = [any(correct[i * n:(i + 1) * n]) for i in range(len(problems))]
    score = Score(
        benchmark=name, step=step, temperature=temperature,
        accuracy=sum(correct) / max(len(correct), 1),
        pass_at_n=sum(per_problem) / max(len(problems), 1),
        n=n, n_problems=len(problems),
        boxed_rate=sum(a is not None for a in extracted) / max(len(extracted), 1),
        grader_failures=sum(g.status in ("timeout", "error") for g in grades),
        template=eval_cfg.template, max_new_tokens=eval_cfg.max_new_tokens,
        seconds=time.perf_counter() - t0,
    )
    return score, records


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: Any, step: int
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All configured benchmarks at all configured temperatures; adds the paper's average of four."""
    scores: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for temperature in eval_cfg.temperatures:
        accs = {}
        for benchmark in eval_cfg.benchmarks:
            score, recs = evaluate_benchmark(model, tokenizer, eval_cfg, benchmark, step, float(temperature))
            scores.append(asdict(score))
            records.extend(recs)
            accs[score.benchmark] = score.accuracy
        if all(b in accs for b in PAPER_FOUR):
            scores.append({"benchmark": "avg4", "step": step, "temperature": float(temperature),
                           "accuracy": sum(accs[b] for b in PAPER_FOUR) / len(PAPER_FOUR)})
    return scores, records
