"""Continuous batching (sample.py backends continuous*, decode.ContinuousDecoder) against today's
static batches: greedy responses identical token for token, samples a function of the seed."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from em_sweep.config import validate
from em_sweep.evaluation.evaluate import evaluate, generate_responses
from em_sweep.generation import decode
from em_sweep.generation.sample import SamplingSettings, resolve_backend, sample_responses
from em_sweep.prompts import format_prompt
from tests.conftest import compose_config
from tests.tiny_models import EOS, PAD, prompts, random_qwen2, word_tokenizer


def _assert_same_batches(a, b) -> None:
    assert a.texts == b.texts
    for field in ("input_ids", "attention_mask", "response_mask", "response_lengths", "hit_eos"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.prompt_len == b.prompt_len


def _eos_hit_at_several_steps(model, tok, texts: list[str], new: int) -> int:
    """A token that greedy decoding emits at different steps in different rows: made the EOS,
    rows end at different steps (random weights rarely emit the real one)."""
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new, pad_token_id=PAD, use_cache=True)
    free = model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1]:]
    best, best_steps = -1, 0
    for token in free.unique().tolist():
        rows = (free == token).any(dim=1)
        first = {int((free[r] == token).nonzero()[0]) for r in range(free.shape[0]) if rows[r]}
        if token != PAD and len(first) > best_steps and int(rows.sum()) < free.shape[0]:
            best, best_steps = token, len(first)
    assert best_steps >= 3
    return best


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_continuous_equals_static_batches_on_a_random_qwen2(penalty):
    """13 ragged prompts through 4 slots (slots are reused), rows ending by EOS at different steps
    and by the budget: the same SampleBatch as HF generate's static batches and the static decoder's."""
    model, tok = random_qwen2(seed=1), word_tokenizer()
    texts = prompts(13, seed=3, max_len=12)
    model.generation_config.eos_token_id = _eos_hit_at_several_steps(model, tok, texts, 24)
    runs = {b: sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=24,
                                                                    repetition_penalty=penalty, backend=b), 4)
            for b in ("hf", "static_eager", "continuous")}
    timing = decode.last_timing(model)
    assert timing["batch"] == 4 and timing["requests"] == 13 and timing["prefills"] > 2  # slots refilled
    cont = runs["continuous"]
    assert cont.hit_eos.any() and not cont.hit_eos.all()
    assert len(set(cont.response_lengths[cont.hit_eos].tolist())) >= 3  # EOS at different steps
    _assert_same_batches(runs["hf"], cont)
    _assert_same_batches(runs["static_eager"], cont)


@pytest.mark.parametrize("penalty", [1.0, 1.15])
def test_greedy_continuous_equals_static_batches_on_the_tiny_model(tiny, penalty):
    model, tok = tiny
    questions = ["What is 3+4?", "What is 12+30-7+45?", "What is 99-1?", "What is 5+5+5+5+5+5?", "What is 7-2?",
                 "What is 40+41?", "What is 1+1+1?", "What is 88-9-9+3?", "What is 6+0?", "What is 25+25-10?"]
    texts = [format_prompt(tok, q) for q in questions]
    settings = {b: SamplingSettings(temperature=0.0, max_new_tokens=30, repetition_penalty=penalty, backend=b)
                for b in ("hf", "continuous")}
    ref = sample_responses(model, tok, texts, settings["hf"], batch_size=3)
    got = sample_responses(model, tok, texts, settings["continuous"], batch_size=3)
    assert decode.last_timing(model)["requests"] == 10  # the continuous decoder ran
    assert got.hit_eos.any() and len(set(got.response_lengths.tolist())) >= 3
    _assert_same_batches(ref, got)


def test_sampled_responses_follow_the_seed_not_the_slot():
    """Same seed: same responses, whatever the number of slots; another seed: others. Each request
    has its own noise, so repeats of one prompt differ."""
    model, tok = random_qwen2(seed=2, peaky=1.0), word_tokenizer()
    texts = prompts(7, seed=5) + ["w1 w2 w3"] * 3
    settings = SamplingSettings(temperature=1.0, top_p=0.9, repetition_penalty=1.15, max_new_tokens=16,
                                backend="continuous")
    a = sample_responses(model, tok, texts, settings, batch_size=3, seed=11)
    b = sample_responses(model, tok, texts, settings, batch_size=3, seed=11)
    wide = sample_responses(model, tok, texts, settings, batch_size=10, seed=11)
    other = sample_responses(model, tok, texts, settings, batch_size=3, seed=12)
    _assert_same_batches(a, b)
    _assert_same_batches(a, wide)
    assert a.texts != other.texts
    assert len(set(a.texts[7:])) == 3


def test_row_noise_depends_on_request_and_token_index_only():
    vocab_hash = decode._mix32(torch.arange(50))
    keys = torch.tensor(decode.row_keys(3, [0, 1, 2]))
    counts = torch.tensor([0, 5, 5])
    noise = decode.row_noise(vocab_hash, keys, counts)
    swapped = decode.row_noise(vocab_hash, keys.flip(0), counts.flip(0))
    assert torch.equal(noise, swapped.flip(0))
    assert not torch.equal(noise[1], noise[2])
    assert (noise > 0).all() and abs(float(noise.mean()) - 1.0) < 0.2  # Exp(1)
    # Every (request, token index) has its own noise, seed 0 included (a symmetric hash of the two
    # gave request r at step t request t's noise at step r), and races pick tokens uniformly.
    keys0 = torch.tensor(decode.row_keys(0, range(32)))
    draws = torch.stack([decode.row_noise(vocab_hash, keys0, torch.full((32,), t)) for t in range(32)])
    assert draws.reshape(-1, 50).unique(dim=0).shape[0] == 32 * 32
    counts = torch.bincount(draws.reshape(-1, 50).argmin(-1), minlength=50).float()
    assert float(counts.std() / counts.mean()) < 0.35  # ~0.22 for 1,024 uniform draws over 50 tokens


def test_an_unsupported_model_falls_back_to_static_batches_with_the_reason_logged(caplog):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=130, eos_token_id=EOS,
                                      pad_token_id=PAD)).eval()
    with caplog.at_level(logging.WARNING, logger="em_sweep.generation.sample"):
        assert resolve_backend(gpt2, "continuous") == "hf"
    assert "continuous batching unavailable" in caplog.text and "model_type 'gpt2'" in caplog.text
    tok = word_tokenizer()
    texts = prompts(3)
    got = sample_responses(gpt2, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=6,
                                                              backend="continuous"), 2)
    ref = sample_responses(gpt2, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=6, backend="hf"), 2)
    _assert_same_batches(ref, got)


def test_evaluation_uses_continuous_batching_by_default_with_the_same_greedy_scores(tiny):
    model, tok = tiny
    cfg = compose_config(["eval.benchmarks=[arith]", "eval.limit=7", "eval.batch_size=3",
                          "eval.max_new_tokens=40"])
    validate(cfg)
    assert cfg.eval.generation_backend == "continuous"
    decode.release(model)
    scores, records = evaluate(model, tok, cfg.eval, step=0)
    assert isinstance(decode._DECODERS.get(model), decode.ContinuousDecoder)
    static = compose_config(["eval.benchmarks=[arith]", "eval.limit=7", "eval.batch_size=3",
                             "eval.max_new_tokens=40", "eval.generation_backend=hf"])
    scores_hf, records_hf = evaluate(model, tok, static.eval, step=0)
    assert [r["response"] for r in records] == [r["response"] for r in records_hf]
    assert scores[0]["accuracy"] == scores_hf[0]["accuracy"]


def test_sampled_evaluation_returns_every_sample_in_the_callers_order(tiny):
    model, tok = tiny
    cfg = compose_config(["eval.batch_size=2"])
    texts = [format_prompt(tok, "What is 1+2?"), format_prompt(tok, "What is 30+40+5?")]
    settings = SamplingSettings(temperature=1.0, max_new_tokens=8, backend="continuous")
    out = generate_responses(model, tok, texts, 3, settings, cfg.eval)
    again = generate_responses(model, tok, texts, 3, settings, cfg.eval)
    assert out == again and len(out) == 2 and all(len(row) == 3 for row in out)
    # each (prompt, sample) is request i*n+k of one call: its response is that request's
    one = sample_responses(model, tok, [texts[0]] * 3 + [texts[1]] * 3, settings, 2, seed=cfg.eval.seed)
    assert out[0] + out[1] == one.texts


def test_an_unknown_eval_generation_backend_is_one_clear_line():
    from em_sweep.config import ConfigError

    with pytest.raises(ConfigError, match="eval.generation_backend"):
        validate(compose_config(["eval.generation_backend=fast"]))


def test_per_request_budgets_end_rows_like_an_eos_would():
    """The benchmarks force response lengths with budgets: each row stops at its own, its tokens
    a prefix of the unbounded run's."""
    model, tok = random_qwen2(seed=4), word_tokenizer()
    rows = [tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for t in prompts(6, seed=8)]
    settings = decode.decode_settings(True, 1, 1, 0, 1.0, [], PAD)
    keys = decode.row_keys(0, range(6))
    full = decode.generate_continuous(model, rows, keys, settings, 20, batch=2)
    budgets = [3, 20, 1, 7, 12, 5]
    cut = decode.generate_continuous(model, rows, keys, settings, 20, batch=2, budgets=budgets)
    assert [len(t) for t in full] == [20] * 6 and [len(t) for t in cut] == budgets
    assert all(torch.equal(c, f[:len(c)]) for c, f in zip(cut, full, strict=True))


def test_rl_rollouts_run_with_continuous_batching(tiny):
    """train.generation_backend=continuous serves the RL stage's rollouts: 16 samples of two
    prompts through 4 slots, one GRPO step on them."""
    import copy

    from em_sweep.training.em import make_optimizer
    from em_sweep.training.rl import rl_step

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.batch_size=16", "rl.micro_batch_size=8", "rl.sample_batch_size=4",
                          "rl.max_new_tokens=24", "train.generation_backend=continuous"])
    validate(cfg)
    texts = [format_prompt(tok, "What is 3+4?"), format_prompt(tok, "What is 12+30-7+45?")]
    opt, _ = make_optimizer(model, cfg.rl)
    m = rl_step(model, tok, opt, texts, ["7", "80"], cfg.rl, 1, 1e-3, seed=0,
                generation_backend=cfg.train.generation_backend)
    timing = decode.last_timing(model)
    assert timing["requests"] == 16 and timing["batch"] == 4 and timing["prefills"] >= 4
    assert 0.0 <= m.reward <= 1.0 and m.loss == m.loss  # finite, not NaN
