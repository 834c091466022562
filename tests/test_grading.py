"""Answer extraction, equivalence, the hang-proof grader, and agreement on the shipped data."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import threading
import time

import pytest

from em_sweep.evaluation.benchmarks import BENCHMARK_DIR, load_benchmark
from em_sweep.evaluation.grading import (
    _POOL,
    EXTRACTION_RULES,
    MAX_EXTRACT_CHARS,
    Extraction,
    Grade,
    cut_at_stop,
    extract,
    extract_answer,
    grade,
    grade_many,
    grader_versions,
    is_equivalent,
    normalize_answer,
    strip_percent_and_separators,
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


# The toolkit's rules (Qwen2.5-Eval/evaluation/parser.py, extract_answer): the last box, else
# "the answer is ...", else the last number.
@pytest.mark.parametrize(
    ("text", "answer", "rule"),
    [
        ("First \\boxed{1}, finally $\\boxed{35.0\\%}$.", "35.0\\%", "boxed"),
        ("The answer is 5, but \\boxed{6}", "6", "boxed"),  # a box beats an answer phrase
        ("\\boxed{\\frac{1}{2}} and then \\boxed{\\frac{3", "\\frac{1}{2}", "boxed"),  # an unclosed box is skipped
        ("She sells 9 eggs.\n#### 18", "18", "gsm8k"),
        ("So 3 + 4 = 7, and the answer is $\\frac{3}{4}$. Check: 12.", "\\frac{3}{4}", "answer_is"),
        ("Thus the final answer is 7\nwith 8 more lines", "7", "answer_is"),
        ("Adding 3 and 4 gives 7 apples.", "7", "last_number"),
        ("so x = -2.5.", "-2.5", "last_number"),
        ("In all 1,234,567 grains, not 3", "3", "last_number"),
        ("In all 1,234,567 grains", "1234567", "last_number"),  # thousands commas dropped
        ("a total of $1{,}000$ dollars", "1000", "last_number"),  # and LaTeX's {,}
        ("the pairs (1,2) and (3,45)", "45", "last_number"),  # not a thousands comma
        ("\\boxed{\\frac{1", "1", "last_number"),  # only an unclosed box: the number inside it
        ("no digits here", None, "none"),
        ("", None, "none"),
    ],
)
def test_extraction_rules(text: str, answer: str | None, rule: str) -> None:
    assert extract(text) == Extraction(answer, rule)


def test_last_number_fallback_can_be_turned_off() -> None:
    assert extract("Adding 3 and 4 gives 7.", last_number=False) == Extraction(None, "none")
    # extract_answer keeps its old answer set by default (RL rewards and selection use it).
    assert extract_answer("Adding 3 and 4 gives 7.") is None
    assert extract_answer("Adding 3 and 4 gives 7.", last_number=True) == "7"
    assert set(EXTRACTION_RULES) == {"boxed", "gsm8k", "answer_is", "last_number", "none"}


def test_extraction_reads_only_the_end_of_a_huge_response() -> None:
    tail = "x" * MAX_EXTRACT_CHARS
    assert extract("\\boxed{5}" + tail) == Extraction(None, "none")
    assert extract("\\boxed{5}" + tail[10:]) == Extraction("5", "boxed")


# Run in a fresh interpreter under a timeout: a regression to quadratic work fails by the clock,
# not by a tight timing (10,000 unclosed boxes took ~26 s before extraction was linear; here 40,000).
_PATHOLOGICAL_EXTRACTION = """
from em_sweep.evaluation.grading import extract
BOX = chr(92) + "boxed"  # a backslash and "boxed"
cases = {
    "unclosed": (BOX + "{") * 40_000,
    "unclosed_then_number": (BOX + "{") * 40_000 + " 12",
    "nested": (BOX + "{") * 40_000 + "7" + "}" * 40_000,
    "unclosed_around_closed": (BOX + "{") * 7_000 + BOX + "{3}" + (BOX + "{") * 7_000,
    "bare": (BOX + " ") * 40_000,
    "answer_is_empty": "the answer is . " * 40_000,
    "hashes": ("####" + chr(10)) * 20_000 + "#### 42" + (" " + chr(10)) * 40_000,
    "braces": "{" * 50_000 + BOX + "{4" + "}" * 50_000,
}
for name, text in cases.items():
    e = extract(text)
    print(name, e.rule, e.answer)
"""


def test_pathological_responses_are_extracted_in_linear_time() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _PATHOLOGICAL_EXTRACTION], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines == {
        "unclosed": "none None",
        "unclosed_then_number": "last_number 12",
        "nested": "boxed 7",
        "unclosed_around_closed": "boxed 3",
        "bare": "boxed \\boxed",
        "answer_is_empty": "none None",
        "hashes": "gsm8k 42",
        "braces": "boxed 4",
    }


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("42.<|im_end|>\n<|im_start|>user\n\\boxed{7}", ["</s>", "<|im_end|>", "<|endoftext|>"], "42."),
        ("a</s>b<|endoftext|>c", ["<|endoftext|>", "</s>"], "a"),  # the first stop in the text, not in the list
        ("no stop here", ["</s>"], "no stop here"),
        ("<|im_end|>", ["<|im_end|>"], ""),
        ("a</s>b", [], "a</s>b"),
    ],
)
def test_cut_at_stop(text: str, stops: list[str], expected: str) -> None:
    assert cut_at_stop(text, stops) == expected


def test_cut_at_stop_is_what_stopping_there_gives() -> None:
    # Whatever follows the first stop, the text before it is the same.
    stops = ["</s>", "<|im_end|>", "<|endoftext|>"]
    head = "Step 1: 2+2=4. So \\boxed{4}."
    for tail in ("", "<|im_end|>", "<|im_end|>\n<|im_start|>user\nNext: \\boxed{9}", "</s> \\boxed{1}<|endoftext|>"):
        assert cut_at_stop(head + tail, stops) == head
    assert extract(cut_at_stop(head + "<|im_end|>\\boxed{9}", stops)).answer == "4"


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


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("35.0\\%", "35.0"),
        ("35%", "35"),
        ("5\\% + 5", "5 + 5"),
        ("1{,}000", "1000"),
        ("1{,}234{,}567.5", "1234567.5"),
        ("3{,}14", "3{,}14"),  # a decimal comma, not a thousands separator
        ("(1{,}2)", "(1{,}2)"),
    ],
)
def test_strip_percent_and_separators(answer: str, expected: str) -> None:
    assert strip_percent_and_separators(answer) == expected


# Graded by math-verify itself (exact_path=False) so the normalisation, not the exact path, decides.
# Under antlr4-python3-runtime 4.9 math-verify reads "\%" as the end of the expression ("5\% + 5"
# is 5), under 4.13 as /100 ("35.0\%" is 0.35); with percent signs dropped first both agree.
PERCENT_CASES = [
    ("35.0\\%", "35", True),
    ("35\\%", "35", True),
    ("5\\% + 5", "10", True),
    ("12.5\\%", "12.5\\%", True),
    ("\\frac{1}{2}\\%", "\\frac{1}{2}", True),
    ("1{,}000", "1000", True),
    ("35\\%", "0.35", False),  # the toolkit's math_equal would also accept x/100 and x*100; we do not
    ("51\\%", "50", False),
]


def test_percent_and_thousands_are_graded_as_the_toolkit_does() -> None:
    preds, golds, expected = zip(*PERCENT_CASES, strict=True)
    for exact_path in (True, False):
        grades = grade_many(list(preds), [[g] for g in golds], exact_path=exact_path)
        assert [g.correct for g in grades] == list(expected), exact_path
        assert all(g.status == "ok" for g in grades)


_VERDICTS = r"""
import json, sys
from em_sweep.evaluation.grading import grade_many, grader_versions
cases = json.loads(sys.argv[1])
grades = grade_many([p for p, _, _ in cases], [[g] for _, g, _ in cases], exact_path=False)
print(json.dumps({"versions": grader_versions(), "correct": [g.correct for g in grades]}))
"""


@pytest.mark.skipif(not os.environ.get("EM_SWEEP_OTHER_ANTLR"),
                    reason="set EM_SWEEP_OTHER_ANTLR to a folder holding another antlr4-python3-runtime "
                           "(pip install --target DIR antlr4-python3-runtime==4.13.2)")
def test_verdicts_do_not_depend_on_the_antlr_runtime() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    def run(extra_path: str) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)}
        proc = subprocess.run([sys.executable, "-c", _VERDICTS, json.dumps(PERCENT_CASES)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.splitlines()[-1])

    here, other = run(""), run(os.environ["EM_SWEEP_OTHER_ANTLR"])
    runtime = "antlr4-python3-runtime"
    assert here["versions"][runtime] != other["versions"][runtime]
    print(f"\n[antlr] {here['versions'][runtime]} vs {other['versions'][runtime]}: same verdicts")
    assert here["correct"] == other["correct"] == [c for _, _, c in PERCENT_CASES]


def test_grader_versions_are_the_installed_ones() -> None:
    from importlib import metadata

    versions = grader_versions()
    assert versions == {name: metadata.version(name) for name in versions}
    assert set(versions) == {"math-verify", "latex2sympy2_extended", "antlr4-python3-runtime"}


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


STOPS = ["</s>", "<|im_end|>", "<|endoftext|>"]


def _as_evaluated(response: str) -> str | None:
    """The answer evaluation takes from ``response`` (eval's defaults: stop strings, all fallbacks)."""
    return extract(cut_at_stop(response, STOPS), last_number=True).answer


@pytest.mark.slow
def test_math500_reference_solutions_agree_with_gold() -> None:
    rows = _raw_rows("math500.jsonl")
    predictions = [_as_evaluated(r["solution"]) for r in rows]
    golds = [p.answers for p in load_benchmark("math500")]
    assert [p.answers[0] for p in load_benchmark("math500")] == [r["answer"] for r in rows]
    self_rate, shuffled_rate = _agreement("math500", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


@pytest.mark.slow
def test_minerva_boxed_answers_agree_with_themselves() -> None:
    rows = _raw_rows("minerva_math.jsonl")
    predictions = [_as_evaluated(r["solution"]) for r in rows]
    golds = [p.answers for p in load_benchmark("minerva_math")]
    self_rate, shuffled_rate = _agreement("minerva_math", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


@pytest.mark.slow
@pytest.mark.parametrize("delimiters", ["with $", "without $"])
def test_olympiadbench_final_answers_agree_with_themselves(delimiters: str) -> None:
    rows = _raw_rows("olympiadbench.jsonl")
    raw = [r["final_answer"][0] for r in rows]
    predictions = raw if delimiters == "with $" else [a.replace("$", "") for a in raw]
    golds = [tuple(r["final_answer"]) for r in rows]  # as shipped, delimiters and all
    self_rate, shuffled_rate = _agreement(f"olympiadbench ({delimiters})", predictions, golds)
    assert self_rate >= 0.99
    assert shuffled_rate <= 0.02


@pytest.mark.parametrize("form", ["boxed", "answer is", "last number"])
def test_amc23_answers_agree_with_gold(form: str) -> None:
    # AMC23 ships no solutions: its answers (floats such as 27.0) written as a model states them.
    from em_sweep.evaluation.benchmarks import canonical_number

    rows = _raw_rows("amc23.jsonl")
    written = [canonical_number(r["answer"]) for r in rows]
    responses = {
        "boxed": [f"Adding up, 1 + 2 = 3, so we get $\\boxed{{{a}}}$.<|im_end|>junk 999" for a in written],
        "answer is": [f"Adding up, 1 + 2 = 3, so the answer is {a}." for a in written],
        "last number": [f"Adding up, 1 + 2 = 3, and in all we have {a} ways." for a in written],
    }[form]
    golds = [p.answers for p in load_benchmark("amc23")]
    self_rate, shuffled_rate = _agreement(f"amc23 ({form})", [_as_evaluated(r) for r in responses], golds)
    assert self_rate == 1.0
    # 40 problems, many sharing an answer (3, 4, 36, ...): a shuffled gold is right exactly where
    # it is the same number.
    perm = _derangement(len(golds))
    assert shuffled_rate == sum(golds[i] == golds[j] for i, j in enumerate(perm)) / len(golds)


def test_gsm8k_worked_solutions_agree_with_gold() -> None:
    rows = _raw_rows("gsm8k.jsonl")
    predictions = [extract_answer(r["answer"]) for r in rows]
    golds = [p.answers for p in load_benchmark("gsm8k")]
    self_rate, _ = _agreement("gsm8k", predictions, golds)
    assert self_rate == 1.0


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@pytest.mark.slow
def test_gold_answers_parse_with_math_verify() -> None:
    """Report golds that math-verify turns into no sympy object (then only exact strings match)."""
    from math_verify import parse

    from em_sweep.evaluation.grading import strip_math_delimiters

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
