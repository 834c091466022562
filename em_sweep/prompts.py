"""Prompt pools, prompt sets for EM, and the one path that turns a question into model input."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

PROMPTS_DIR = Path(__file__).parent / "data" / "prompts"

# The Qwen2.5-Math evaluation toolkit's "qwen25-math-cot" system message (MISSION.md s3).
QWEN25_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class PromptError(ValueError):
    """A prompt pool or prompt id problem; the message names the file, line or id."""


@dataclass(frozen=True)
class PoolItem:
    id: str
    problem: str
    answer: str | None


def resolve_pool_path(pool: str) -> Path:
    """The file ``prompt.pool`` names. A name (``pi1``: no ``/``, no ``.jsonl``) is always the
    shipped pool em_sweep/data/prompts/pi1.jsonl, whatever the working directory holds. A path
    (it has a ``/``, starts with ``~`` or ends in ``.jsonl``) is that file, relative to the
    working directory; a relative one that is not there may name a shipped file (``pi1.jsonl``)."""
    known = sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl"))
    if "/" in pool or pool.startswith("~") or pool.endswith(".jsonl"):
        path = Path(pool).expanduser()
        if path.is_file():
            return path
        if not path.is_absolute() and (PROMPTS_DIR / pool).is_file():
            return PROMPTS_DIR / pool
        raise PromptError(f"prompt.pool: no prompt file {pool!r} (shipped pools: {known})")
    if (PROMPTS_DIR / f"{pool}.jsonl").is_file():
        return PROMPTS_DIR / f"{pool}.jsonl"
    raise PromptError(f"prompt.pool: no shipped pool {pool!r} (shipped: {known}); a file of your own is "
                      f"given by its path, e.g. ./{pool}.jsonl")


@lru_cache(maxsize=32)
def _load_pool_cached(path: str, mtime_ns: int, size: int) -> tuple[PoolItem, ...]:
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(PoolItem(str(row["id"]), str(row["problem"]),
                                      None if row.get("answer") is None else str(row["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PromptError(f"{path}:{lineno}: bad prompt row ({type(e).__name__}: {e}); "
                                  "expected JSON with fields id, problem[, answer]") from None
    return tuple(items)


def load_pool(pool: str) -> dict[str, PoolItem]:
    """All items of a pool by id."""
    path = resolve_pool_path(pool)
    stat = path.stat()  # an edit in place changes mtime or size: the pool is read again
    return {item.id: item for item in _load_pool_cached(str(path), stat.st_mtime_ns, stat.st_size)}


def select_prompts(prompt_cfg: Any) -> list[PoolItem]:
    """The configured prompt set, in the configured order; unknown ids fail naming them."""
    pool = load_pool(prompt_cfg.pool)
    missing = [i for i in prompt_cfg.ids if i not in pool]
    if missing:
        sample = ", ".join(list(pool)[:5])
        raise PromptError(f"prompt.ids: {missing} not in pool {prompt_cfg.pool!r} ({len(pool)} ids, e.g. {sample})")
    return [pool[i] for i in prompt_cfg.ids]


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None,
                  chat_template: bool = True) -> str:
    """The text a model is conditioned on: chat template with an optional system turn, or plain."""
    if not chat_template:
        prefix = f"{system}\n\n" if system else ""
        return f"{prefix}{question}\n"
    if tokenizer.chat_template is None:
        raise PromptError("the tokenizer has no chat template; set prompt.chat_template=false "
                          "(or eval.template=plain)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_eval_prompt(tokenizer: PreTrainedTokenizerBase, question: str, template: str) -> str:
    """Evaluation prompt for ``eval.template``: qwen25-math-cot | chat | plain."""
    if template == "qwen25-math-cot":
        return format_prompt(tokenizer, question, QWEN25_MATH_COT_SYSTEM)
    if template == "chat":
        return format_prompt(tokenizer, question)
    if template == "plain":
        return format_prompt(tokenizer, question, QWEN25_MATH_COT_SYSTEM, chat_template=False)
    raise PromptError(f"eval.template: unknown template {template!r}")


def batch_prompts(prompts: Sequence[T], batch_size: int, step: int = 0) -> list[T]:
    """The prompts of the batch of (0-based) ``step``. With n <= ``batch_size`` prompts every
    batch spreads them evenly: prompt i fills slots i, i+n, i+2n, ... With more prompts than
    slots each batch takes the next ``batch_size`` of them, cycling through the set, so every
    prompt is trained on (as the RL stage's batches do)."""
    n = len(prompts)
    start = 0 if n <= batch_size else step * batch_size
    return [prompts[(start + i) % n] for i in range(batch_size)]
