"""Loading a model and tokenizer (any HF id or local path), and reusing one across packed runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.rundir import ASSETS, PKG_PREFIX, local_model_dir

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be found or loaded; the message says which and why."""


def resolve_model_path(path: str) -> str:
    """Turn ``pkg://<asset>`` into the shipped directory; check local paths exist.

    Hub ids are returned unchanged (from_pretrained finds them in the local HF cache,
    or downloads them when the node is online).
    """
    if path.startswith(PKG_PREFIX):
        local = ASSETS / path[len(PKG_PREFIX):]
        if not (local / "config.json").is_file():
            shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []
            raise ModelLoadError(f"model.path: no shipped model {path!r} (shipped: {shipped})")
        return str(local)
    local = local_model_dir(path)
    if local is not None:
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelLoadError(f"model.path: {path!r} is not a model directory (no config.json there)")
        return local
    _check_hub_id(path)
    return path


def _check_hub_id(repo_id: str) -> None:
    """Fail fast, before any compute, when a hub id can be neither found in the cache nor fetched."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        raise ModelLoadError(f"model.path: {repo_id!r} is not a local model directory and not in the HF cache "
                             "(HF_HUB_OFFLINE is set); download it first or give a local path")
    try:
        hf_hub_download(repo_id, "config.json", etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise ModelLoadError(f"model.path: {repo_id!r} is not a local model directory, not in the HF cache, "
                             f"and could not be fetched from the hub ({type(e).__name__})") from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device: {device!r} requested but CUDA is not available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padded (generation appends on the right) with a pad token set."""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"model.path: cannot load tokenizer {path!r}: {_first_line(e)}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype, device and attention."""
    device = pick_device(model_cfg.device)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(model_cfg.dtype, device),
                              "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_cfg.path), **kwargs)
    except OSError as e:
        raise ModelLoadError(f"model.path: cannot load {model_cfg.path!r}: {_first_line(e)}") from None
    return model.to(device)


def set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Gradient (activation) checkpointing on or off, by this transformers version's name for it
    (``activation_checkpointing_*``; older versions only have ``gradient_checkpointing_*``, newer
    ones keep it as a deprecated alias)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


def checkpointing_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose HF gradient-checkpointing flag is on (empty: no checkpointing)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def free_gpu_memory() -> None:
    """Hand memory of objects just dropped back to the card (gc first: reference cycles hold tensors)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class _Entry:
    key: tuple[Any, ...]
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    snapshot: dict[str, torch.Tensor]


class ModelCache:
    """Keeps one loaded base model; hands it out with its original weights restored.

    Packed runs (several runs in one process) train the same base model in turn;
    restoring from an in-memory copy is much faster than reloading from disk.
    """

    def __init__(self) -> None:
        self._entry: _Entry | None = None

    def get(self, model_cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        key = (model_cfg.path, model_cfg.dtype, model_cfg.device, model_cfg.attn_implementation,
               model_cfg.trust_remote_code)
        if self._entry is not None and self._entry.key == key:
            with torch.no_grad():
                for name, tensor in self._entry.model.state_dict().items():
                    tensor.copy_(self._entry.snapshot[name])
            self._entry.model.zero_grad(set_to_none=True)
            return self._entry.model, self._entry.tokenizer
        self.clear()  # free the previous model before loading the next one
        tokenizer = load_tokenizer(model_cfg.path, model_cfg.trust_remote_code)
        model = load_model(model_cfg)
        snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._entry = _Entry(key, model, tokenizer, snapshot)
        return model, tokenizer

    def clear(self) -> None:
        """Drop the held model (its GPU memory goes back to the allocator's pool and the card)."""
        if self._entry is None:
            return
        from em_sweep import decode  # its cached static decoder holds the model and its KV cache

        decode.release(self._entry.model)
        self._entry = None
        free_gpu_memory()
