"""Optional vLLM generation for evaluation (``eval.backend=vllm``), behind the same interface as HF.

vLLM is never an em-sweep dependency (it pins its own torch and needs CUDA); it is imported only
when this backend runs. It loads weights from a path, so it scores saved models and checkpoints
only: :func:`em_sweep.config.validate` rejects it when the run trains (a stage with steps > 0).
The settings map onto vLLM by pure functions (:func:`engine_kwargs`, :func:`sampling_kwargs`,
:func:`token_prompts`) so the mapping is tested where vLLM is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from em_sweep.generation.sample import SamplingSettings
from em_sweep.models import free_gpu_memory, pick_device, pick_dtype, resolve_model_path

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import ModelConfig

# Share of the GPU memory free at engine start that vLLM may take (vLLM's default is 90% of the
# whole card, whatever else the process holds).
FREE_MEMORY_SHARE = 0.9


@dataclass(frozen=True)
class SavedModel:
    """The model of a run scored by vLLM: weights on disk, loaded by vLLM itself. A vllm run holds
    this instead of an HF copy, whose weights would take the GPU memory vLLM's KV cache needs."""

    path: str
    dtype: str
    trust_remote_code: bool = False


def saved_model(model_cfg: ModelConfig) -> SavedModel:
    """``model.*`` as vLLM takes it: the resolved path and the dtype an HF load would use."""
    dtype = pick_dtype(model_cfg.dtype, pick_device(model_cfg.device))
    return SavedModel(resolve_model_path(model_cfg.path), str(dtype).removeprefix("torch."),
                      bool(model_cfg.trust_remote_code))


_engine: tuple[tuple[SavedModel, int], Any] | None = None


def engine_kwargs(model: SavedModel, seed: int, gpu_memory_utilization: float) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for a saved model (weights and tokenizer from its path)."""
    return {"model": model.path, "dtype": model.dtype, "trust_remote_code": model.trust_remote_code, "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization}


def sampling_kwargs(settings: SamplingSettings, n: int, seed: int) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams`` equivalent to ``settings`` on the HF path, ``n`` samples."""
    greedy = settings.temperature == 0
    return {
        "n": n,
        "temperature": settings.temperature,
        "top_p": 1.0 if greedy else settings.top_p,
        "top_k": settings.top_k if settings.top_k > 0 and not greedy else -1,  # vLLM: -1 = off
        "repetition_penalty": settings.repetition_penalty,
        "max_tokens": settings.max_new_tokens,
        "seed": seed,
        "skip_special_tokens": True,  # as the HF path decodes
    }


def token_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[dict[str, list[int]]]:
    """Already-templated prompt texts as vLLM token prompts, tokenized as the HF path does
    (no added special tokens: the template carries them; vLLM's own tokenization would add a
    second BOS for Llama)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [{"prompt_token_ids": list(row)} for row in ids]


def _llm(model: SavedModel, seed: int) -> Any:
    """One vLLM engine per process, rebuilt only when the model (path, dtype) or seed change."""
    global _engine
    import torch
    import vllm

    key = (model, seed)
    if _engine is None or _engine[0] != key:
        _engine = None  # free the previous engine's memory first
        free, total = torch.cuda.mem_get_info()
        _engine = (key, vllm.LLM(**engine_kwargs(model, seed, FREE_MEMORY_SHARE * free / total)))
    return _engine[1]


def release() -> None:
    """Shut the process's vLLM engine down (a packed run that loads an HF model next needs the memory)."""
    global _engine
    if _engine is None:
        return
    _engine = None
    free_gpu_memory()


def generate(model: SavedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int,
             settings: SamplingSettings, seed: int) -> list[list[str]]:
    """``n`` responses to each prompt text, as ``[prompt][sample]`` (the HF path's structure).

    Prompt i samples with seed ``seed + i``, so its responses do not depend on the batch.
    """
    import vllm

    llm = _llm(model, seed)
    params = [vllm.SamplingParams(**sampling_kwargs(settings, n, seed + i)) for i in range(len(texts))]
    outputs = llm.generate(token_prompts(tokenizer, texts), params, use_tqdm=False)
    return [[completion.text for completion in out.outputs] for out in outputs]
