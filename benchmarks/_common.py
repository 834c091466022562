"""Shared by the benchmark scripts: model shapes, random-weight models, a token-id tokenizer,
timing and result output. Runs with only torch and transformers installed (no Hydra)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run from a checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

# Qwen2.5-Math-1.5B / -7B architectures (their config.json), a tiny one for CPU smoke runs and a
# small one (the 1.5B's layer layout scaled down) for CPU comparisons that are not all overhead.
SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=4096),
    "small": dict(hidden_size=384, intermediate_size=2240, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, max_position_embeddings=4096),
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights in the given architecture, built directly on ``device`` in ``dtype``.

    EOS is removed from the generation config: random weights would emit it only by chance, and
    every benchmark forces fixed lengths (stated with the results)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(**SHAPES[shape], rope_theta=10000.0, attn_implementation="sdpa",
                      eos_token_id=None, pad_token_id=0, bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


class IdTokenizer:
    """The slice of the tokenizer interface sample_responses uses, over texts of space-separated
    token ids ("17 503 9"). No EOS token: responses run to their token budget."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, texts: list[str], return_tensors: str = "pt", padding: bool = True,
                 add_special_tokens: bool = False) -> dict[str, torch.Tensor]:
        rows = [[int(t) for t in text.split()] for text in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(t) for t in row if t != 0) for row in ids.tolist()]


def random_prompt(length: int, vocab: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(str(int(t)) for t in torch.randint(100, min(vocab, 5000), (length,), generator=g))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, seconds) with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path``; a bare file name goes under $OUT when that is set."""
    if not path:
        return
    target = Path(path)
    if not target.is_absolute() and os.environ.get("OUT") and target.parent == Path("."):
        target = Path(os.environ["OUT"]) / target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {target}", flush=True)


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


@contextmanager
def counting_shared_passes(outcomes: list[bool]) -> Iterator[None]:
    """Records, per loss micro-batch that tried the shared prompt pass, whether it ran (False:
    this transformers' decoder fell back to the full pass, so a +share_prompt part measures
    nothing new)."""
    from em_sweep.training import loss_pass

    real = loss_pass._shared_prompt_hidden

    def counted(*a: Any) -> Any:
        hidden = real(*a)
        outcomes.append(hidden is not None)
        return hidden

    loss_pass._shared_prompt_hidden = counted
    try:
        yield
    finally:
        loss_pass._shared_prompt_hidden = real
