"""The static-cache decoder (em_sweep/generation/decode.py) against HF generate, and the KV-cache guard."""

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from em_sweep.generation import decode
from em_sweep.generation.sample import (
    GenerationWithoutCache,
    SamplingSettings,
    kv_cache_guard,
    resolve_backend,
    sample_responses,
)
from em_sweep.models import set_checkpointing
from tests.tiny_models import EOS, PAD, prompts, random_qwen2, word_tokenizer


def hf_greedy(model, ids, mask, new, eos, penalty=1.0):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD,
                           repetition_penalty=penalty, use_cache=True)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_static_decoding_equals_hf_generate_with_ragged_prompts(penalty):
    model, tok = random_qwen2(), word_tokenizer()
    enc = tok(prompts(5), return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 2  # ragged
    ref = hf_greedy(model, ids, mask, 40, [EOS], penalty)
    got = decode.generate_static(model, ids, mask, decode.decode_settings(True, 1, 1, 0, penalty, [EOS], PAD), 40)
    assert torch.equal(ref, got)


def test_rows_stop_at_their_own_eos_and_width_matches_hf():
    model, tok = random_qwen2(seed=1), word_tokenizer()
    enc = tok(prompts(6, seed=3), return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    free = hf_greedy(model, ids, mask, 30, [])
    eos = int(free[0, 5])  # a token row 0 emits at step 5: make it the EOS
    ref = hf_greedy(model, ids, mask, 30, [eos])
    got = decode.generate_static(model, ids, mask, decode.decode_settings(True, 1, 1, 0, 1.0, [eos], PAD), 30)
    assert torch.equal(ref, got)
    assert (got == eos).any()


def test_processed_scores_equal_hf_logits_processors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (4, 12), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    for top_k, top_p in ((0, 0.95), (7, 1.0), (10, 0.8)):
        s = decode.decode_settings(False, 0.5, top_p, top_k, 1.15, [EOS], PAD)
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.15), TemperatureLogitsWarper(0.5)]
                                 + ([TopKLogitsWarper(top_k)] if top_k else [])
                                 + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
        assert torch.equal(decode.processed_scores(logits, seen, s), hf(input_ids, logits.clone()))


def test_exponential_race_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    s = decode.decode_settings(False, 1.0, 1.0, 0, 1.0, [], PAD)
    torch.manual_seed(0)
    draws = decode.choose_tokens(probs.log().expand(40_000, 5).contiguous(), None, s)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.01)
    assert freq[4] == 0


@pytest.mark.parametrize("top_p, top_k, penalty", [(0.95, 0, 1.15), (0.8, 10, 1.0), (0.5, 0, 1.15), (0.1, 0, 1.0)])
def test_top_p_draws_follow_hf_renormalised_nucleus(top_p, top_k, penalty):
    """The race-candidate top-p (and the sort it falls back to for small top_p) samples HF's
    distribution: processors' scores after top-p, softmaxed; removed tokens never drawn."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 30, generator=g) * 1.5
    seen = torch.zeros(1, 30, dtype=torch.bool)
    seen[0, :5] = True
    s = decode.decode_settings(False, 0.7, top_p, top_k, penalty, [], PAD)
    target = decode.processed_scores(logits, seen, s).softmax(-1)[0]  # HF's processors incl. its top-p
    torch.manual_seed(0)
    n = 60_000
    draws = decode.choose_tokens(logits.expand(n, 30).contiguous(), seen.expand(n, 30).contiguous(), s)
    freq = torch.bincount(draws, minlength=30).float() / n
    assert torch.all(freq[target == 0] == 0)
    assert float((freq - target).abs().max()) < 0.01
    assert (target > 0).sum() < 30  # the cut removed something


def test_race_candidates_bound_the_miss_probability_or_fall_back_to_the_sort():
    assert decode.race_candidates(1.0, 1000) == 1
    for top_p in (0.95, 0.9, 0.5):
        c = decode.race_candidates(top_p, 152_000)
        assert 0 < c <= decode.MAX_RACE_CANDIDATES and (1 - top_p) ** c <= decode.NUCLEUS_MISS
    assert decode.race_candidates(0.95, 152_000) == 10
    assert decode.race_candidates(0.1, 152_000) == 0  # would need 263: exact sort instead
    assert decode.race_candidates(0.5, 8) == 8


def test_sample_responses_backends_agree_on_greedy_and_masks():
    model, tok = random_qwen2(seed=2), word_tokenizer()
    texts = prompts(5, seed=4)
    out = {b: sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=20,
                                                                    repetition_penalty=1.15, backend=b), 3)
           for b in ("hf", "static_eager", "static")}  # "static" has no graphs on CPU: eager too
    for b in ("static_eager", "static"):
        assert out[b].texts == out["hf"].texts
        assert torch.equal(out[b].response_mask, out["hf"].response_mask)
        assert torch.equal(out[b].input_ids, out["hf"].input_ids)


def test_sampling_with_the_static_decoder_is_seeded():
    model, tok = random_qwen2(seed=2, peaky=1.0), word_tokenizer()
    settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=15, backend="static_eager")
    a = sample_responses(model, tok, prompts(4), settings, 4, seed=1)
    b = sample_responses(model, tok, prompts(4), settings, 4, seed=1)
    c = sample_responses(model, tok, prompts(4), settings, 4, seed=2)
    assert a.texts == b.texts and a.texts != c.texts


def test_auto_backend_is_hf_on_cpu_and_for_unsupported_models():
    assert resolve_backend(random_qwen2(), "auto") == "hf"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert decode.unsupported_reason(gpt2) is not None
    assert decode.unsupported_reason(random_qwen2()) is None
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(gpt2, "fast")


def test_sampling_keeps_its_kv_cache_under_gradient_checkpointing_in_train_mode():
    """HF drops the cache in train mode with gradient checkpointing; sample_responses must not."""
    model, tok = random_qwen2(), word_tokenizer()
    set_checkpointing(model, True)
    model.train()
    batch = sample_responses(model, tok, prompts(3), SamplingSettings(temperature=0.0, max_new_tokens=12,
                                                                      backend="hf"), 3)
    assert batch.response_lengths.max() == 12
    assert model.training  # restored


def test_the_guard_fails_fast_when_generate_runs_without_cache():
    model, tok = random_qwen2(), word_tokenizer()
    enc = tok(prompts(2), return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=PAD, use_cache=False)
    with pytest.raises(GenerationWithoutCache, match="without its KV cache"), kv_cache_guard(model):
        model.generate(**enc, generation_config=cfg)
    with kv_cache_guard(model):  # with the cache: silent
        model.generate(**enc, generation_config=GenerationConfig(do_sample=False, max_new_tokens=8,
                                                                  pad_token_id=PAD, use_cache=True))


def test_prefill_in_row_chunks_gives_the_same_tokens(monkeypatch):
    monkeypatch.setattr(decode, "PREFILL_TOKENS", 10)  # one or two rows per prefill chunk
    model, tok = random_qwen2(), word_tokenizer()
    enc = tok(prompts(5), return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = hf_greedy(model, ids, mask, 20, [EOS], 1.3)
    got = decode.generate_static(model, ids, mask, decode.decode_settings(True, 1, 1, 0, 1.3, [EOS], PAD), 20)
    assert torch.equal(ref, got)
    assert decode.last_timing(model)["decode_steps"] == 19


def test_auto_falls_back_to_hf_generate_when_the_static_decoder_fails(monkeypatch):
    import em_sweep.generation.sample as sample

    model, tok = random_qwen2(seed=5), word_tokenizer()
    texts = prompts(3, seed=6)
    ref = sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=10, backend="hf"), 3)

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sample.decode, "generate_static", broken)
    monkeypatch.setattr(sample.decode, "unsupported_reason", lambda m: None)
    monkeypatch.setattr(sample, "resolve_backend", lambda m, b: "static" if b == "auto" else b)
    got = sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=10), 3)
    assert got.texts == ref.texts
    with pytest.raises(RuntimeError, match="capturing"):  # an explicit choice does not fall back
        sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=10, backend="static"), 3)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_other_supported_architectures_decode_like_hf(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls, cfg_cls = {"qwen3": (Qwen3ForCausalLM, Qwen3Config), "llama": (LlamaForCausalLM, LlamaConfig)}[arch]
    torch.manual_seed(0)
    model = cls(cfg_cls(vocab_size=123, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        eos_token_id=EOS, pad_token_id=PAD)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    assert decode.unsupported_reason(model) is None
    enc = word_tokenizer()(prompts(4, seed=9), return_tensors="pt", padding=True, add_special_tokens=False)
    ref = hf_greedy(model, enc["input_ids"], enc["attention_mask"], 16, [EOS])
    got = decode.generate_static(model, enc["input_ids"], enc["attention_mask"],
                                 decode.decode_settings(True, 1, 1, 0, 1.0, [EOS], PAD), 16)
    assert torch.equal(ref, got)


@pytest.mark.slow
def test_compiled_layer_step_decodes_like_hf_and_is_seeded():
    """backend static_compile: one torch.compile'd layer function serves every layer."""
    model, tok = random_qwen2(), word_tokenizer()
    enc = tok(prompts(4, seed=2), return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = hf_greedy(model, ids, mask, 20, [EOS], 1.3)
    got = decode.generate_static(model, ids, mask, decode.decode_settings(True, 1, 1, 0, 1.3, [EOS], PAD), 20,
                                 compile_step=True)
    assert torch.equal(ref, got)
    assert decode._DECODERS[model]._layer_fn is not None  # the functional layer path, not the modules
    sampled = decode.decode_settings(False, 0.7, 0.9, 0, 1.15, [EOS], PAD)
    torch.manual_seed(1)
    a = decode.generate_static(model, ids, mask, sampled, 20, compile_step=True)
    torch.manual_seed(1)
    assert torch.equal(a, decode.generate_static(model, ids, mask, sampled, 20, compile_step=True))


def test_clearing_the_model_cache_frees_a_model_its_static_decoder_held():
    """The static decoder's cache (keyed weakly by model) holds the model; ModelCache.clear must
    release it, or a packed task's next model (or vLLM) finds the memory still taken."""
    import gc
    import weakref

    from em_sweep.models import ModelCache
    from tests.conftest import compose_config

    cache = ModelCache()
    model, tok = cache.get(compose_config().model)
    sample_responses(model, tok, ["What is 1+2?"] * 2, SamplingSettings(temperature=1.0, max_new_tokens=4,
                                                                          backend="static_eager"), 2, seed=0)
    assert len(decode._DECODERS) >= 1
    alive = weakref.ref(model)
    del model
    cache.clear()
    gc.collect()
    assert alive() is None


def test_a_model_nothing_else_holds_is_freed_with_its_static_decoder(tiny):
    import copy
    import gc
    import weakref

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    sample_responses(model, tok, ["What is 1+2?"] * 2, SamplingSettings(temperature=1.0, max_new_tokens=4,
                                                                          backend="static_eager"), 2, seed=0)
    alive = weakref.ref(model)
    n = len(decode._DECODERS)
    del model
    gc.collect()
    assert alive() is None and len(decode._DECODERS) == n - 1
