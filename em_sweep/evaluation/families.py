"""Benchmark families beyond math: how a code or logic problem is posed and how responses score.

:func:`em_sweep.evaluation.evaluate.evaluate_benchmark` generates the responses the same way for every
family and hands code and logic benchmarks to :func:`score`; math stays in evaluate.py.
Per family, a score carries (besides accuracy, pass_at_n, boxed_rate):

- code: ``pass@k`` for each ``eval.pass_k`` with k <= samples per problem (unbiased estimator;
  greedy: pass@1 = accuracy); ``boxed_rate`` = share of responses with extractable code;
  ``grader_failures`` = programs the sandbox itself could not run. Records add the program, its
  outcome (``grade_status`` passed | failed, ``reason``), seconds and the first 500 characters
  of its output.
- logic: ``accuracy_people<k>`` for each puzzle size present; ``boxed_rate`` = share of
  responses whose roles could be parsed. Records add the parsed roles (``extracted``), the gold
  roles and ``people``; ``grade_status`` correct | wrong_identity | unparsable.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from em_sweep.evaluation import humaneval, knights
from em_sweep.evaluation.benchmarks import BenchmarkSpec, Problem
from em_sweep.evaluation.sandbox import SandboxLimits, isolation, run_programs
from em_sweep.prompts import format_eval_prompt, format_prompt

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import EvalConfig


def prompt_text(tokenizer: PreTrainedTokenizerBase, family: str, problem: Problem, template: str) -> str:
    """The model input for one problem: math through ``eval.template``; code and logic
    as the reference prompts a base model (``template=plain``) or an instruct model (otherwise)."""
    if family == "code":
        if humaneval.is_instruct(template):
            return format_prompt(tokenizer, humaneval.instruct_request(problem.question))
        return humaneval.refine_text(problem.question)
    if family == "logic":
        if template == "plain":
            return knights.base_prompt(problem.question)
        # The reference opens the assistant turn with "<think>".
        return format_prompt(tokenizer, problem.question, knights.INSTRUCT_SYSTEM) + "<think>"
    return format_eval_prompt(tokenizer, problem.question, template)


def score(spec: BenchmarkSpec, problems: Sequence[Problem], responses: list[list[str]], n: int, eval_cfg: EvalConfig,
          step: int, temperature: float, t0: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fields of the :class:`em_sweep.evaluation.evaluate.Score` and the per-(problem, sample) records of a
    code or logic benchmark; ``responses[problem][sample]``."""
    order = [(i, k) for i in range(len(problems)) for k in range(n)]
    base = [{"benchmark": spec.name, "id": problems[i].id, "step": step, "temperature": temperature, "sample": k,
             "response": responses[i][k]} for i, k in order]
    if spec.family == "code":
        records, answered, failures, metrics = _score_code(problems, responses, order, n, eval_cfg)
    elif spec.family == "logic":
        records, answered, failures, metrics = _score_logic(problems, responses, order)
    else:
        raise ValueError(f"families.score handles code and logic benchmarks, not {spec.family!r}")
    records = [{**b, **r} for b, r in zip(base, records, strict=True)]
    correct = [bool(r["correct"]) for r in records]
    per_problem = [any(correct[i * n:(i + 1) * n]) for i in range(len(problems))]
    result = dict(
        benchmark=spec.name, step=step, temperature=temperature,
        accuracy=sum(correct) / max(len(correct), 1),
        pass_at_n=sum(per_problem) / max(len(problems), 1),
        n=n, n_problems=len(problems),
        boxed_rate=sum(answered) / max(len(answered), 1),
        grader_failures=failures,
        template=eval_cfg.template, max_new_tokens=eval_cfg.max_new_tokens,
        seconds=time.perf_counter() - t0, family=spec.family, metrics=metrics,
    )
    return result, records


def _score_code(problems: Sequence[Problem], responses: list[list[str]], order: list[tuple[int, int]], n: int,
                eval_cfg: EvalConfig) -> tuple[list[dict[str, Any]], list[bool], int, dict[str, float]]:
    instruct = humaneval.is_instruct(eval_cfg.template)
    solutions = [humaneval.extract_code(problems[i].question, responses[i][k], problems[i].entry_point, instruct)
                 for i, k in order]
    programs = [humaneval.test_program(problems[i].question, sol, problems[i].test, problems[i].entry_point)
                for (i, _), sol in zip(order, solutions, strict=True)]
    limits = SandboxLimits(timeout_s=eval_cfg.code_timeout_s, memory_mb=eval_cfg.code_memory_mb)
    results = run_programs(programs, limits, workers=eval_cfg.code_workers)
    records = [{"extracted": sol, "program": prog, "correct": r.passed, "grade_status": r.status,
                "reason": r.reason, "exec_seconds": round(r.seconds, 3), "output": r.output[:500]}
               for sol, prog, r in zip(solutions, programs, results, strict=True)]
    passed = [[results[i * n + k].passed for k in range(n)] for i in range(len(problems))]
    metrics = {f"pass@{k}": humaneval.mean_pass_at_k(passed, k) for k in eval_cfg.pass_k if k <= n}
    failures = sum(r.reason.startswith("sandbox launcher failed") for r in results)
    return records, [bool(s.strip()) for s in solutions], failures, {**metrics, "sandbox": isolation().describe()}


def _score_logic(problems: Sequence[Problem], responses: list[list[str]], order: list[tuple[int, int]]
                 ) -> tuple[list[dict[str, Any]], list[bool], int, dict[str, float]]:
    grades = [knights.grade(responses[i][k], problems[i].names, problems[i].roles) for i, k in order]
    records = [{"extracted": g.roles, "gold": dict(zip(problems[i].names, problems[i].roles, strict=True)),
                "people": len(problems[i].names), "correct": g.correct, "grade_status": g.status}
               for (i, _), g in zip(order, grades, strict=True)]
    by_size: dict[int, list[bool]] = defaultdict(list)
    for (i, _), g in zip(order, grades, strict=True):
        by_size[len(problems[i].names)].append(g.correct)
    metrics = {f"accuracy_people{size}": sum(v) / len(v) for size, v in sorted(by_size.items())}
    return records, [g.roles is not None for g in grades], 0, metrics
