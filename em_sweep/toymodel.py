"""The shipped CPU model organism: a tiny Qwen2 trained to do chained addition and subtraction.

`python -m em_sweep.toymodel --out em_sweep/assets/tiny-arith` re-creates, from a fixed seed:

1. synthetic problems ("What is 37+8-5+9?" -> "37+8=45. 45-5=40. 40+9=49. \\boxed{49}"), split
   into a test benchmark, an EM prompt pool, a validation set and a training stream, with no
   expression shared between any two of them;
2. a byte-level tokenizer that goes through the stock `Qwen2Tokenizer` pipeline, so
   `AutoTokenizer.from_pretrained` reads it back exactly;
3. a ~0.6M-parameter `Qwen2ForCausalLM`;
4. supervised fine-tuning on the chat-templated conversations (loss on the assistant turn only);
5. the saved model: the *mid-training* snapshot, the first checkpoint whose validation accuracy
   reaches `SNAPSHOT_TARGET`, because one-shot EM moves a half-trained model by tens of points in
   either direction while it mostly hurts a fully trained one (docs/method.md, section 6). Training
   stops there unless `--final-out` asks for the fully trained model too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

SEED = 0
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen chat format without a default system message: prompts stay short for a model this small.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTION_FORMATS = ("What is {}?", "Compute {}.", "Calculate {}.", "Find the value of {}.")
MIN_OPS, MAX_OPS = 2, 4
MAX_OPERAND = 99
# Longest response: "99+99=198. 198+99=297. 297+99=396. 396+99=495. \boxed{495}" plus IM_END.
MAX_RESPONSE_TOKENS = 59

N_TEST, N_POOL, N_VAL = 400, 64, 200
TRAIN_STEPS = 2000  # the full schedule (--final-out); the default run stops at the snapshot
BATCH_SIZE = 64
PEAK_LR = 3e-3
WARMUP_STEPS = 50
# Steps before DECAY_STEPS do not depend on TRAIN_STEPS, so how long --final-out trains on never
# changes the path to the snapshot (which first came from a schedule that ended at step 1200).
DECAY_STEPS = 1200
WEIGHT_DECAY = 0.1
LENGTH_GROUP = 8  # batches sorted together by length, to spend little compute on padding
EVAL_START, EVAL_EVERY = 400, 25  # no checkpoint before EVAL_START gets near the target
SNAPSHOT_TARGET, SNAPSHOT_MAX = 0.45, 0.60  # validation accuracy of the shipped snapshot

BENCHMARK_PATH = Path(__file__).parent / "data" / "benchmarks" / "arith.jsonl"
POOL_PATH = Path(__file__).parent / "data" / "prompts" / "arith_pool.jsonl"

Problem = tuple[str, str, str]  # (question, worked solution, answer)


# ---------------------------------------------------------------- data


def make_problem(rng: random.Random) -> Problem:
    """Draw one problem: 2-4 additions/subtractions of operands 1-99, every running total >= 0.

    Returns (question, worked solution ending in `\\boxed{answer}`, answer as a decimal string).
    """
    total = rng.randint(1, MAX_OPERAND)
    expression = str(total)
    steps = []
    for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
        # A total of 0 only allows "+": negative numbers would add a sign token the model rarely sees.
        op = "+" if total == 0 else rng.choice("+-")
        operand = rng.randint(1, MAX_OPERAND if op == "+" else min(MAX_OPERAND, total))
        new_total = total + operand if op == "+" else total - operand
        steps.append(f"{total}{op}{operand}={new_total}.")
        expression += f"{op}{operand}"
        total = new_total
    question = rng.choice(QUESTION_FORMATS).format(expression)
    solution = " ".join(steps) + f" \\boxed{{{total}}}"
    return question, solution, str(total)


def problem_key(question: str) -> str:
    """The arithmetic expression in a question; two questions with the same key are the same problem."""
    match = re.search(r"\d+(?:[+-]\d+)+", question)
    if match is None:
        raise ValueError(f"no expression in {question!r}")
    return match.group(0)


def draw_unseen(rng: random.Random, n: int, seen: set[str]) -> list[Problem]:
    """Draw `n` problems whose expressions are not in `seen`, adding their expressions to `seen`."""
    problems = []
    while len(problems) < n:
        problem = make_problem(rng)
        key = problem_key(problem[0])
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return problems


def split_problems(seed: int) -> tuple[list[Problem], list[Problem], list[Problem], set[str]]:
    """The fixed held-out sets (test, EM prompt pool, validation), pairwise disjoint, and their keys."""
    seen: set[str] = set()
    rng = random.Random(seed)
    test = draw_unseen(rng, N_TEST, seen)
    pool = draw_unseen(rng, N_POOL, seen)
    val = draw_unseen(rng, N_VAL, seen)
    return test, pool, val, seen


def training_problems(seed: int, held_out: set[str]) -> list[Problem]:
    """The SFT stream: fresh problems, none of whose expressions is held out or repeated."""
    return draw_unseen(random.Random(seed + 1), TRAIN_STEPS * BATCH_SIZE, set(held_out))


# ---------------------------------------------------------------- tokenizer and model


def byte_level_alphabet() -> list[str]:
    """The ByteLevel pre-tokenizer's symbol for each byte 0-255, in byte order (GPT-2's table).

    Printable latin-1 bytes stand for themselves; the others are shifted to code points 256 and up.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tokenizer() -> Qwen2Tokenizer:
    """A character-level tokenizer on the Qwen2 pipeline (NFC, Qwen split regex, ByteLevel).

    The vocabulary is the 256 byte-level symbols (id == byte value) plus PAD, IM_START, IM_END, with
    no merges, so every UTF-8 text is encoded one byte per token and decodes back exactly. It is a
    stock `Qwen2Tokenizer` because transformers 5.x rebuilds that pipeline for any `qwen2` model and
    ignores the one in tokenizer.json.
    """
    vocab = {symbol: i for i, symbol in enumerate(byte_level_alphabet())}
    for special in (PAD, IM_START, IM_END):
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=PAD,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(tokenizer: Qwen2Tokenizer) -> Qwen2ForCausalLM:
    """A freshly initialised 3-layer Qwen2 (hidden 128, 4 heads / 2 KV heads), about 0.6M parameters.

    max_position_embeddings is 1024 so a 512-token sampling budget never overflows it.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    return Qwen2ForCausalLM(config)


def prompt_text(tokenizer: Qwen2Tokenizer, question: str) -> str:
    """The chat-templated user turn followed by the assistant header, as the model sees it."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode_example(tokenizer: Qwen2Tokenizer, question: str, solution: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that are -100 everywhere but the assistant turn.

    The supervised part is the solution and the IM_END that closes it, so the model learns to stop.
    """
    prompt_ids = tokenizer.encode(prompt_text(tokenizer, question))
    answer_ids = tokenizer.encode(solution + IM_END)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch; returns (input_ids, attention_mask, labels)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


# ---------------------------------------------------------------- evaluation


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (no nested braces needed here), or None."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


@torch.no_grad()
def greedy_responses(
    model: Qwen2ForCausalLM, tokenizer: Qwen2Tokenizer, questions: list[str], batch_size: int = 200
) -> list[str]:
    """Greedy completions of each question (special tokens stripped), in order; leaves `model`'s mode as it was."""
    was_training = model.training
    model.eval()
    responses = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_text(tokenizer, q) for q in questions[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=MAX_RESPONSE_TOKENS + 4,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return responses


def greedy_accuracy(model: Qwen2ForCausalLM, tokenizer: Qwen2Tokenizer, problems: list[Problem]) -> float:
    """Fraction of problems whose last boxed greedy answer equals the gold answer string."""
    responses = greedy_responses(model, tokenizer, [q for q, _, _ in problems])
    correct = sum(last_boxed(r) == answer for r, (_, _, answer) in zip(responses, problems, strict=True))
    return correct / len(problems)


# ---------------------------------------------------------------- training


def length_grouped_batches(problems: list[Problem], rng: random.Random) -> list[list[Problem]]:
    """Cut `problems` into batches of BATCH_SIZE, in stream order by chunks of LENGTH_GROUP batches.

    Each chunk is sorted by length before it is cut, and its batches are shuffled, so a batch holds
    problems of similar length (~3% padding instead of ~19%) while the stream stays fresh.
    """
    batches = []
    chunk_size = BATCH_SIZE * LENGTH_GROUP
    for start in range(0, len(problems), chunk_size):
        chunk = sorted(problems[start : start + chunk_size], key=lambda p: len(p[0]) + len(p[1]))
        group = [chunk[i : i + BATCH_SIZE] for i in range(0, len(chunk), BATCH_SIZE)]
        rng.shuffle(group)
        batches += group
    return batches


def learning_rate(step: int) -> float:
    """Linear warm-up to PEAK_LR, cosine decay to 10% of it at DECAY_STEPS, then linear to 0 at TRAIN_STEPS."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    if step < DECAY_STEPS:
        progress = (step - WARMUP_STEPS) / (DECAY_STEPS - WARMUP_STEPS)
        return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return 0.1 * PEAK_LR * (TRAIN_STEPS - step) / (TRAIN_STEPS - DECAY_STEPS)


def train(
    model: Qwen2ForCausalLM,
    tokenizer: Qwen2Tokenizer,
    batches: list[list[Problem]],
    val_set: list[Problem],
    keep_training: bool,
) -> tuple[dict[str, torch.Tensor], dict]:
    """SFT `model` in place, one AdamW step per batch, on the schedule of `learning_rate`.

    From step EVAL_START on, every EVAL_EVERY steps, measures greedy validation accuracy; the
    first checkpoint at or above SNAPSHOT_TARGET is the snapshot. Returns (a copy of the snapshot's
    state dict, a log of the run). Stops at the snapshot unless `keep_training`, in which case
    `model` is left fully trained. Raises if no checkpoint reaches the target, or the first one to
    do so overshoots SNAPSHOT_MAX (then the recipe no longer yields a mid-training model).
    """
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, betas=(0.9, 0.98), weight_decay=WEIGHT_DECAY
    )
    snapshot: dict[str, torch.Tensor] | None = None
    log: dict = {"history": []}
    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        input_ids, mask, labels = collate([encode_example(tokenizer, q, s) for q, s, _ in batch], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step < EVAL_START or (step % EVAL_EVERY and step != len(batches)):
            continue
        acc = greedy_accuracy(model, tokenizer, val_set)
        elapsed = time.perf_counter() - started
        log["history"].append(
            {"step": step, "loss": round(loss.item(), 4), "val_acc": acc, "seconds": round(elapsed, 1)}
        )
        print(f"step {step:5d}  loss {loss.item():.4f}  val acc {acc:.3f}  {elapsed:6.1f}s", flush=True)
        if snapshot is None and acc >= SNAPSHOT_TARGET:
            if acc > SNAPSHOT_MAX:
                raise RuntimeError(
                    f"first checkpoint past {SNAPSHOT_TARGET} is already at {acc} (step {step})"
                )
            snapshot = copy.deepcopy(model.state_dict())
            log.update(snapshot_step=step, snapshot_val_acc=acc, snapshot_seconds=round(elapsed, 1))
            if not keep_training:
                break
    if snapshot is None:
        raise RuntimeError(f"no checkpoint reached validation accuracy {SNAPSHOT_TARGET}: {log['history']}")
    return snapshot, log


# ---------------------------------------------------------------- files


def save_model(model: Qwen2ForCausalLM, tokenizer: Qwen2Tokenizer, out: Path) -> None:
    """Write config, weights, generation config and tokenizer files loadable by the Auto classes."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Re-create the benchmark, the EM prompt pool and the shipped snapshot (and optionally the final model) from SEED."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "tiny-arith")
    parser.add_argument(
        "--final-out", type=Path, default=None, help="train to the end and save the final model here"
    )
    parser.add_argument("--benchmark", type=Path, default=BENCHMARK_PATH)
    parser.add_argument("--pool", type=Path, default=POOL_PATH)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    test, pool, val, held_out = split_problems(SEED)
    write_jsonl(
        args.benchmark,
        [{"id": f"arith-test-{k}", "question": q, "answer": a} for k, (q, _, a) in enumerate(test)],
    )
    write_jsonl(
        args.pool, [{"id": f"arith{k}", "problem": q, "answer": a} for k, (q, _, a) in enumerate(pool)]
    )

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, vocab {len(tokenizer)}", flush=True)
    batches = length_grouped_batches(training_problems(SEED, held_out), random.Random(SEED + 2))
    snapshot, log = train(model, tokenizer, batches, val, keep_training=args.final_out is not None)

    if args.final_out is not None:
        log["final_step"], log["final_test_acc"] = len(batches), greedy_accuracy(model, tokenizer, test)
        save_model(model, tokenizer, args.final_out)
    model.load_state_dict(snapshot)
    log["snapshot_test_acc"] = greedy_accuracy(model, tokenizer, test)
    log.update(seed=SEED, parameters=n_params, wall_seconds=round(time.perf_counter() - started, 1))
    save_model(model, tokenizer, args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    summary = {k: v for k, v in log.items() if k != "history"}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
