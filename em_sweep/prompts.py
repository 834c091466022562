"""Prompt pools, prompt sets for EM, and the one path that turns a question into model input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from transformers import PreTrainedTokenizerBase

from em_sweep import inputs

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import PromptConfig

T = TypeVar("T")

PROMPTS_DIR = Path(__file__).parent / "data" / "prompts"

# The Qwen2.5-Math evaluation toolkit's "qwen25-math-cot" system message.
QWEN25_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# The toolkit's whole "qwen25-math-cot" prompt: one hard-coded ChatML string, the same for every
# model (Qwen2.5-Eval/evaluation/utils.py, PROMPT_TEMPLATES; "{input}" is the question).
QWEN25_MATH_COT_PROMPT = (
    "<|im_start|>system\n" + QWEN25_MATH_COT_SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n{input}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


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
    """Every row of a pool file; mtime and size are part of the key so edits are re-read."""

    def fail(line: int | None, message: str) -> NoReturn:
        raise PromptError(f"{path}{'' if line is None else f':{line}'}: {message}")

    items, ids = [], inputs.DuplicateIds("id")
    for line, row in inputs.jsonl_objects(Path(path), fail):
        missing = [k for k in ("id", "problem") if k not in row]
        if missing:
            fail(line, f"missing field(s) {', '.join(missing)}; expected JSON with fields id, problem[, answer]")
        item_id = inputs.scalar_id(row["id"], "id", line, fail)
        ids.add(item_id, line, fail)
        problem = row["problem"]
        if not isinstance(problem, str) or not problem.strip():
            fail(line, f"field 'problem' must be a non-empty string, got {problem!r:.40}")
        answer = row.get("answer")
        inputs.check_gold(answer, "answer", line, fail, allow_list=False)
        items.append(PoolItem(item_id, problem, None if answer is None else str(answer)))
    if not items:
        fail(None, "no prompts in the file")
    return tuple(items)


def load_pool(pool: str) -> dict[str, PoolItem]:
    """All items of a pool by id. Raises PromptError naming file and line for a file over the
    size limit, not UTF-8 or binary, a row that is not JSON, a null/empty/non-scalar or repeated
    id, an empty problem, or a gold answer that is not a string or finite number."""
    path = resolve_pool_path(pool)
    stat = path.stat()  # an edit in place changes mtime or size: the pool is read again
    return {item.id: item for item in _load_pool_cached(str(path), stat.st_mtime_ns, stat.st_size)}


def select_prompts(prompt_cfg: PromptConfig) -> list[PoolItem]:
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


def default_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special tokens ``tokenizer`` puts before any text by default, as text: Llama's BOS
    (``<|begin_of_text|>``, ``<s>``); empty for Qwen, which adds none."""
    plain = tokenizer("1", add_special_tokens=False)["input_ids"]
    full = tokenizer("1", add_special_tokens=True)["input_ids"]
    n = len(full) - len(plain)
    return tokenizer.decode(full[:n]) if n > 0 and full[n:] == plain else ""


def qwen25_math_cot_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The toolkit's qwen25-math-cot prompt for ``question``, whatever the model.

    The toolkit hands this string to vLLM, which tokenizes it with the tokenizer's default
    special tokens; em-sweep tokenizes prompts without them, so they are written out here
    (a BOS for Llama, nothing for Qwen). The question is stripped, as the toolkit does.
    """
    return default_prefix(tokenizer) + QWEN25_MATH_COT_PROMPT.replace("{input}", question.strip(), 1)


def format_eval_prompt(tokenizer: PreTrainedTokenizerBase, question: str, template: str) -> str:
    """Evaluation prompt for ``eval.template``, one of ``config.KNOWN_TEMPLATES``."""
    if template == "qwen25-math-cot":
        return qwen25_math_cot_prompt(tokenizer, question)
    if template == "chat-cot":
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
