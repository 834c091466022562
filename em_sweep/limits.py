"""Size limits checked before the weights are loaded: every prompt fits the model's context with
its generation budget, and the run's largest batch fits the device's memory.

The memory rule (docs/input-checks.md): a run needs at least

    weights + training state + reference copy + max(KV cache of the largest generation batch,
                                                    fp32 logits of one entropy chunk)

where weights = parameters x dtype bytes (the safetensors headers give the count); training
state = gradients + AdamW state per parameter (fp32 model 12 bytes; low precision: adamw 14,
adamw_bf16_kahan 8, adamw_bf16_sr 6, adamw_8bit 4; ``auto`` counted as the smallest it may
pick), present when a stage trains, divided over WORLD_SIZE ranks; the reference copy (the
weights again) when rl.kl_coef > 0; the KV cache of a batch = sequences x (its longest prompt +
max_new_tokens) x 2 x layers x KV heads x head dim x dtype bytes, every sequence padded to the
longest (evaluation sorts prompts by length, so its largest batch holds the longest prompts).
Activations are left out: the rule is a lower bound, so a run it rejects cannot fit. The
device's memory: the GPU's total memory on CUDA; on CPU the machine's RAM (or the cgroup's limit).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from em_sweep.config import Config, ConfigError, stage_plan

if TYPE_CHECKING:  # annotations only
    from em_sweep.models import ModelFacts

log = logging.getLogger(__name__)

# Bytes per parameter of gradients + optimizer state, for low-precision models (em_sweep/training/optim.py's table).
_STATE_BYTES = {"adamw": 14, "adamw_bf16_kahan": 8, "adamw_bf16_sr": 6, "adamw_8bit": 4}
_GiB = 2**30


def context_length(config: Any) -> int | None:
    """The model's context in tokens from its config (None where it does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token over all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) // heads)
    layers = getattr(text, "num_hidden_layers", None) or 0
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the run's device: the GPU's, or on CPU the RAM (capped by a cgroup limit)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]] if texts else []


def eval_prompt_lengths(cfg: Config, tokenizer: Any) -> dict[str, list[tuple[str, int]]]:
    """(problem id, prompt tokens) of every problem each eval.benchmarks entry scores."""
    from em_sweep.evaluation.benchmarks import load_benchmark, resolve_spec
    from em_sweep.prompts import format_eval_prompt

    out = {}
    for entry in cfg.eval.benchmarks:
        spec = resolve_spec(entry)
        problems = load_benchmark(spec, limit=cfg.eval.limit)
        texts = [format_eval_prompt(tokenizer, p.question, cfg.eval.template) for p in problems]
        out[spec.name] = list(zip([p.id for p in problems], _token_lengths(tokenizer, texts), strict=True))
    return out


def check_context(cfg: Config, facts: ModelFacts, prompt_ids: list[str], prompt_lengths: list[int],
                  eval_lengths: dict[str, list[tuple[str, int]]]) -> None:
    """Training prompts fit the context with their max_new_tokens; evaluation prompts fit it at all
    (a longer evaluation response than the context leaves is cut there: logged, not refused)."""
    context = context_length(facts.config)
    if context is None:
        return
    where = f"the model's context of {context} tokens (config.json of {facts.path})"
    budgets = [("train.max_new_tokens", cfg.train.max_new_tokens)] if any(
        s == "em" and last >= first for s, first, last in stage_plan(cfg)) else []
    if "rl" in cfg.stages:
        budgets.append(("rl.max_new_tokens", cfg.rl.max_new_tokens))
    if cfg.eval.max_new_tokens >= context:
        raise ConfigError(f"eval.max_new_tokens: {cfg.eval.max_new_tokens} leaves no room for a prompt in {where}")
    for key, budget in budgets:
        for pid, n in zip(prompt_ids, prompt_lengths, strict=True):
            if n + budget > context:
                raise ConfigError(f"{key}: prompt {pid!r} is {n} tokens; with {key}={budget} that is {n + budget}, "
                                  f"over {where}; lower {key} or pick a shorter prompt")
    for name, lengths in eval_lengths.items():
        too_long = [(pid, n) for pid, n in lengths if n >= context]
        if too_long:
            pid, n = max(too_long, key=lambda x: x[1])
            raise ConfigError(f"eval.benchmarks: benchmark {name!r} problem {pid!r} is a {n}-token prompt, over {where} "
                              f"({len(too_long)} such problem(s)); drop them or use a model with a longer context")
        cut = [n for _, n in lengths if n + cfg.eval.max_new_tokens > context]
        if cut:
            log.warning("eval: %d prompt(s) of %s leave fewer than eval.max_new_tokens=%d tokens in %s "
                        "(longest prompt %d tokens): their responses can be cut short", len(cut), name,
                        cfg.eval.max_new_tokens, where, max(cut))


def memory_estimate(cfg: Config, facts: ModelFacts, train_prompt_tokens: int, eval_lengths: dict[str, list[tuple[str, int]]]
                    ) -> tuple[int, dict[str, tuple[str, int]]]:
    """(lower bound in bytes, {term: (the key that sets it, bytes)}) by the rule in the module docstring."""
    elem = torch.empty((), dtype=facts.dtype).element_size()
    n = facts.n_params or 0
    kv = kv_bytes_per_token(facts.config, facts.dtype)
    text = facts.config.get_text_config() if hasattr(facts.config, "get_text_config") else facts.config
    vocab = getattr(text, "vocab_size", 0) or 0
    plan = [(s, last >= first) for s, first, last in stage_plan(cfg)]
    trains = any(t for _, t in plan)
    terms: dict[str, tuple[str, int]] = {"weights": ("model.path", n * elem)}
    if trains:
        opt = cfg.train.optimizer if any(s == "em" and t for s, t in plan) else cfg.rl.optimizer
        if facts.dtype == torch.float32:
            per = 12
        else:
            auto = "adamw_bf16_sr" if facts.dtype == torch.bfloat16 else "adamw"
            per = _STATE_BYTES.get(auto if opt == "auto" else opt, 14)
        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        terms["training state"] = ("train.optimizer", n * per // world)
    if "rl" in cfg.stages and cfg.rl.kl_coef > 0 and cfg.rl.steps > 0:
        terms["reference copy"] = ("rl.kl_coef", n * elem)
    batches = []
    if cfg.eval.backend == "hf":
        for lengths in eval_lengths.values():
            if lengths:
                # Samples per problem: at least eval.n_samples when sampling (a benchmark's repeats may add more).
                samples = cfg.eval.n_samples if any(t > 0 for t in cfg.eval.temperatures) else 1
                seqs = min(cfg.eval.batch_size, len(lengths) * samples)
                longest = max(k for _, k in lengths)
                batches.append(("eval.batch_size", seqs * (longest + cfg.eval.max_new_tokens) * kv))
    for stage, x, key in (("em", cfg.train, "train"), ("rl", cfg.rl, "rl")):
        if (stage, True) in plan:
            seqs = min(x.sample_batch_size, x.batch_size)
            seq_len = train_prompt_tokens + x.max_new_tokens
            batches.append((f"{key}.sample_batch_size", seqs * seq_len * kv))
            chunk = x.loss_chunk_tokens or x.micro_batch_size * seq_len
            batches.append((f"{key}.loss_chunk_tokens", min(chunk, x.micro_batch_size * seq_len) * vocab * 4))
    if batches:
        key, size = max(batches, key=lambda b: b[1])
        terms["largest batch"] = (key, size)
    return sum(b for _, b in terms.values()), terms


def check_memory(cfg: Config, facts: ModelFacts, train_prompt_tokens: int, eval_lengths: dict[str, list[tuple[str, int]]],
                 device_bytes: int | None = None) -> None:
    """ConfigError naming the key of the largest term when the lower bound exceeds the device's memory."""
    if cfg.eval.backend != "hf":
        return  # vLLM sizes its own cache within gpu_memory_utilization
    need, terms = memory_estimate(cfg, facts, train_prompt_tokens, eval_lengths)
    have = device_memory_bytes(facts.device) if device_bytes is None else device_bytes
    if need <= have:
        return
    key = max(terms.values(), key=lambda t: t[1])[0]
    parts = ", ".join(f"{name} {_size(size)} ({k})" for name, (k, size) in terms.items() if size)
    raise ConfigError(f"{key}: the run needs at least {_size(need)} ({parts}) but {facts.device} has "
                      f"{_size(have)}; lower {key} (docs/input-checks.md: the memory rule)")


def _size(n: int) -> str:
    return f"{n / _GiB:.1f} GiB" if n >= _GiB / 10 else f"{n / 2**20:.1f} MiB"


def check_run(cfg: Config, facts: ModelFacts, prompts: list[Any]) -> None:
    """Context and memory limits of a run, from its config, model facts and prompt set."""
    from em_sweep.prompts import format_prompt

    for stage, first, last in stage_plan(cfg):
        key = "train.optimizer" if stage == "em" else "rl.optimizer"
        name = cfg.train.optimizer if stage == "em" else cfg.rl.optimizer
        if last >= first and name.startswith("adamw_bf16") and facts.dtype != torch.bfloat16:
            raise ConfigError(f"{key}: {name} updates bfloat16 weights, but model.dtype={cfg.model.dtype} is "
                              f"{str(facts.dtype).removeprefix('torch.')} on {facts.device}; set model.dtype=bfloat16, "
                              "or optimizer adamw")
    texts = [format_prompt(facts.tokenizer, p.problem, cfg.prompt.system, cfg.prompt.chat_template) for p in prompts]
    lengths = _token_lengths(facts.tokenizer, texts)
    eval_lengths = eval_prompt_lengths(cfg, facts.tokenizer)
    check_context(cfg, facts, [p.id for p in prompts], lengths, eval_lengths)
    check_memory(cfg, facts, max(lengths, default=0), eval_lengths)
