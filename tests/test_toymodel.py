"""The shipped tiny-arith model, its tokenizer, its data files and the problem generator."""

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from em_sweep import toymodel

MODEL_DIR = Path(toymodel.__file__).parent / "assets" / "tiny-arith"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "text",
    [
        "What is 37+8-5+9?",
        "37+8=45. 45-5=40. 40+9=49. \\boxed{49}",
        "two  spaces, a\nnewline,\n\nblank line and trailing space ",
        "\\boxed{49}",
        "\t{}[]()~`!@#$%^&*_|;:'\",.<>/?",
        "non-ASCII: é π 数学",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_the_stock_qwen2_pipeline_with_chat_specials(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    # One token per character: digits never merge, so the model sees every digit.
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 5


def test_chat_template_renders_qwen_format(tokenizer):
    messages = [{"role": "user", "content": "What is 1+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+2?<|im_end|>\n"


def test_config_names_eos_and_pad(model, tokenizer):
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.max_position_embeddings >= 1024


def test_shipped_model_is_a_mid_training_snapshot(model, tokenizer):
    # The snapshot is meant to be half right (docs/method.md, section 6), not fully trained.
    test = read_jsonl(Path(toymodel.__file__).parent / "data" / "benchmarks" / "arith.jsonl")[:200]
    problems = [(row["question"], "", row["answer"]) for row in test]
    assert 0.25 <= toymodel.greedy_accuracy(model, tokenizer, problems) <= 0.75


def test_model_answers_in_boxed_form_and_stops(model, tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 37+8-5+9?"}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=80)
    new = out[0, batch["input_ids"].shape[1] :]
    assert new[-1].item() == tokenizer.eos_token_id
    assert "\\boxed{" in tokenizer.decode(new, skip_special_tokens=True)


def test_make_problem_is_arithmetically_correct_and_well_formed():
    rng = random.Random(123)
    for _ in range(1000):
        question, solution, answer = toymodel.make_problem(rng)
        operands = [int(x) for x in re.findall(r"[+-]?\d+", toymodel.problem_key(question))]
        assert 3 <= len(operands) <= 5
        assert all(1 <= abs(x) <= 99 for x in operands)
        assert sum(operands) == int(answer)
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", solution)
        assert len(steps) == len(operands) - 1
        total = operands[0]
        for (left, op, right, result), operand in zip(steps, operands[1:], strict=True):
            assert int(left) == total and int(op + right) == operand
            total += operand
            assert int(result) == total >= 0
        assert solution.endswith(f" \\boxed{{{answer}}}")
        assert toymodel.last_boxed(solution) == answer


def test_longest_response_fits_the_declared_budget(tokenizer):
    longest = "99+99=198. 198+99=297. 297+99=396. 396+99=495. \\boxed{495}<|im_end|>"
    assert len(tokenizer.encode(longest, add_special_tokens=False)) == toymodel.MAX_RESPONSE_TOKENS
    rng = random.Random(5)
    lengths = [len(toymodel.make_problem(rng)[1]) + 1 for _ in range(2000)]
    assert max(lengths) <= toymodel.MAX_RESPONSE_TOKENS


def test_length_grouped_batches_keep_every_problem_once():
    rng = random.Random(0)
    problems = [toymodel.make_problem(rng) for _ in range(toymodel.BATCH_SIZE * toymodel.LENGTH_GROUP * 2)]
    batches = toymodel.length_grouped_batches(problems, random.Random(1))
    assert all(len(b) == toymodel.BATCH_SIZE for b in batches)
    assert sorted(p for b in batches for p in b) == sorted(problems)


def test_make_problem_is_deterministic():
    assert [toymodel.make_problem(random.Random(7)) for _ in range(3)] == [
        toymodel.make_problem(random.Random(7)) for _ in range(3)
    ]


def test_shipped_data_files_are_disjoint_and_correct():
    data = Path(toymodel.__file__).parent / "data"
    test = read_jsonl(data / "benchmarks" / "arith.jsonl")
    pool = read_jsonl(data / "prompts" / "arith_pool.jsonl")
    assert len(test) == toymodel.N_TEST and len(pool) == toymodel.N_POOL
    assert [row["id"] for row in test] == [f"arith-test-{k}" for k in range(len(test))]
    assert [row["id"] for row in pool] == [f"arith{k}" for k in range(len(pool))]
    for question, answer in [(r["question"], r["answer"]) for r in test] + [
        (r["problem"], r["answer"]) for r in pool
    ]:
        assert str(eval(toymodel.problem_key(question))) == answer  # the key is only digits, + and -
    test_keys = {toymodel.problem_key(r["question"]) for r in test}
    pool_keys = {toymodel.problem_key(r["problem"]) for r in pool}
    assert len(test_keys) == len(test) and len(pool_keys) == len(pool)
    assert not test_keys & pool_keys


def test_shipped_held_out_sets_match_the_generator():
    test, pool, _, _ = toymodel.split_problems(toymodel.SEED)
    data = Path(toymodel.__file__).parent / "data"
    assert [r["question"] for r in read_jsonl(data / "benchmarks" / "arith.jsonl")] == [q for q, _, _ in test]
    assert [r["problem"] for r in read_jsonl(data / "prompts" / "arith_pool.jsonl")] == [
        q for q, _, _ in pool
    ]


def test_training_stream_never_contains_a_held_out_problem():
    _, _, _, held_out = toymodel.split_problems(toymodel.SEED)
    rng = random.Random(0)
    stream = toymodel.draw_unseen(rng, 2000, set(held_out))
    keys = [toymodel.problem_key(q) for q, _, _ in stream]
    assert not set(keys) & held_out
    assert len(set(keys)) == len(keys)


def test_schedule_up_to_the_snapshot_ignores_the_training_length(monkeypatch):
    early = [toymodel.learning_rate(s) for s in range(toymodel.DECAY_STEPS)]
    monkeypatch.setattr(toymodel, "TRAIN_STEPS", toymodel.TRAIN_STEPS * 3)
    assert [toymodel.learning_rate(s) for s in range(toymodel.DECAY_STEPS)] == early
    rates = [toymodel.learning_rate(s) for s in range(toymodel.TRAIN_STEPS + 1)]
    assert max(rates) == toymodel.PEAK_LR and rates[-1] == 0.0
    assert all(abs(a - b) < toymodel.PEAK_LR / 40 for a, b in zip(rates[:-1], rates[1:], strict=True))
