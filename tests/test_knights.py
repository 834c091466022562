"""Knights and Knaves: every puzzle has exactly one solution (an independent brute force), the
shipped set is the seeded generator's output, and the scorer on hand-written answers."""

from __future__ import annotations

import ast
import itertools
import json
import random

import pytest

from em_sweep.evaluation import knights as kk
from em_sweep.evaluation.benchmarks import load_benchmark


def _as_python(s, names: str = "k") -> str:
    """A statement as a Python boolean expression over the tuple ``k`` (True = knight)."""
    op = s[0]
    if op == "knight":
        return f"{names}[{s[1]}]"
    if op == "knave":
        return f"(not {names}[{s[1]}])"
    if op == "not":
        return f"(not {_as_python(s[1])})"
    a, b = _as_python(s[1]), _as_python(s[2])
    return {"and": f"({a} and {b})", "or": f"({a} or {b})", "->": f"((not {a}) or {b})",
            "<=>": f"({a} == {b})"}[op]


def _independent_solutions(statements) -> list[tuple[bool, ...]]:
    exprs = [compile(_as_python(s), "<statement>", "eval") for s in statements]
    return [k for k in itertools.product((False, True), repeat=len(statements))
            if all(eval(e, {}, {"k": k}) == k[i] for i, e in enumerate(exprs))]  # noqa: S307 - our own expressions


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    with open(kk.SHIPPED_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_set_is_the_seeded_generator_output(shipped) -> None:
    assert shipped == json.loads(json.dumps(kk.generate_set()))
    assert len(shipped) == 700
    assert [r["people"] for r in shipped[:7]] == list(range(2, 9))  # interleaved: a limit sees every size
    assert {n: sum(r["people"] == n for r in shipped) for n in range(2, 9)} == {n: 100 for n in range(2, 9)}


def test_every_shipped_puzzle_has_exactly_its_one_solution(shipped) -> None:
    for row in shipped:
        statements = ast.literal_eval(row["statements"])
        assert len(statements) == row["people"] == len(row["names"])
        assert _independent_solutions(statements) == [tuple(row["solution"])], row["index"]


def test_generated_puzzles_of_every_size_have_one_solution() -> None:
    rng = random.Random(7)
    for n in range(2, 9):
        for j in range(5):
            row = kk.generate_puzzle(rng, n, f"t{n}-{j}")
            statements = ast.literal_eval(row["statements"])
            assert _independent_solutions(statements) == [tuple(row["solution"])]
            assert kk.solutions(statements) == [tuple(row["solution"])]
            for name in row["names"]:
                assert name in row["quiz"]


def test_statement_kinds_and_rendering() -> None:
    names = ["Ann", "Bo"]
    assert kk.render(("not", ("knave", 1)), names) == "Bo is not a knave"
    assert kk.render(("<=>", ("knave", 0), ("knight", 1)), names) == "Ann is a knave if and only if Bo is a knight"
    assert kk.render(("->", ("knight", 0), ("knight", 1)), names) == "if Ann is a knight then Bo is a knight"
    # "Ann: Ann is a knave or Bo is a knight" has the one solution: Ann knight, Bo knight.
    assert kk.solutions([("or", ("knave", 0), ("knight", 1)), ("knight", 0)]) == [(True, True)]
    with pytest.raises(ValueError, match="2-8"):
        kk.generate_puzzle(random.Random(0), 9, "x")


def test_loader_reads_names_and_roles() -> None:
    problems = load_benchmark("kk", limit=7)
    assert [len(p.names) for p in problems] == list(range(2, 9))
    assert all(set(p.roles) <= {"knight", "knave"} and len(p.roles) == len(p.names) for p in problems)


NAMES = ("Jack", "Jackson", "Mia")
GOLD = ("knight", "knave", "knave")


def test_scorer_right_answer_in_answer_tags() -> None:
    response = ("<think>Assume Jack is a knave ...</think><answer> (1) Jack is a knight\n(2) Jackson is a knave\n"
                "(3) Mia is a knave </answer>")
    g = kk.grade(response, NAMES, GOLD)
    assert g.correct and g.status == "correct"
    assert g.roles == {"Jack": "knight", "Jackson": "knave", "Mia": "knave"}


def test_scorer_right_answer_in_the_conclusion_format() -> None:
    response = ("Let's think. If Jack were a knave then ...\nCONCLUSION:\n(1) Jack is a knight\n(2) Jackson is a knave\n"
                "(3) Mia is a knave\n### Question: next")
    assert kk.grade(response, NAMES, GOLD).correct


def test_scorer_one_role_wrong() -> None:
    response = "<answer>(1) Jack is a knight\n(2) Jackson is a knave\n(3) Mia is a knight</answer>"
    g = kk.grade(response, NAMES, GOLD)
    assert not g.correct and g.status == "wrong_identity" and g.roles == {"Jack": "knight", "Jackson": "knave",
                                                                          "Mia": "knight"}


@pytest.mark.parametrize("response", [
    "Jack is a knight, Jackson is a knave, Mia is a knave.",  # no answer tags, no CONCLUSION
    "<answer>(1) Jack is a knight\n(2) Jackson is a knave</answer>",  # Mia missing
    "CONCLUSION:\n",  # nothing after it
    "",
])
def test_scorer_unparsable(response: str) -> None:
    g = kk.grade(response, NAMES, GOLD)
    assert not g.correct and g.status == "unparsable" and g.roles is None


def test_the_last_answer_counts() -> None:
    response = ("<answer>Jack is a knave, Jackson is a knave, Mia is a knave</answer> wait, no: "
                "<answer>Jack is a knight, Jackson is a knave, Mia is a knave</answer>")
    assert kk.grade(response, NAMES, GOLD).correct
