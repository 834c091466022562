"""Answer extraction, equivalence, the hang-proof grader, and agreement on the shipped data."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
import time

import pytest

from em_sweep.benchmarks import BENCHMARK_DIR, load_benchmark
from em_sweep.grading import (
    _POOL,
    Grade,
    extract_answer,
    grade,
    grade_many,
    is_equivalent,
    normalize_answer,
)

# Takes minutes (or forever) in sympy once math-verify's SIGALRM timeout is off,
# as it is off the main thread.
PATHOLOGICAL = "9^{9^{9^{9^{9}}}}"


# ---------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is $\\boxed{42}$.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        (
            "nested: \\boxed{\\frac{\\sqrt{3}}{\\left(2^{2}\\right)}} done",
            "\\frac{\\sqrt{3}}{\\left(2^{2}\\right)}",
        ),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("$\\boxed 5$", "5"),
        ("so \\boxed 12.", "12"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} but truncated \\boxed{\\frac{1", "3"),
        ("\\boxed{ 10\\text{ cm} }", "10\\text{ cm}"),
        ("\\boxed{$12$}", "12"),
        ("The answer is 12.", "12"),
        ("Thus the final answer is $\\frac{3}{4}$. Done.", "\\frac{3}{4}"),
        ("The answer is: 3.5\nand more text", "3.5"),
        ("the answer is 1 but later the answer is 2.", "2"),
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 1,450,000", "1,450,000"),
        ("\\boxed{4} and #### 5", "4"),
        ("no answer here", None),
        ("", None),
        ("\\boxed{}", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_ignores_longer_command_names() -> None:
    assert extract_answer("\\boxedxyz{3}") is None


# ---------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("27", "27.0"),  # AMC golds are floats
        ("27.0", "27"),
        ("1,000", "1000"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\frac{1}{2}\n", "1/2"),
        ("\\frac12", "0.5"),
        ("0.5", "\\dfrac{1}{2}"),
        ("12.8", "\\frac{64}{5}"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("50\\%", "50"),
        ("10\\text{ cm}", "10"),
        ("10", "10\\text{ cm}"),
        ("[1, 2)", "[1,2)"),
        ("(-\\infty, 3]", "(-\\infty,3]"),
        ("(1, 2)", "\\left( 1, 2 \\right)"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("2, 3", "3, 2"),
        ("\\{3, 2\\}", "2, 3"),
        ("x = 3", "3"),
        ("\\text{(A)}", "A"),
        ("69,84", "$69$,$84$"),
        ("p - q", "p-q"),
    ],
)
def test_equivalent(prediction: str, gold: str) -> None:
    assert is_equivalent(prediction, gold)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("28", "27.0"),
        ("-27", "27"),
        ("\\frac{1}{3}", "0.5"),
        ("(1, 2)", "(2, 1)"),
        ("[1, 2]", "(1, 2)"),
        ("2, 3", "2, 4"),
        ("2", "2, 3"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
        ("\\sqrt{2}", "2"),
        ("x^2", "x^3"),
        ("51\\%", "50"),
        ("1,000", "1"),
        ("banana", "3"),
    ],
)
def test_not_equivalent(prediction: str, gold: str) -> None:
    assert not is_equivalent(prediction, gold)


def test_normalize_answer_only_drops_presentation() -> None:
    assert normalize_answer("$\\left( 3, \\dfrac{\\pi}{2} \\right)$.") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("\\$5") == "\\$5"  # an escaped dollar sign is content


# ---------------------------------------------------------------------------
# grade / grade_many
# ---------------------------------------------------------------------------


def test_grade_statuses_and_any_gold() -> None:
    assert grade("3", ["4", "3.0"]) == Grade(True, "ok")
    assert grade("5", ["4", "3"]) == Grade(False, "ok")
    assert grade(None, ["3"]) == Grade(False, "no_answer")
    assert grade("  ", ["3"]) == Grade(False, "no_answer")
    assert grade("3", "3") == Grade(True, "ok")  # a lone string is one gold, not characters
    with pytest.raises(dataclasses.FrozenInstanceError):
        grade("3", ["3"]).correct = False  # type: ignore[misc]


def test_grade_many_keeps_order_and_checks_lengths() -> None:
    preds = ["\\frac{1}{2}", None, "7", "\\frac{2}{4}", "x+1", "\\frac{1}{2}"]
    golds = [["0.5"], ["1"], ["8"], ["0.5"], ["1+x"], ["0.5"]]
    assert [g.correct for g in grade_many(preds, golds)] == [True, False, False, True, True, True]
    with pytest.raises(ValueError):
        grade_many(["1"], [])


def test_pathological_input_times_out_and_grader_recovers() -> None:
    start = time.monotonic()
    result = grade(PATHOLOGICAL, ["3"], timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result == Grade(False, "timeout")
    assert elapsed < 5.0
    # The killed worker was replaced; the next call (which needs math-verify) works.
    assert grade("\\frac{1}{2}", ["0.5"], timeout_s=10.0) == Grade(True, "ok")


def test_timeout_in_a_batch_does_not_spoil_other_items() -> None:
    preds = ["\\frac{2}{4}", PATHOLOGICAL, "\\sqrt{4}", "(1,2)"]
    golds = [["0.5"], ["3"], ["2"], ["(2,1)"]]
    grades = grade_many(preds, golds, timeout_s=1.0)
    assert grades == [Grade(True, "ok"), Grade(False, "timeout"), Grade(True, "ok"), Grade(False, "ok")]


def test_grading_works_off_the_main_thread() -> None:
    # math-verify's own timeout (SIGALRM) raises there; ours does not use signals.
    results: list[Grade] = []
    thread = threading.Thread(target=lambda: results.append(grade("\\frac{2}{4}", ["0.5"])))
    thread.start()
    thread.join(60)
    assert results == [Grade(True, "ok")]


def test_dead_worker_is_replaced() -> None:
    assert grade("\\frac{2}{4}", ["0.5"]).correct  # make sure a worker exists
    for worker in list(_POOL.workers):
        worker.proc.kill()
        worker.proc.wait()
    # The job meant for a dead worker goes to its replacement.
    grades = grade_many(["\\frac{2}{4}", "\\sqrt{9}"], [["0.5"], ["3"]])
    assert grades == [Grade(True, "ok"), Grade(True, "ok")]


# ---------------------------------------------------------------------------
# Agreement on the shipped benchmarks (the grader must see a reference answer
# as right and somebody else's reference answer as wrong)
# ---------------------------------------------------------------------------


def _derangement(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != j for i, j in enumerate(perm)):
            return perm


def _agreement(name: str, predictions: list[str | None], golds: list[tuple[str, ...]]) -> tuple[float, float]:
    """(self, shuffled) fractions judged correct; prints the figures."""
    start = time.monotonic()
    own = grade_many(predictions, golds)
    perm = _derangement(len(golds))
    shuffled_golds = [golds[j] for j in perm]
    other = grade_many(predictions, shuffled_golds)
    self_rate = sum(g.correct for g in own) / len(own)
    shuffled_rate = sum(g.correct for g in other) / len(other)
    # Shuffled "hits" where the two golds are not the same answer written the same way.
    distinct_hits = [
        (p, gold)
        for p, gold, g, own_gold in zip(predictions, shuffled_golds, other, golds, strict=True)
        if g.correct and {normalize_answer(x) for x in gold}.isdisjoint(normalize_answer(x) for x in own_gold)
    ]
    failures = [s for s in (*own, *other) if s.status not in ("ok",)]
    print(
        f"\n[agreement] {name}: n={len(own)} self={self_rate:.2%} shuffled={shuffled_rate:.2%} "
        f"shuffled_distinct_golds={len(distinct_hits)} non_ok={len(failures)} "
        f"time={time.monotonic() - start:.1f}s"
    )
    for p, g in zip(predictions, own, strict=True):
        if not g.correct:
            print(f"  self miss: {p!r}")
    for p, gold in distinct_hits:
        print(f"  shuffled hit with a different gold: {p!r} vs {gold!r}")
    assert len(distinct_hits) <= 0.005 * len(own)
    return self_rate, shuffled_rate


def _raw_rows(file: str) -> list[dict]:
    with open(BENCHMARK_DIR / file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_math500_reference_solutions_agree_with_gold() -> None:
    rows = _raw_rows("math500.jsonl")
    predictions = [extract_answer(r["solution"]) for r in rows]
    golds = [p.answers for p in load_benchmark("math500")]
    assert [p.answers[0] for p in load_benchmark("math500")] == [r["answer"] for r in rows]
    self_rate, shuffled_rate = _agreement("math500", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


def test_minerva_boxed_answers_agree_with_themselves() -> None:
    rows = _raw_rows("minerva_math.jsonl")
    predictions = [extract_answer(r["solution"]) for r in rows]
    golds = [p.answers for p in load_benchmark("minerva_math")]
    self_rate, shuffled_rate = _agreement("minerva_math", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


@pytest.mark.parametrize("delimiters", ["with $", "without $"])
def test_olympiadbench_final_answers_agree_with_themselves(delimiters: str) -> None:
    rows = _raw_rows("olympiadbench.jsonl")
    raw = [r["final_answer"][0] for r in rows]
    predictions = raw if delimiters == "with $" else [a.replace("$", "") for a in raw]
    golds = [tuple(r["final_answer"]) for r in rows]  # as shipped, delimiters and all
    self_rate, shuffled_rate = _agreement(f"olympiadbench ({delimiters})", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


def test_gsm8k_worked_solutions_agree_with_gold() -> None:
    rows = _raw_rows("gsm8k.jsonl")
    predictions = [extract_answer(r["answer"]) for r in rows]
    golds = [p.answers for p in load_benchmark("gsm8k")]
    self_rate, _ = _agreement("gsm8k", predictions, golds)
    assert self_rate == 1.0


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def test_gold_answers_parse_with_math_verify() -> None:
    """Report golds that math-verify turns into no sympy object (then only exact strings match)."""
    from math_verify import parse

    from em_sweep.grading import strip_math_delimiters

    for name in ("math500", "minerva_math", "olympiadbench"):
        golds = [a for p in load_benchmark(name) for a in p.answers]
        # Plain numbers parse; check the rest.
        answers = [a for a in golds if not _PLAIN_NUMBER.fullmatch(a)]
        unparsed = [
            a
            for a in answers
            if not any(not isinstance(x, str) for x in parse(f"${strip_math_delimiters(a)}$"))
        ]
        print(
            f"\n[parse] {name}: {len(golds) - len(unparsed)}/{len(golds)} golds parse; unparsed: {unparsed}"
        )
        assert len(unparsed) <= 0.02 * len(golds)
