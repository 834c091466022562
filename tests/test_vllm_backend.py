"""The vLLM adapter: its settings mapping everywhere; real vLLM generation only where vLLM and CUDA are."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from em_sweep.evaluation.evaluate import generate_responses
from em_sweep.generation import vllm_backend  # imports without vLLM: it is loaded lazily
from em_sweep.generation.sample import SamplingSettings
from tests.conftest import compose_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_sampling_kwargs_match_the_hf_settings() -> None:
    sampled = vllm_backend.sampling_kwargs(SamplingSettings(temperature=0.6, top_p=0.95, max_new_tokens=3072), 8, 7)
    assert sampled == {"n": 8, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "repetition_penalty": 1.0,
                       "max_tokens": 3072, "seed": 7, "skip_special_tokens": True}
    greedy = vllm_backend.sampling_kwargs(SamplingSettings(temperature=0.0, top_p=0.95, top_k=20), 1, 7)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["n"]) == (0.0, 1.0, -1, 1)
    assert vllm_backend.sampling_kwargs(SamplingSettings(temperature=1.0, top_k=20), 1, 0)["top_k"] == 20


def test_engine_kwargs() -> None:
    model = vllm_backend.SavedModel("/ckpt/step-10", "bfloat16", trust_remote_code=True)
    assert vllm_backend.engine_kwargs(model, 1234, 0.5) == {
        "model": "/ckpt/step-10", "dtype": "bfloat16", "trust_remote_code": True, "seed": 1234,
        "gpu_memory_utilization": 0.5}


def test_saved_model_resolves_the_path_and_the_dtype_an_hf_load_would_use() -> None:
    from em_sweep.models import ASSETS

    cfg = compose_config(["model.dtype=bfloat16"])
    assert vllm_backend.saved_model(cfg.model) == vllm_backend.SavedModel(str(ASSETS / "tiny-arith"), "bfloat16", False)
    assert vllm_backend.saved_model(compose_config().model).dtype == "float32"  # auto on CPU, as load_model


@pytest.mark.slow
def test_a_vllm_run_never_loads_the_model_into_the_process(tmp_path, monkeypatch) -> None:
    """The run hands vLLM the saved model and loads only the tokenizer: an HF copy would hold GPU
    memory vLLM needs; a packed task's cached HF model is dropped first, and an hf run after it
    shuts the vLLM engine down. vLLM cannot exist here (CUDA only): its generate is replaced by a
    fake that answers every problem with the gold answer, and the installed-check is told it exists."""
    import importlib.util

    from em_sweep import run as run_module
    from em_sweep.evaluation.benchmarks import load_benchmark, resolve_spec
    from em_sweep.models import ModelCache

    cache = ModelCache()
    cache.get(compose_config().model)  # an earlier hf run of the same packed task
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    gold = {p.question: p.answers[0] for p in load_benchmark(resolve_spec("arith"), limit=6)}
    seen = []

    def fake_vllm_generate(model, tokenizer, texts, n, settings, seed):
        seen.append(model)
        vllm_backend._engine = ((model, seed), "fake engine")  # what the real one keeps
        return [[f"The answer is \\boxed{{{next(a for q, a in gold.items() if q in t)}}}."] * n for t in texts]

    def no_hf_load(self, model_cfg):
        raise AssertionError("a vllm run loaded the HF model")

    monkeypatch.setattr(vllm_backend, "generate", fake_vllm_generate)
    monkeypatch.setattr(ModelCache, "get", no_hf_load)
    common = ["train.steps=0", "eval.benchmarks=[arith]", "eval.limit=6", f"paths.root={tmp_path}",
              "logger.mode=disabled"]
    results = run_module.run(compose_config(["eval.backend=vllm", *common]), cache)
    assert [s["accuracy"] for s in results["final_scores"]] == [1.0]
    assert seen and all(isinstance(m, vllm_backend.SavedModel) and m.path.endswith("tiny-arith") for m in seen)
    assert cache._entry is None and vllm_backend._engine is not None
    monkeypatch.undo()  # the real HF load again, for an hf run in the same process
    run_module.run(compose_config(["eval.backend=hf", *common]), cache)
    assert vllm_backend._engine is None and cache._entry is not None


def test_vllm_runs_reject_checkpoint_saving() -> None:
    from em_sweep.config import ConfigError, validate

    with pytest.raises(ConfigError, match="train.save_at_steps"):
        validate(compose_config(["eval.backend=vllm", "train.steps=0", "train.save_at_steps=[0]"]))


def test_token_prompts_tokenize_as_the_hf_path(tiny) -> None:
    _, tokenizer = tiny
    texts = ["What is 1+2?", "Calculate 50+34-52-31."]
    prompts = vllm_backend.token_prompts(tokenizer, texts)
    assert [p["prompt_token_ids"] for p in prompts] == [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM or not torch.cuda.is_available(), reason="needs vLLM and a CUDA GPU")
def test_vllm_greedy_matches_hf_on_the_shipped_model() -> None:
    from em_sweep.models import ModelCache

    cfg = compose_config(["model.device=cuda", "eval.backend=vllm", "train.steps=0", "eval.at_steps=[0]"])
    model, tokenizer = ModelCache().get(cfg.model)
    saved = vllm_backend.saved_model(cfg.model)
    texts = [f"What is {a}+{b}?" for a, b in ((1, 2), (30, 45), (7, 8), (12, 19))]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=32)
    by_vllm = generate_responses(saved, tokenizer, texts, 1, greedy, cfg.eval)
    by_hf = generate_responses(model, tokenizer, texts, 1, greedy, compose_config(["eval.backend=hf"]).eval)
    assert by_vllm == by_hf
    sampled = generate_responses(saved, tokenizer, texts, 3, SamplingSettings(temperature=1.0, max_new_tokens=32),
                                 cfg.eval)
    assert [len(row) for row in sampled] == [3] * len(texts)
