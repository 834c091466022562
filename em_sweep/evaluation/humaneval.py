"""Code benchmarks (HumanEval and a user's own): prompts, completion extraction, test programs,
pass@k.

As the reference's code evaluation (OpenCodeEval in ``zitian-gao/one-shot-em``'s ``code_eval/``):

- an instruct model (``eval.template`` ``chat`` or ``qwen25-math-cot``) gets the problem inside
  the reference's request for a self-contained script in a markdown block, as the user turn of
  its chat template (no system turn); a base model (``eval.template=plain``) continues the
  function's prompt directly;
- the completion is cut at the reference's stop sequences, its code taken from fenced blocks
  (```` ```python ````, else any ```` ``` ````) or else the raw completion (for a base model: the
  prompt plus the completion), and reduced to the imports and the definitions the entry point
  reaches (the reference's ``sanitize``);
- the test program is the reference's: its import header, the problem's prompt with a ``pass``
  body, the solution, the tests and ``check(<entry point>)``; it passes when it runs to its end.
  Programs run in :mod:`em_sweep.evaluation.sandbox`, never in the run's process.

``python -m em_sweep.evaluation.humaneval [--workers N]`` runs HumanEval's reference solutions (and empty
completions) through the sandbox: a check that execution works on this machine, and its speed.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import time
from collections.abc import Sequence

from em_sweep.evaluation.grading import cut_at_stop

# The reference's prompt for instruct ("Chat") models (code_eval/test-humaneval-ckpt-list.sh).
INSTRUCT_PREFIX = ("Please provide a self-contained Python script that solves the following problem "
                   "in a markdown code block:\n```python\n")
INSTRUCT_SUFFIX = "\n```\n"
# Stop sequences (OpenCodeEval benchmark/base.py and HumanEval.py): for every model, and for base
# models the start of the next top-level statement too. Applied to the finished text.
CHAT_STOP = ("\nif __name__", "\ndef main(", "\nprint(")
BASE_STOP = ("\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert ")
# The import header every test program starts with (OpenCodeEval benchmark/base.py PYTHON_IMPORTS).
PROGRAM_IMPORTS = (
    "import math", "import re", "import sys", "import copy", "import datetime", "import itertools",
    "import collections", "import heapq", "import functools", "import hashlib", "import numpy",
    "import numpy as np", "import string", "from typing import *", "from collections import *",
)
# A block may be left open: a stop sequence can cut the response inside it.
_FENCED_PYTHON = re.compile(r"```python[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_FENCED_ANY = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
_NUMPY_NAME = re.compile(r"\b(?:np|numpy)\b")
_CODE_START = re.compile(r"(?:def|async def|class|import|from|@)\b")
# The reference keeps the last 200 lines of a completion.
MAX_LINES = 200


def refine_text(text: str) -> str:
    """Tabs to four spaces, newlines normalised, stripped, one trailing newline (the reference's)."""
    text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n")
    return text.strip() + "\n"


def is_instruct(template: str) -> bool:
    """``plain`` prompts a base model (continue the code); the chat templates an instruct model."""
    return template != "plain"


def instruct_request(prompt: str) -> str:
    """The user turn for an instruct model."""
    return refine_text(INSTRUCT_PREFIX + refine_text(prompt) + INSTRUCT_SUFFIX)


def extract_code(prompt: str, response: str, entry_point: str, instruct: bool) -> str:
    """The solution code in ``response`` ("" when there is none): see the module docstring."""
    # Up to the first stop sequence, wherever it occurs, as the reference's generation stops there.
    response = cut_at_stop(response, CHAT_STOP if instruct else CHAT_STOP + BASE_STOP)
    if "</think>" in response:
        response = response.split("</think>", 1)[1]
    blocks = _FENCED_PYTHON.findall(response) or _FENCED_ANY.findall(response)
    if blocks:
        code = "\n\n".join(blocks)
    elif instruct:
        code = response
    else:
        code = prompt + response
    code = "\n".join(refine_text(code).splitlines()[-MAX_LINES:])
    return sanitize(code, entry_point)


def _longest_valid_code(code: str) -> ast.Module | None:
    """The AST of ``code``, or else of the longest run of its lines that parses, starting at the
    first line (or a line that starts a definition or import; prose around code is skipped)."""
    lines = code.splitlines()
    starts = [0] + [i for i, line in enumerate(lines) if i and _CODE_START.match(line)]
    best: tuple[int, ast.Module] | None = None
    for start in starts:
        for end in range(len(lines), start, -1):
            if best is not None and end - start <= best[0]:
                break
            try:
                best = (end - start, ast.parse("\n".join(lines[start:end])))
                break
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                continue
    return best[1] if best else None


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def sanitize(code: str, entry_point: str) -> str:
    """The imports of ``code`` and the top-level definitions ``entry_point`` reaches (functions
    that return or yield, classes, assignments), as the reference's sanitize keeps them."""
    tree = _longest_valid_code(code)
    if tree is None:
        return ""
    imports: list[ast.stmt] = []
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.append(node)
        elif isinstance(node, ast.ClassDef):
            definitions[node.name] = node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if any(isinstance(n, ast.Return | ast.Yield | ast.YieldFrom) for n in ast.walk(node)):
                definitions[node.name] = node
        elif isinstance(node, ast.Assign) and node.targets and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    reachable, todo = set(), [entry_point] if entry_point else list(definitions)
    while todo:
        name = todo.pop()
        if name in reachable or name not in definitions:
            continue
        reachable.add(name)
        todo.extend(_names_used(definitions[name]) - reachable)
    kept = [*imports, *(node for name, node in definitions.items() if name in reachable)]
    return "\n".join(ast.unparse(node) for node in kept)


def test_program(prompt: str, solution: str, test: str, entry_point: str) -> str:
    """The program that passes exactly when ``solution`` passes the tests.

    The header's numpy imports are left out when no ``np`` or ``numpy`` name occurs in the code:
    nothing could use them, and importing numpy is most of a short program's time."""
    body = prompt + "\n    pass\n\n" + solution + "\n" + test + "\n" + f"check({entry_point})\n"
    header = PROGRAM_IMPORTS if _NUMPY_NAME.search(body) else [i for i in PROGRAM_IMPORTS if "numpy" not in i]
    return "\n".join(header) + "\n" + body


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a product so it stays exact for large ``n``."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(passed: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``passed[problem][sample]``."""
    return sum(pass_at_k(len(p), sum(p), k) for p in passed) / max(len(passed), 1)


def main(argv: Sequence[str] | None = None) -> int:
    from em_sweep.evaluation.benchmarks import load_benchmark
    from em_sweep.evaluation.sandbox import (
        DEFAULT_TIMEOUT_S,
        DEFAULT_WORKERS,
        SandboxLimits,
        isolation,
        run_programs,
    )

    parser = argparse.ArgumentParser(description="run HumanEval's reference solutions through the sandbox")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="programs at a time (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per program (default %(default)s)")
    args = parser.parse_args(argv)
    problems = load_benchmark("humaneval")
    limits = SandboxLimits(timeout_s=args.timeout)
    print(f"sandbox: {isolation().describe()}")
    status = 0
    for label, completions in (("reference solutions", [p.answers[0] for p in problems]),
                               ("empty completions", [""] * len(problems))):
        programs = [test_program(p.question, extract_code(p.question, c, p.entry_point, False), p.test, p.entry_point)
                    for p, c in zip(problems, completions, strict=True)]
        t0 = time.perf_counter()
        results = run_programs(programs, limits, workers=args.workers)
        seconds = time.perf_counter() - t0
        passed = sum(r.passed for r in results)
        print(f"{label}: {passed}/{len(problems)} passed in {seconds:.1f} s ({args.workers} workers)")
        for p, r in zip(problems, results, strict=True):
            if r.passed != (label == "reference solutions"):
                print(f"  {p.id}: {r.reason or 'passed'}")
                status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
