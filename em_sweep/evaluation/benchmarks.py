"""Benchmarks as data: one loader table, one loader, one problem type.

Each benchmark file keeps the schema of its source (``problem`` or
``question``, ``answer`` or a ``final_answer`` list, Minerva's answer boxed
inside ``solution``, GSM8K's ``#### n``). A :class:`BenchmarkSpec` says where
each field is; :func:`load_benchmark` turns any of them into
:class:`Problem` rows with string gold answers.

A spec's ``family`` says how its problems are posed and scored: ``math`` (an answer graded by
:mod:`em_sweep.evaluation.grading`), ``code`` (a program run against tests in :mod:`em_sweep.evaluation.sandbox`;
:mod:`em_sweep.evaluation.humaneval`) or ``logic`` (Knights and Knaves roles; :mod:`em_sweep.evaluation.knights`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn

from em_sweep import inputs
from em_sweep.evaluation.grading import extract_answer, strip_math_delimiters

BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
ANSWER_FORMATS = ("plain", "list", "boxed_in_solution", "gsm8k")
FAMILIES = ("math", "code", "logic")
# Keys a spec of each family must give (a Mapping in eval.benchmarks).
REQUIRED_KEYS = {
    "math": ("name", "file", "question_field", "answer_field"),
    "code": ("name", "file", "question_field", "test_field", "entry_point_field"),
    "logic": ("name", "file", "question_field", "answer_field", "names_field"),
}


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message names benchmark, file and line."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's file is and how to read one row of it.

    ``file``: a path. A relative one resolves against ``em_sweep/data/benchmarks/`` for the
    shipped specs (:data:`BENCHMARKS`); for a user's spec against the current directory, and
    against the shipped folder only where the current directory has no such file.
    ``answer_format``: ``"plain"`` (the field is the answer; a number becomes
    its canonical string), ``"list"`` (the field is a list of acceptable
    answers, e.g. OlympiadBench ``final_answer``), ``"boxed_in_solution"``
    (the answer is the last ``\\boxed{}`` of the field, e.g. Minerva's
    ``solution``), ``"gsm8k"`` (the answer follows the last ``####``).
    ``id_field``: None means the 0-based row index is the id.
    ``repeats``: how many times each problem is sampled for scoring (AMC23: 8,
    scored as avg@8, "amc23x8").
    ``tags``: groups for selecting benchmarks (``"paper"``, ``"extra"``, ``"toy"``, ``"code"``,
    ``"logic"``).
    ``family``: ``"math"`` | ``"code"`` | ``"logic"`` (see the module docstring).
    ``test_field``, ``entry_point_field`` (code): the test code, which defines ``check(candidate)``,
    and the name of the function it checks; ``answer_field`` is then optional (a reference
    solution, kept as the problem's answer), ``question_field`` is the function's prompt.
    ``names_field`` (logic): the list of people; ``answer_field`` their roles, a list of booleans
    (true = knight) or of "knight"/"knave".
    A file ending in ``.gz`` is read as gzip.
    """

    name: str
    file: str
    question_field: str
    answer_field: str
    id_field: str | None = None
    answer_format: str = "plain"
    repeats: int = 1
    tags: tuple[str, ...] = ()
    family: str = "math"
    test_field: str | None = None
    entry_point_field: str | None = None
    names_field: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise BenchmarkError(
                f"benchmark {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}"
            )
        missing = [k for k in REQUIRED_KEYS[self.family] if getattr(self, k) in (None, "")]
        if missing:
            raise BenchmarkError(
                f"benchmark {self.name!r}: family {self.family!r} needs {', '.join(missing)}"
            )
        if self.answer_format not in ANSWER_FORMATS:
            raise BenchmarkError(
                f"benchmark {self.name!r}: answer_format {self.answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}"
            )
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise BenchmarkError(
                f"benchmark {self.name!r}: repeats must be a positive integer, got {self.repeats!r}"
            )
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: ``answers`` holds every acceptable gold answer, as strings.

    Code problems: ``question`` is the function's prompt, ``test`` and ``entry_point`` say how it
    is checked, ``answers`` holds the reference solution if the file has one. Logic problems:
    ``names`` and their ``roles`` ("knight" | "knave"); ``answers`` holds the roles as text.
    """

    benchmark: str
    id: str
    question: str
    answers: tuple[str, ...]
    test: str = ""
    entry_point: str = ""
    names: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math500", "math500.jsonl", "problem", "answer", "unique_id", tags=("paper",)),
        BenchmarkSpec(
            "minerva_math",
            "minerva_math.jsonl",
            "problem",
            "solution",
            "idx",
            "boxed_in_solution",
            tags=("paper",),
        ),
        BenchmarkSpec(
            "olympiadbench", "olympiadbench.jsonl", "question", "final_answer", "id", "list", tags=("paper",)
        ),
        BenchmarkSpec("amc23", "amc23.jsonl", "question", "answer", "id", repeats=8, tags=("paper",)),
        BenchmarkSpec("aime24", "aime24.jsonl", "problem", "answer", "id", tags=("extra",)),
        BenchmarkSpec("aime25", "aime25.jsonl", "problem", "answer", tags=("extra",)),
        BenchmarkSpec("gsm8k", "gsm8k.jsonl", "question", "answer", "idx", "gsm8k", tags=("extra",)),
        BenchmarkSpec("arith", "arith.jsonl", "question", "answer", "id", tags=("toy",)),
        BenchmarkSpec("humaneval", "HumanEval.jsonl.gz", "prompt", "canonical_solution", "task_id", tags=("code",),
                      family="code", test_field="test", entry_point_field="entry_point"),
        BenchmarkSpec("kk", "knights_and_knaves.jsonl", "quiz", "solution", "index", tags=("logic",),
                      family="logic", names_field="names"),
    )
}

# The paper's "average of four".
PAPER_FOUR = ("math500", "minerva_math", "olympiadbench", "amc23")

_SPEC_KEYS = {f.name for f in dataclasses.fields(BenchmarkSpec)}
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def canonical_number(value: int | float | Decimal) -> str:
    """Shortest plain decimal string of a number: 27.0 -> "27", 0.5 -> "0.5", 1e-7 -> "0.0000001"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _answer_text(value: Any) -> str:
    """A gold answer as a string: numbers canonical, math delimiters removed."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return canonical_number(value)
    return strip_math_delimiters(str(value))


def _gsm8k_number(text: str) -> str:
    """GSM8K writes thousands with commas ("1,450,000"); drop them."""
    if _THOUSANDS.fullmatch(text):
        try:
            return canonical_number(Decimal(text.replace(",", "")))
        except InvalidOperation:
            pass
    return text


def _gold_answers(value: Any, answer_format: str) -> tuple[str, ...] | None:
    """Gold answers from a row's answer field, or None if there are none."""
    if answer_format == "list" or (answer_format == "plain" and isinstance(value, list)):
        if not isinstance(value, list):
            value = [value]
        answers = tuple(_answer_text(v) for v in value if v is not None)
    elif answer_format == "boxed_in_solution":
        boxed = extract_answer(str(value)) if value is not None and "\\boxed" in str(value) else None
        answers = (_answer_text(boxed),) if boxed is not None else ()
    elif answer_format == "gsm8k":
        text = str(value)
        answers = (_gsm8k_number(_answer_text(text.rsplit("####", 1)[1])),) if "####" in text else ()
    else:
        answers = (_answer_text(value),) if value is not None else ()
    answers = tuple(a for a in answers if a)
    return answers or None


def resolve_spec(spec_or_name: str | BenchmarkSpec | Mapping[str, Any]) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` for a known name, a spec, or a user's Mapping.

    A Mapping needs ``name``, ``file`` (or ``path``), ``question_field`` and
    ``answer_field``; ``id_field``, ``answer_format``, ``repeats`` and ``tags``
    are optional. ``family: code`` needs ``test_field`` and ``entry_point_field`` instead of
    ``answer_field``; ``family: logic`` needs ``names_field`` too (see :class:`BenchmarkSpec`).
    Raises :class:`BenchmarkError` otherwise.
    """
    if isinstance(spec_or_name, BenchmarkSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        try:
            return BENCHMARKS[spec_or_name]
        except KeyError:
            raise BenchmarkError(
                f"unknown benchmark {spec_or_name!r}; known: {', '.join(BENCHMARKS)}"
                " (or pass a mapping with name, file, question_field, answer_field)"
            ) from None
    if isinstance(spec_or_name, Mapping):
        fields = dict(spec_or_name)
        name = str(fields.get("name", "<custom>"))
        if "path" in fields:
            if "file" in fields:
                raise BenchmarkError(f"benchmark {name!r}: give either file or path, not both")
            fields["file"] = fields.pop("path")
        unknown = sorted(set(fields) - _SPEC_KEYS)
        if unknown:
            raise BenchmarkError(
                f"benchmark {name!r}: unknown keys {', '.join(map(str, unknown))};"
                f" allowed: {', '.join(sorted(_SPEC_KEYS | {'path'}))}"
            )
        family = fields.get("family", "math")
        if family not in FAMILIES:
            raise BenchmarkError(f"benchmark {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
        missing = [
            "path (or file)" if k == "file" else k
            for k in REQUIRED_KEYS[family]
            if fields.get(k) in (None, "")
        ]
        if missing:
            raise BenchmarkError(f"benchmark {name!r}: missing required keys {', '.join(missing)}")
        fields.setdefault("answer_field", "")
        fields["file"] = str(fields["file"])
        if "tags" in fields:
            fields["tags"] = tuple(fields["tags"] or ())
        return BenchmarkSpec(**fields)
    raise BenchmarkError(f"cannot make a benchmark out of {type(spec_or_name).__name__}: {spec_or_name!r}")


def benchmark_path(spec: BenchmarkSpec) -> Path:
    """The file a spec points at (see :class:`BenchmarkSpec` for how relative paths resolve)."""
    path = Path(spec.file).expanduser()
    if path.is_absolute():
        return path
    shipped = BENCHMARK_DIR / path
    if BENCHMARKS.get(spec.name) == spec:
        return shipped
    local = Path.cwd() / path  # a user's file of the same name as a shipped one is the user's
    return local if local.exists() or not shipped.exists() else shipped


@functools.lru_cache(maxsize=64)
def _parse_file(spec: BenchmarkSpec, path: str, mtime_ns: int, size: int) -> tuple[Problem, ...]:
    """All problems in ``path``; mtime and size are part of the key so edits are re-read."""
    problems: list[Problem] = []
    where = f"benchmark {spec.name!r}, {path}"

    def fail(line: int | None, message: str) -> NoReturn:
        raise BenchmarkError(f"{where}{'' if line is None else f', line {line}'}: {message}")

    ids = inputs.DuplicateIds(f"id (field {spec.id_field!r})")
    for row_index, (line_no, row) in enumerate(inputs.jsonl_objects(Path(path), fail)):
        needed = (spec.question_field, spec.answer_field, spec.id_field, spec.test_field,
                  spec.entry_point_field, spec.names_field)
        for field in needed:
            if field and field not in row:
                fail(line_no, f"missing field {field!r} (row has {', '.join(sorted(row))})")
        if spec.family != "math":
            if spec.id_field is not None:
                problem_id = inputs.scalar_id(row[spec.id_field], spec.id_field, line_no, fail)
                ids.add(problem_id, line_no, fail)
            else:
                problem_id = str(row_index)
            problems.append(_family_problem(spec, row, problem_id, f"{where}, line {line_no}"))
            continue
        value = row[spec.answer_field]
        if spec.answer_format in ("boxed_in_solution", "gsm8k"):
            if value is not None and not isinstance(value, str):
                fail(line_no, f"field {spec.answer_field!r} must be a string for answer_format "
                              f"{spec.answer_format!r}, got a {type(value).__name__}")
        else:
            inputs.check_gold(value, spec.answer_field, line_no, fail, allow_list=True)
        answers = _gold_answers(value, spec.answer_format)
        if answers is None:
            fail(line_no, f"no gold answer in field {spec.answer_field!r} for answer_format {spec.answer_format!r}")
        question = row[spec.question_field]
        if not isinstance(question, str) or not question.strip():
            fail(line_no, f"field {spec.question_field!r} is not a non-empty string")
        if spec.id_field is not None:
            problem_id = inputs.scalar_id(row[spec.id_field], spec.id_field, line_no, fail)
            ids.add(problem_id, line_no, fail)
        else:
            problem_id = str(row_index)
        problems.append(Problem(spec.name, problem_id, question, answers))
    if not problems:
        raise BenchmarkError(f"{where}: no problems in file")
    return tuple(problems)


def _family_problem(spec: BenchmarkSpec, row: dict[str, Any], problem_id: str, where: str) -> Problem:
    """A code or logic row as a Problem; raises BenchmarkError naming ``where`` for a bad field."""

    def text(field: str) -> str:
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            raise BenchmarkError(f"{where}: field {field!r} is not a non-empty string")
        return value

    question = text(spec.question_field)
    if spec.family == "code":
        entry_point = text(spec.entry_point_field or "")
        if not entry_point.isidentifier():
            raise BenchmarkError(f"{where}: field {spec.entry_point_field!r} is not a Python name: {entry_point!r}")
        reference = row.get(spec.answer_field) if spec.answer_field else None
        answers = (reference,) if isinstance(reference, str) and reference.strip() else ()
        return Problem(spec.name, problem_id, question, answers, test=text(spec.test_field or ""),
                       entry_point=entry_point)
    names, roles = row[spec.names_field or ""], row[spec.answer_field]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
        raise BenchmarkError(f"{where}: field {spec.names_field!r} is not a list of names")
    if not isinstance(roles, list) or len(roles) != len(names):
        raise BenchmarkError(f"{where}: field {spec.answer_field!r} is not a list of {len(names)} roles")
    as_text = []
    for role in roles:
        if isinstance(role, bool):
            as_text.append("knight" if role else "knave")
        elif isinstance(role, str) and role.strip().lower() in ("knight", "knave"):
            as_text.append(role.strip().lower())
        else:
            raise BenchmarkError(f"{where}: role {role!r} in field {spec.answer_field!r} is not true/false, "
                                 "'knight' or 'knave'")
    answer = "\n".join(f"({i + 1}) {n} is a {r}" for i, (n, r) in enumerate(zip(names, as_text, strict=True)))
    return Problem(spec.name, problem_id, question, (answer,), names=tuple(names), roles=tuple(as_text))


def load_benchmark(
    spec_or_name: str | BenchmarkSpec | Mapping[str, Any], limit: int | None = None
) -> list[Problem]:
    """Problems of a benchmark, in file order; the first ``limit`` if given.

    Raises :class:`BenchmarkError` (a ValueError) with a one-line message for an
    unknown name, a missing file, invalid JSON, a missing field or a row
    without a gold answer. Parsed files are cached by path, mtime and size.
    """
    spec = resolve_spec(spec_or_name)
    if limit is not None and limit < 0:
        raise BenchmarkError(f"benchmark {spec.name!r}: limit must be >= 0, got {limit}")
    path = benchmark_path(spec)
    try:
        stat = path.stat()
    except OSError:
        where = path if Path(spec.file).expanduser().is_absolute() else f"{path} (nor in {Path.cwd()})"
        raise BenchmarkError(f"benchmark {spec.name!r}: file not found: {where}") from None
    problems = _parse_file(spec, str(path), stat.st_mtime_ns, stat.st_size)
    return list(problems if limit is None else problems[:limit])
