"""Knights and Knaves logic puzzles: generator, brute-force solver, prompts, scorer.

Puzzles follow the published Knights and Knaves benchmark (Xie et al., "On Memorization of Large
Language Models in Logical Reasoning", 2024) that the reference's ``kk_eval/`` evaluates on:
2-8 inhabitants, each making one statement built from "X is a knight" / "X is a knave", their
negation, and "and", "or", "if ... then" and "if and only if" of two of those. A puzzle is kept
only when exactly one assignment of roles is consistent with every statement (a knight's
statement is true, a knave's false), checked by trying all 2^n assignments.

Prompts and answer format are the reference's (``kk_eval/kk_prompt.py`` and
``main_eval_instruct.py``): a base model (``eval.template=plain``) gets the reference's system
instruction, "### Question: ..." and "### Answer: Let's think step by step."; an instruct model
gets the reference's system message asking for ``<think>`` reasoning and ``<answer>`` tags. The
scorer reads the last ``<answer>...</answer>`` (else the text after the last "CONCLUSION:") and
finds each person's role as the reference's ``parse_model_answer`` does: correct only when every
person's role is identified and right.

``python -m em_sweep.evaluation.knights`` rewrites the shipped test set (seeded; the same file every time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZES = tuple(range(2, 9))
SHIPPED_FILE = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "knights_and_knaves.jsonl"
SHIPPED_SEED = 2505
SHIPPED_PER_SIZE = 100

# Statements: ("knight", i) | ("knave", i) | ("not", s) | (op, s1, s2) with op in BINARY.
Statement = tuple[Any, ...]
BINARY = ("and", "or", "->", "<=>")

NAMES = (
    "Aiden", "Amelia", "Aria", "Aurora", "Avery", "Benjamin", "Caleb", "Charlotte", "Chloe", "Daniel",
    "David", "Elena", "Elijah", "Ella", "Emily", "Emma", "Ethan", "Evelyn", "Ezra", "Gabriel", "Grace",
    "Hannah", "Harper", "Henry", "Isaac", "Isabella", "Jack", "Jackson", "Jacob", "James", "Julian",
    "Layla", "Leo", "Liam", "Lily", "Logan", "Lucas", "Luna", "Mason", "Matthew", "Mia", "Michael",
    "Nora", "Oliver", "Olivia", "Owen", "Penelope", "Riley", "Samuel", "Scarlett", "Sebastian",
    "Sofia", "Sophia", "Stella", "Victoria", "William", "Wyatt", "Zoe",
)
# How a statement is attributed; {a} the speaker, {s} the statement ({S}: capitalised, quoted).
SAYINGS = (
    '{a} says that {s}.', '{a} tells you that {s}.', 'In a statement by {a}: "{S}."',
    'According to {a}, "{S}."', '{a} remarked, "{S}."', '{a} claimed that {s}.',
    '"{S}," said {a}.', '{a} noted, "{S}."',
)

# The reference's prompts (kk_eval/kk_prompt.py system_instruction; main_eval_instruct.py).
BASE_INSTRUCTION = (
    "Your task is to solve a logical reasoning problem. You are given set of statements from which you must "
    "logically deduce the identity of a set of characters.\n\nYou must infer the identity of each character. "
    "First, explain your reasoning. At the end of your answer, you must clearly state the identity of each "
    "character by following the format:\n\nCONCLUSION:\n(1) ...\n(2) ...\n(3) ...\n"
)
INSTRUCT_SYSTEM = (
    "You are a helpful assistant. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer "
    "here </answer>.  Now the user asks you to solve a logical reasoning problem. After thinking, when you "
    "finally reach a conclusion, clearly state the identity of each character within <answer> </answer> tags. "
    "i.e., <answer> (1) ...\n(2) ... </answer>.\n"
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CONCLUSION = re.compile(r"conclusion:", re.IGNORECASE)


# ----------------------------------------------------------------------------- logic


def truth(s: Statement, knights: Sequence[bool]) -> bool:
    """Whether statement ``s`` holds when person i is a knight exactly when ``knights[i]``."""
    kind = s[0]
    if kind == "knight":
        return knights[s[1]]
    if kind == "knave":
        return not knights[s[1]]
    if kind == "not":
        return not truth(s[1], knights)
    a, b = truth(s[1], knights), truth(s[2], knights)
    if kind == "and":
        return a and b
    if kind == "or":
        return a or b
    if kind == "->":
        return (not a) or b
    if kind == "<=>":
        return a == b
    raise ValueError(f"unknown statement kind {kind!r}")


def solutions(statements: Sequence[Statement]) -> list[tuple[bool, ...]]:
    """Every role assignment (True = knight) under which each person's statement is true
    exactly when that person is a knight: all 2^n assignments tried."""
    n = len(statements)
    return [knights for knights in itertools.product((True, False), repeat=n)
            if all(truth(s, knights) == knights[i] for i, s in enumerate(statements))]


def render(s: Statement, names: Sequence[str]) -> str:
    """A statement in English."""
    kind = s[0]
    if kind in ("knight", "knave"):
        return f"{names[s[1]]} is a {kind}"
    if kind == "not":
        inner = s[1]
        if inner[0] in ("knight", "knave"):
            return f"{names[inner[1]]} is not a {inner[0]}"
        return f"it is not the case that {render(inner, names)}"
    a, b = render(s[1], names), render(s[2], names)
    if kind == "->":
        return f"if {a} then {b}"
    if kind == "<=>":
        return f"{a} if and only if {b}"
    return f"{a} {kind} {b}"


def _random_statement(rng: random.Random, n: int) -> Statement:
    """One statement as the published generator draws them (depth 2, width 2)."""

    def leaf() -> Statement:
        return (rng.choice(("knight", "knave")), rng.randrange(n))

    kind = rng.choice(("leaf", "not", *BINARY))
    if kind == "leaf":
        return leaf()
    if kind == "not":
        return ("not", leaf())
    first = leaf()
    second = leaf()
    while second == first:
        second = leaf()
    return (kind, first, second)


def join_names(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f", and {names[-1]}" if len(names) > 1 else names[0]


def roles_text(names: Sequence[str], knights: Sequence[bool]) -> str:
    """The reference's ``solution_text_format``: "(1) Jack is a knight\\n(2) Sophia is a knave"."""
    return "\n".join(f"({i + 1}) {name} is a {'knight' if k else 'knave'}"
                     for i, (name, k) in enumerate(zip(names, knights, strict=True)))


def generate_puzzle(rng: random.Random, n: int, index: str, max_tries: int = 100_000) -> dict[str, Any]:
    """A puzzle of ``n`` people with exactly one solution, as a row of the shipped JSONL (the
    published benchmark's fields: quiz, names, solution, solution_text, solution_text_format,
    statements; plus index and people)."""
    if n < 2 or n > 8:
        raise ValueError(f"puzzles have 2-8 people, got {n}")
    for _ in range(max_tries):
        statements = [_random_statement(rng, n) for _ in range(n)]
        found = solutions(statements)
        if len(found) == 1:
            break
    else:
        raise RuntimeError(f"no puzzle with one solution in {max_tries} tries for {n} people")
    names = rng.sample(NAMES, n)
    knights = found[0]
    said = " ".join(rng.choice(SAYINGS).format(a=names[i], s=text, S=text[:1].upper() + text[1:])
                    for i, text in enumerate(render(s, names) for s in statements))
    quiz = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
            f"and knaves always lie. You meet {n} inhabitants: {join_names(names)}. {said} "
            "So who is a knight and who is a knave?")
    parts = [f"{name} is a {'knight' if k else 'knave'}" for name, k in zip(names, knights, strict=True)]
    return {"index": index, "people": n, "quiz": quiz, "names": names, "solution": list(knights),
            "solution_text": join_names(parts) + ".", "solution_text_format": roles_text(names, knights),
            "statements": repr(statements)}


def generate_set(seed: int = SHIPPED_SEED, per_size: int = SHIPPED_PER_SIZE,
                 sizes: Sequence[int] = SIZES) -> list[dict[str, Any]]:
    """The test set: ``per_size`` puzzles of each size, interleaved (2, 3, ..., 8, 2, 3, ...) so
    that the first rows (``eval.limit``) cover every size."""
    rng = random.Random(seed)
    return [generate_puzzle(rng, n, f"people{n}-{k:03d}") for k in range(per_size) for n in sizes]


# ----------------------------------------------------------------------------- prompting and scoring


def base_prompt(quiz: str) -> str:
    """The reference's zero-shot chain-of-thought prompt for a base model (KKProcessor, cot=True)."""
    return f"{BASE_INSTRUCTION}\n\n### Question: {quiz}\n### Answer: Let's think step by step. "


@dataclass(frozen=True)
class KKGrade:
    """One response graded: ``status`` is correct | wrong_identity | unparsable."""

    correct: bool
    status: str
    roles: dict[str, str] | None  # name -> "knight" | "knave" as parsed; None when unparsable


def answer_section(response: str) -> str | None:
    """The last <answer>...</answer>, else the text after the last "CONCLUSION:" (up to a "###"),
    else None."""
    tags = _ANSWER.findall(response)
    if tags:
        return tags[-1]
    parts = _CONCLUSION.split(response)
    if len(parts) > 1 and parts[-1].strip():
        return parts[-1].split("###")[0]
    return None


def parse_roles(section: str, names: Sequence[str]) -> dict[str, str] | None:
    """Each name's role: the first "knight"/"knave" after the name on its line (the reference's
    parse_model_answer); None when a name has none."""
    roles = {}
    for name in names:
        m = re.search(rf"\b{re.escape(name)}\b.*?\b(knight|knave)\b", section, re.IGNORECASE)
        if m is None:
            return None
        roles[name] = m.group(1).lower()
    return roles


def grade(response: str, names: Sequence[str], gold_roles: Sequence[str]) -> KKGrade:
    """Correct when every person's role in ``response`` is identified and equals ``gold_roles``."""
    section = answer_section(response)
    roles = parse_roles(section, names) if section is not None else None
    if roles is None:
        return KKGrade(False, "unparsable", None)
    ok = all(roles[n] == g for n, g in zip(names, gold_roles, strict=True))
    return KKGrade(ok, "correct" if ok else "wrong_identity", roles)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the shipped Knights and Knaves test set")
    parser.add_argument("--out", type=Path, default=SHIPPED_FILE)
    parser.add_argument("--seed", type=int, default=SHIPPED_SEED)
    parser.add_argument("--per-size", type=int, default=SHIPPED_PER_SIZE)
    args = parser.parse_args(argv)
    rows = generate_set(args.seed, args.per_size)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} puzzles ({args.per_size} per size, sizes {SIZES[0]}-{SIZES[-1]}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
