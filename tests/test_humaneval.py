"""HumanEval: the reference solutions pass through the sandbox, empty completions do not;
extraction as the reference's; the unbiased pass@k."""

from __future__ import annotations

import math

import pytest

from em_sweep.evaluation import humaneval as he
from em_sweep.evaluation.benchmarks import load_benchmark
from em_sweep.evaluation.sandbox import run_programs


@pytest.fixture(scope="module")
def problems():
    return load_benchmark("humaneval")


def _programs(problems, completions, instruct=False):
    return [he.test_program(p.question, he.extract_code(p.question, c, p.entry_point, instruct), p.test, p.entry_point)
            for p, c in zip(problems, completions, strict=True)]


@pytest.mark.slow
def test_reference_solutions_pass_164_of_164(problems) -> None:
    assert len(problems) == 164
    results = run_programs(_programs(problems, [p.answers[0] for p in problems]), workers=2)
    failed = [(p.id, r.reason) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


@pytest.mark.slow
def test_empty_completions_pass_none(problems) -> None:
    results = run_programs(_programs(problems, [""] * len(problems)), workers=2)
    assert sum(r.passed for r in results) == 0


def test_a_reference_solution_fenced_as_an_instruct_model_answers_passes(problems) -> None:
    p = problems[0]
    full = p.question + p.answers[0]
    response = f"Here is the solution:\n```python\n{full}\n```\nIt compares every pair."
    [result] = run_programs(_programs([p], [response], instruct=True))
    assert result.passed


def test_extraction_fenced_raw_and_stops() -> None:
    prompt = "def inc(x):\n    \"\"\"x + 1\"\"\"\n"
    # Base model: the prompt plus the completion, cut at the next top-level statement.
    code = he.extract_code(prompt, "    return x + 1\n\nprint(inc(1))\ndef other():\n    return 2\n", "inc", False)
    assert code == "def inc(x):\n    \"\"\"x + 1\"\"\"\n    return x + 1"
    # Instruct model: the fenced block; prose and unrelated definitions dropped, imports kept.
    response = ("Sure.\n```python\nimport math\n\ndef helper(y):\n    return y + 1\n\ndef inc(x):\n    return helper(x)\n"
                "\ndef unused():\n    return 0\n```\nDone.")
    code = he.extract_code(prompt, response, "inc", True)
    assert code.splitlines() == ["import math", "def helper(y):", "    return y + 1", "def inc(x):",
                                 "    return helper(x)"]
    # A block cut open by a stop sequence still counts; no fence: the raw completion.
    assert "return x + 1" in he.extract_code(prompt, "```python\ndef inc(x):\n    return x + 1\nprint(inc(2))", "inc", True)
    assert he.extract_code(prompt, "def inc(x):\n    return x + 1\n", "inc", True) == "def inc(x):\n    return x + 1"
    # Prose before unfenced code is skipped; nothing parseable gives "".
    assert he.extract_code(prompt, "The answer:\ndef inc(x):\n    return x + 1\n", "inc", True).startswith("def inc")
    assert he.extract_code(prompt, "no code at all (", "inc", True) == ""


def test_numpy_is_imported_only_where_a_name_could_use_it() -> None:
    plain = he.test_program("def f():\n", "def f():\n    return 1", "def check(c):\n    assert c() == 1", "f")
    assert "import numpy" not in plain and plain.startswith("import math\n")
    uses = he.test_program("def f():\n", "def f():\n    return np.ones(2).sum()", "def check(c):\n    assert c() == 2",
                           "f")
    assert "import numpy as np" in uses
    [a, b] = run_programs([plain, uses])
    assert a.passed and b.passed


def test_instruct_request_is_the_reference_prompt() -> None:
    text = he.instruct_request("def f():\n\tpass\n")
    assert text == ("Please provide a self-contained Python script that solves the following problem in a markdown "
                    "code block:\n```python\ndef f():\n    pass\n\n```\n")
    assert he.is_instruct("chat") and he.is_instruct("qwen25-math-cot") and not he.is_instruct("plain")


@pytest.mark.parametrize(("n", "c", "k"), [(10, 0, 1), (10, 10, 5), (5, 2, 1), (5, 2, 2), (20, 3, 10), (200, 17, 100)])
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert he.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_values_and_bad_input() -> None:
    assert he.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert he.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert he.pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include a pass
    assert he.mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pass_at_k"):
        he.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="pass_at_k"):
        he.pass_at_k(3, 1, 4)
