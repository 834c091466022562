"""Answer extraction and grading: response text -> final answer -> correct or not.

Two separate steps, as in the Qwen2.5-Math toolkit (parser vs grader):

* :func:`extract` / :func:`extract_answer` pull the final answer out of a response
  (the last ``\\boxed{...}``, with fallbacks; :func:`extract` also says which rule
  gave it). Pure string work, linear in the response and capped in length.
* :func:`grade` / :func:`grade_many` decide mathematical equivalence with the
  golds: percent signs and ``{,}`` separators dropped, then a cheap exact path
  (normalised strings, plain numbers compared as numbers), then math-verify for
  everything else.

math-verify can hang: its own timeout uses SIGALRM (main thread only) and some
inputs (nested powers) sit in C code that no signal interrupts. So math-verify
only ever runs in persistent worker processes, talked to over a pipe; a worker
that overruns its deadline is killed and respawned, and the item counts as
incorrect with status ``"timeout"``. Workers run this file as a script
(not ``multiprocessing``), so they never re-import the caller's ``__main__``
nor the em_sweep package, and never inherit a forked copy of a threaded
parent (torch).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection, wait
from pathlib import Path

logger = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "timeout", "error")
DEFAULT_TIMEOUT_S = 5.0  # the one default of a grading call (eval.grade_timeout_s is this)
# Grace period for a fresh worker to import sympy and math-verify; not counted
# against any item's timeout.
_STARTUP_TIMEOUT_S = 120.0
# Address-space cap of a worker process.
_WORKER_MEMORY_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one prediction.

    ``correct`` is True only if the prediction is equivalent to at least one
    gold. ``status`` is ``"ok"`` (graded normally, either way), ``"no_answer"``
    (no prediction to grade), ``"timeout"`` (the grader overran; counted
    wrong) or ``"error"`` (the grader failed; counted wrong).
    """

    correct: bool
    status: str


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

# Which rule gave an answer, in order of precedence; "none": no rule did.
EXTRACTION_RULES = ("boxed", "gsm8k", "answer_is", "last_number", "none")
# Extraction reads at most the last this many characters of a response (the final answer is at
# the end), so its work per response is bounded whatever the model wrote: tens of ms at this size,
# far below any grading timeout. Generation budgets (3,072 tokens) stay well under it.
MAX_EXTRACT_CHARS = 100_000
# "The answer is ..." reads at most this many characters after the phrase, and tries at most the
# last _MAX_ANSWER_IS phrases.
_ANSWER_IS_WINDOW = 2_000
_MAX_ANSWER_IS = 64

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GSM8K_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s+is\s*:?\s*", re.IGNORECASE)
# A backslash escapes the next character (\{ and \} are literal braces); else a brace.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACE_RE = re.compile(r"\s*")
_BARE_ARG_RE = re.compile(r"[^\s$]+")
# The toolkit's last-number pattern (Qwen2.5-Eval/evaluation/parser.py, extract_answer).
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")
# A thousands separator, "," or LaTeX's "{,}", between a digit and a group of exactly three.
_THOUSANDS_SEP_RE = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Extraction:
    """The final answer of a response (None if no rule found one) and the rule that gave it
    (one of :data:`EXTRACTION_RULES`)."""

    answer: str | None
    rule: str


def _brace_matches(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of its closing ``}`` (unclosed ones absent); one pass."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN_RE.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            matches[stack.pop()] = m.start()
    return matches


def _box_content(text: str, end: int, matches: dict[int, int]) -> str | None:
    """Argument of a ``\\boxed``/``\\fbox`` command that ends at ``end``, or None if it has none
    (an unclosed brace group counts as none)."""
    start = _SPACE_RE.match(text, end).end()
    if start < len(text) and text[start] == "{":
        close = matches.get(start)
        return None if close is None else text[start + 1 : close]
    if start > end:
        # "\boxed 5": the argument runs to the next space or math delimiter.
        m = _BARE_ARG_RE.match(text, start)
        return m.group(0) if m else None
    return None


def _clean(answer: str) -> str | None:
    answer = answer.strip()
    # Strip enclosing math delimiters and a sentence-final period.
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
            break
    answer = answer.rstrip(".").strip()
    return answer or None


def _answer_is_tail(tail: str) -> str | None:
    """The answer after "the answer is": a leading $...$ span, else the rest of the sentence."""
    tail = tail.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if tail.startswith(left):
            close = tail.find(right, len(left))
            if close > 0:
                return _clean(tail[len(left) : close])
    line = tail.split("\n", 1)[0]
    line = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]
    return _clean(line)


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last match of ``pattern`` in ``text`` (one pass, no list of all matches)."""
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


def _last_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed (``1,000`` and ``1{,}000`` -> 1000)."""
    last = _last_match(_LAST_NUMBER_RE, _THOUSANDS_SEP_RE.sub("", text))
    return last.group() if last else None


def extract(text: str, last_number: bool = True) -> Extraction:
    """Final answer of a model response and the rule that found it.

    Rules, in order of precedence (within each, the last occurrence wins):

    1. ``boxed``: ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces, or ``\\boxed 5``; an
       unclosed (truncated) box is skipped in favour of an earlier one;
    2. ``gsm8k``: GSM8K's ``#### 42``;
    3. ``answer_is``: "The final answer is ..." / "the answer is ...": a leading ``$...$`` span,
       else the rest of the sentence;
    4. ``last_number`` (only if ``last_number``): the last number in the text, as the
       Qwen2.5-Math toolkit's fallback (thousands separators removed);

    else ``none`` (answer None). Surrounding ``$``/``\\(``/``\\[`` delimiters, whitespace and a
    trailing period are removed; the answer is otherwise returned verbatim. Reads at most the
    last :data:`MAX_EXTRACT_CHARS` characters, in time linear in that length.
    """
    if not text:
        return Extraction(None, "none")
    text = text[-MAX_EXTRACT_CHARS:]
    boxes = list(_BOX_RE.finditer(text))
    if boxes:
        matches = _brace_matches(text)
        for m in reversed(boxes):
            content = _box_content(text, m.end(), matches)
            if content is not None:
                cleaned = _clean(content)
                if cleaned is not None:
                    return Extraction(cleaned, "boxed")
    last_hashes = _last_match(_GSM8K_RE, text)
    if last_hashes is not None:
        cleaned = _clean(last_hashes.group(1))
        if cleaned is not None:
            return Extraction(cleaned, "gsm8k")
    for m in list(_ANSWER_IS_RE.finditer(text))[::-1][:_MAX_ANSWER_IS]:
        cleaned = _answer_is_tail(text[m.end() : m.end() + _ANSWER_IS_WINDOW])
        if cleaned is not None:
            return Extraction(cleaned, "answer_is")
    if last_number:
        number = _last_number(text)
        if number is not None:
            return Extraction(number, "last_number")
    return Extraction(None, "none")


def extract_answer(text: str, last_number: bool = False) -> str | None:
    """Final answer of a model response, or None if it states none: :func:`extract`'s answer.

    The last-number fallback is off by default here (RL rewards and prompt selection score only
    answers a response states); evaluation turns it on with ``eval.last_number_fallback``.
    """
    return extract(text, last_number=last_number).answer


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any of ``stop_strings``.

    The text before a stop is the same whether generation stopped there or ran on, so cutting
    afterwards gives what stopping on these strings would have produced.
    """
    cut = len(text)
    for stop in stop_strings:
        i = text.find(stop) if stop else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


# ---------------------------------------------------------------------------
# Fast exact path
# ---------------------------------------------------------------------------

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")


def strip_math_delimiters(answer: str) -> str:
    """``answer`` without unescaped ``$`` signs, ``\\(``/``\\)``, ``\\[``/``\\]`` or outer whitespace.

    OlympiadBench golds such as ``$69$,$84$`` carry delimiters around each item.
    """
    answer = _UNESCAPED_DOLLAR.sub("", answer)
    answer = answer.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    return answer.strip()


def normalize_answer(answer: str) -> str:
    """Canonical string for the exact path: same string => same answer.

    Only rewrites that cannot change the value: delimiters, whitespace,
    ``\\left``/``\\right``, spacing commands, ``\\dfrac``/``\\tfrac``, a
    trailing period.
    """
    s = strip_math_delimiters(answer)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,!;:]|\\ ", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)\{,\}(?=\d{3}(?!\d))")


def strip_percent_and_separators(answer: str) -> str:
    """``answer`` without percent signs (``\\%``, ``%``) or ``{,}`` thousands separators.

    The Qwen2.5-Math toolkit drops percent signs from predictions and golds alike
    (``strip_string`` in Qwen2.5-Eval/evaluation/parser.py), so ``35.0\\%`` is 35.0; it also keeps
    math-verify's verdict independent of its parser runtime, whose LaTeX grammar reads ``35.0\\%``
    as 35.0 under antlr4-python3-runtime 4.9 but as 0.35 under 4.13. ``1{,}000`` is LaTeX's
    spelling of the thousands comma the toolkit removes from numbers (``1{,}000`` -> ``1000``).
    """
    return _LATEX_THOUSANDS_RE.sub("", answer.replace("\\%", "").replace("%", ""))


# Packages whose versions decide math-verify's verdicts; recorded with every score.
GRADER_PACKAGES = ("math-verify", "latex2sympy2_extended", "antlr4-python3-runtime")


@functools.lru_cache(maxsize=1)
def grader_versions() -> dict[str, str]:
    """Installed version of each of :data:`GRADER_PACKAGES` (``"absent"`` if not installed);
    the grading workers run the same interpreter and import path, so the same versions."""
    from importlib import metadata

    versions = {}
    for name in GRADER_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _as_number(s: str) -> Decimal | None:
    if not _NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def _fast_verdict(prediction: str, golds: Sequence[str]) -> bool | None:
    """True/False when the exact path decides, None when math-verify must."""
    pred = normalize_answer(prediction)
    pred_num = _as_number(pred)
    all_numeric = pred_num is not None
    for gold in golds:
        g = normalize_answer(gold)
        if g == pred and g:
            return True
        g_num = _as_number(g)
        if g_num is None:
            all_numeric = False
        elif pred_num is not None and g_num == pred_num:
            return True
    # Two plain numbers that differ are different answers; no need for sympy.
    return False if all_numeric and golds else None


# ---------------------------------------------------------------------------
# Worker side (runs in a child process)
# ---------------------------------------------------------------------------


def _serve(read_fd: int, write_fd: int) -> None:  # pragma: no cover - runs in the child
    """Worker loop: receive ``(prediction, golds)``, answer ``(correct, status)``."""
    # Anything printed by sympy must not reach the caller's stdout.
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="em_sweep.evaluation.grading worker: %(message)s")
    # Our parent enforces the timeout; math-verify's own SIGALRM one is off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # A runaway sympy computation should fail with MemoryError, not take the machine down.
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _WORKER_MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, hard))
    # Exit if orphaned (the parent kills us normally, but it may itself be killed).
    parent = os.getppid()

    def watch_parent() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    from functools import lru_cache

    from math_verify import parse, verify

    @lru_cache(maxsize=4096)
    def parsed(answer: str) -> list:
        return parse("$" + strip_math_delimiters(answer) + "$", parsing_timeout=None)

    outbox.send(("ready", None))
    while True:
        try:
            prediction, golds = inbox.recv()
        except EOFError:
            return
        try:
            pred = parsed(prediction)
            correct = bool(pred) and any(verify(parsed(g), pred, timeout_seconds=None) for g in golds)
            outbox.send((correct, "ok"))
        except Exception as exc:  # any grader failure counts as a wrong answer
            # Only the type: str() of a sympy exception may print a huge expression.
            outbox.send((False, f"error: {type(exc).__name__}"))


# ---------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------


class _Worker:
    """One grading subprocess with a pipe each way."""

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Run this file as a script (-P: without its folder on sys.path), so the
        # worker imports neither the em_sweep package nor the caller's __main__.
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                str(Path(__file__).resolve()),
                "--serve",
                str(to_child_r),
                str(from_child_w),
            ],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.recv_conn.poll(_STARTUP_TIMEOUT_S):
            raise RuntimeError("grading worker did not start")
        tag, _ = self.recv_conn.recv()
        if tag != "ready":
            raise RuntimeError(f"grading worker sent {tag!r} instead of ready")
        self.ready = True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for conn in (self.send_conn, self.recv_conn):
            try:
                conn.close()
            except OSError:
                pass


class _Pool:
    """A few persistent workers; one item in flight per worker, each with a deadline."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        # A forked child must not share its parent's workers (or a lock held at fork time).
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self.workers = []
        self.lock = threading.Lock()

    def _ensure(self, n: int) -> None:
        while len(self.workers) < n:
            self.workers.append(_Worker())

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close()
        fresh = _Worker()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def run(
        self, jobs: list[tuple[str, tuple[str, ...]]], timeout_s: float, n_workers: int
    ) -> list[tuple[bool, str]]:
        """Results of ``jobs`` in order; ``("timeout"|"error")`` statuses for failures."""
        results: list[tuple[bool, str] | None] = [None] * len(jobs)
        if not jobs:
            return []
        with self.lock:
            self._ensure(max(1, min(n_workers, len(jobs))))
            pending = list(range(len(jobs)))[::-1]
            busy: dict[int, tuple[_Worker, int, float]] = {}  # id(worker) -> (worker, job, deadline)
            idle = list(self.workers)
            failed_starts = 0
            while pending or busy:
                while pending and idle:
                    worker = idle.pop()
                    try:
                        worker.wait_ready()
                        worker.send_conn.send(jobs[pending[-1]])
                    except (OSError, EOFError, RuntimeError) as exc:
                        # A worker that died while idle; the job stays pending for its replacement.
                        failed_starts += 1
                        logger.error("grading worker failed to start or take work: %s", exc)
                        idle.append(self._replace(worker))
                        if failed_starts > 2 * len(self.workers):
                            # Workers cannot start at all; fail the rest rather than loop forever.
                            for j in pending:
                                results[j] = (False, "error")
                            pending.clear()
                        continue
                    failed_starts = 0
                    busy[id(worker)] = (worker, pending.pop(), time.monotonic() + timeout_s)
                if not busy:
                    break
                soonest = min(deadline for _, _, deadline in busy.values())
                ready = wait([w.recv_conn for w, _, _ in busy.values()], max(0.0, soonest - time.monotonic()))
                now = time.monotonic()
                for key, (worker, job, deadline) in list(busy.items()):
                    if worker.recv_conn in ready:
                        del busy[key]
                        try:
                            correct, status = worker.recv_conn.recv()
                        except (EOFError, OSError):
                            logger.error("grading worker died on prediction %r", jobs[job][0][:200])
                            results[job] = (False, "error")
                            idle.append(self._replace(worker))
                            continue
                        if status != "ok":
                            logger.error("grader error on prediction %r: %s", jobs[job][0][:200], status)
                            status = "error"
                        results[job] = (correct, status)
                        idle.append(worker)
                    elif now >= deadline:
                        del busy[key]
                        logger.warning(
                            "grader timed out after %.1f s on prediction %r vs golds %r; counted wrong",
                            timeout_s,
                            jobs[job][0][:200],
                            [g[:200] for g in jobs[job][1]],
                        )
                        results[job] = (False, "timeout")
                        idle.append(self._replace(worker))
        return [r if r is not None else (False, "error") for r in results]

    def shutdown(self) -> None:
        with self.lock:
            for worker in self.workers:
                worker.close()
            self.workers.clear()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def grade_many(
    predictions: Sequence[str | None],
    golds_list: Sequence[Sequence[str]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    n_workers: int | None = None,
    exact_path: bool = True,
) -> list[Grade]:
    """Grade ``predictions[i]`` against ``golds_list[i]``, in order.

    Correct if equivalent to any gold. Predictions and golds lose percent signs and ``{,}``
    thousands separators first (:func:`strip_percent_and_separators`). Items the exact path decides never
    reach math-verify; duplicates are graded once; the rest go to up to
    ``n_workers`` (default: min(2, CPUs)) worker processes, each item with its
    own ``timeout_s`` deadline. Never raises for a bad answer and never hangs
    longer than about ``timeout_s`` per item. ``exact_path=False`` sends every
    item to math-verify (to measure the grader itself).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if len(predictions) != len(golds_list):
        raise ValueError(f"{len(predictions)} predictions but {len(golds_list)} gold lists")
    grades: list[Grade | None] = [None] * len(predictions)
    job_index: dict[tuple[str, tuple[str, ...]], int] = {}
    jobs: list[tuple[str, tuple[str, ...]]] = []
    waiting: list[tuple[int, int]] = []  # (item, job)
    for i, (pred, golds) in enumerate(zip(predictions, golds_list, strict=True)):
        if pred is None or not str(pred).strip():
            grades[i] = Grade(False, "no_answer")
            continue
        # Both sides normalised before either path, so no percent sign ever reaches math-verify.
        pred_s = strip_percent_and_separators(str(pred))
        golds_t = tuple(strip_percent_and_separators(str(g)) for g in golds)
        verdict = _fast_verdict(pred_s, golds_t) if exact_path else None
        if verdict is not None:
            grades[i] = Grade(verdict, "ok")
            continue
        key = (pred_s, golds_t)
        if key not in job_index:
            job_index[key] = len(jobs)
            jobs.append(key)
        waiting.append((i, job_index[key]))
    if jobs:
        outcomes = _POOL.run(jobs, timeout_s, n_workers or _default_workers())
        for i, j in waiting:
            grades[i] = Grade(*outcomes[j])
    return [g if g is not None else Grade(False, "error") for g in grades]


def grade(prediction: str | None, golds: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade one prediction (an extracted answer, or None) against its golds; see :func:`grade_many`."""
    if isinstance(golds, str):
        golds = [golds]
    return grade_many([prediction], [golds], timeout_s=timeout_s, n_workers=1)[0]


def is_equivalent(prediction: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``gold``; False on timeout or error."""
    return grade(prediction, [gold], timeout_s=timeout_s).correct


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]), int(sys.argv[3]))
