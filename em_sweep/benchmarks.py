"""Benchmarks as data: one loader table, one loader, one problem type.

Each benchmark file keeps the schema of its source (``problem`` or
``question``, ``answer`` or a ``final_answer`` list, Minerva's answer boxed
inside ``solution``, GSM8K's ``#### n``). A :class:`BenchmarkSpec` says where
each field is; :func:`load_benchmark` turns any of them into
:class:`Problem` rows with string gold answers.
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
from em_sweep.grading import extract_answer, strip_math_delimiters

BENCHMARK_DIR = Path(__file__).resolve().parent / "data" / "benchmarks"
ANSWER_FORMATS = ("plain", "list", "boxed_in_solution", "gsm8k")


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
    ``tags``: groups for selecting benchmarks (``"paper"``, ``"extra"``, ``"toy"``).
    """

    name: str
    file: str
    question_field: str
    answer_field: str
    id_field: str | None = None
    answer_format: str = "plain"
    repeats: int = 1
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
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
    """One benchmark problem: ``answers`` holds every acceptable gold answer, as strings."""

    benchmark: str
    id: str
    question: str
    answers: tuple[str, ...]


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
    are optional. Raises :class:`BenchmarkError` otherwise.
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
        missing = [
            "path (or file)" if k == "file" else k
            for k in ("name", "file", "question_field", "answer_field")
            if fields.get(k) in (None, "")
        ]
        if missing:
            raise BenchmarkError(f"benchmark {name!r}: missing required keys {', '.join(missing)}")
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
        for field in (spec.question_field, spec.answer_field, spec.id_field):
            if field is not None and field not in row:
                fail(line_no, f"missing field {field!r} (row has {', '.join(sorted(row))})")
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
