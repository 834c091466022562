"""Reading a user's input files (prompt pools, custom benchmarks, selection histories) before compute.

Every file is held to the same rules, each broken rule reported as one line naming the file and
line: at most :data:`MAX_INPUT_BYTES`, UTF-8 text (a byte-order mark is allowed), no binary data,
valid JSON. The field rules of each kind of file (ids, problems, gold answers) live with their
loaders (:mod:`em_sweep.prompts`, :mod:`em_sweep.evaluation.benchmarks`, :mod:`em_sweep.analysis.selection`); the
helpers for values they share are here.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

# Input files are parsed whole into memory (Python objects take ~10x the file's bytes): 256 MiB
# is far above any benchmark or prompt pool (the shipped ones are <= 1.5 MB) and still fits a node.
MAX_INPUT_BYTES = 256 * 2**20

# fail(line or None, message) raises the caller's error type with the caller's file label.
Fail = Callable[[int | None, str], NoReturn]


def check_size(path: Path, fail: Fail) -> None:
    """The file exists as a regular file of at most MAX_INPUT_BYTES."""
    try:
        size = path.stat().st_size
    except OSError as e:
        fail(None, f"cannot read ({e.strerror or type(e).__name__})")
    if not path.is_file():
        fail(None, "is not a regular file")
    if size > MAX_INPUT_BYTES:
        fail(None, f"is {size / 2**20:.0f} MiB, over the {MAX_INPUT_BYTES // 2**20} MiB limit for input files "
                   "(split it, or keep only the rows the run needs)")


def decode_line(raw: bytes, line: int, fail: Fail) -> str:
    """One line of a file as text: UTF-8, no NUL bytes (a binary file)."""
    if b"\0" in raw:
        fail(line, "binary data (a NUL byte); expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        fail(line, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8")


def read_text(path: Path, fail: Fail) -> str:
    """A whole (JSON) file as text, under the size limit and UTF-8, errors naming the line."""
    check_size(path, fail)
    raw = path.read_bytes()
    for line, chunk in enumerate(raw.split(b"\n"), 1):
        decode_line(chunk, line, fail)
    return raw.decode("utf-8-sig")


def jsonl_objects(path: Path, fail: Fail) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; any other line fails."""
    check_size(path, fail)
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        for line, raw in enumerate(f, 1):
            text = decode_line(raw, line, fail)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                fail(line, f"invalid JSON ({e.msg}, column {e.colno})")
            if not isinstance(row, dict):
                fail(line, f"expected a JSON object, got a JSON {_json_type(row)}")
            yield line, row


def scalar_id(value: Any, field: str, line: int, fail: Fail) -> str:
    """A row's id as a string: a non-empty string or an integer (not null, a list, an object,
    a boolean or a float)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        fail(line, f"field {field!r} must be a string or an integer id, got {_describe(value)}")
    text = str(value)
    if not text.strip():
        fail(line, f"field {field!r} is an empty id")
    return text


def check_gold(value: Any, field: str, line: int, fail: Fail, allow_list: bool) -> None:
    """A gold answer is a string or a finite number (or, where ``allow_list``, a list of them)."""
    values = value if allow_list and isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            fail(line, f"field {field!r} holds a non-finite gold answer ({v}); write it as a string if it is meant")
        if v is not None and not isinstance(v, str | int | float):
            fail(line, f"field {field!r} holds a gold answer that is {_describe(v)}; expected a string or a number"
                       + (" (or a list of them)" if allow_list else ""))


class DuplicateIds:
    """Remembers the line of each id; a second row with one fails naming both lines."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.lines: dict[str, int] = {}

    def add(self, row_id: str, line: int, fail: Fail) -> None:
        first = self.lines.setdefault(row_id, line)
        if first != line:
            fail(line, f"duplicate {self.field} {row_id!r} (also on line {first})")


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"non-finite ({value})"
    return f"a JSON {_json_type(value) if not isinstance(value, dict) else 'object'}"
