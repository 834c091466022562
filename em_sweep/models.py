"""Loading a model and tokenizer (any HF id or local path), and reusing one across packed runs."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from em_sweep.rundir import ASSETS, PKG_PREFIX, local_model_dir

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import ModelConfig

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


def load_model(model_cfg: ModelConfig) -> PreTrainedModel:
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

    def get(self, model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
        from em_sweep.generation import decode  # its cached static decoder holds the model and its KV cache

        decode.release(self._entry.model)
        self._entry = None
        free_gpu_memory()


# ---------------------------------------------------------------- checks before the weights are loaded

# Files one of which a tokenizer directory holds (fast tokenizers, sentencepiece, BPE, WordPiece);
# without them transformers builds an empty tokenizer silently.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# A safetensors header larger than this is not a header (the format caps it at 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class ModelFacts:
    """What a run knows about its model before loading the weights (:func:`check_model`)."""

    path: str  # local directory, or hub id
    config: Any  # the transformers PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    n_params: int | None  # from the safetensors headers; None where unknown (not downloaded, .bin)


def check_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a run will use, if this machine has them; ModelLoadError otherwise."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible (CUDA_VISIBLE_DEVICES?)"
            raise ModelLoadError(f"model.device: {device!r} requested but CUDA is not available here ({build}); "
                                 "use model.device=cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"model.device: {device!r} but this machine has {torch.cuda.device_count()} "
                                 f"GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    resolved = pick_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    torch_dtype = pick_dtype(dtype, resolved)
    if torch_dtype == torch.bfloat16 and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(resolved)
        raise ModelLoadError(f"model.dtype: {dtype} means bfloat16 on {resolved}, which this GPU ({name}) does not "
                             "support; set model.dtype=float16 or float32")
    return resolved, torch_dtype


def check_attention(attn_implementation: str | None, device: torch.device) -> None:
    """An attention implementation this transformers version knows and the device can run."""
    if not attn_implementation:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    # transformers also loads hub kernels by repo id ("org/kernel"); those it checks itself.
    if attn_implementation not in known and "/" not in attn_implementation:
        raise ModelLoadError(f"model.attn_implementation: unknown {attn_implementation!r}; choose from {known} "
                             "(or null for transformers' choice)")
    if attn_implementation.startswith("flash_attention") and device.type != "cuda":
        raise ModelLoadError(f"model.attn_implementation: {attn_implementation} runs on CUDA only, but the run's "
                             f"device is {device}; use sdpa (or null)")


def safetensors_numel(path: Path) -> int:
    """Parameters in one safetensors file, after checking its header and that the file holds all
    the data the header describes (a truncated or corrupt file fails here, not in from_pretrained)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelLoadError(f"model.path: {path} is not a valid safetensors file (corrupt or truncated header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"model.path: {path} is not a valid safetensors file (unreadable header)") from None
    tensors = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    try:
        end = max((int(t["data_offsets"][1]) for t in tensors), default=0)  # type: ignore[union-attr]
        numel = sum(math.prod(int(d) for d in t["shape"]) for t in tensors)  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelLoadError(f"model.path: {path} is not a valid safetensors file (malformed header)") from None
    if size != 8 + n + end:
        raise ModelLoadError(f"model.path: {path} is truncated or corrupt: its header describes {8 + n + end} bytes, "
                             f"the file has {size}")
    return numel


def check_weights(directory: Path) -> int | None:
    """The parameter count of a local model directory's weights (None for .bin weights), after
    checking that every weight file the directory names is there and whole."""
    index = next((directory / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (directory / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"model.path: {index} is not a valid weight index (no weight_map)") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ModelLoadError(f"model.path: {index.name} names weight files missing from {directory}: {missing[:3]}")
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif (directory / "pytorch_model.bin").is_file():
        shards = ["pytorch_model.bin"]
    else:
        raise ModelLoadError(f"model.path: no weights in {directory} (model.safetensors, its sharded index, or "
                             "pytorch_model.bin)")
    total: int | None = 0
    for shard in shards:
        if shard.endswith(".safetensors"):
            total = None if total is None else total + safetensors_numel(directory / shard)
        else:
            import zipfile

            if not zipfile.is_zipfile(directory / shard):  # torch.save's format: a zip with its directory at the end
                raise ModelLoadError(f"model.path: {directory / shard} is truncated or not a torch checkpoint")
            total = None
    return total


def _local_snapshot(path: str) -> Path | None:
    """The directory of a local model or of a hub model's cached snapshot (None: not downloaded)."""
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def check_model(model_cfg: ModelConfig) -> ModelFacts:
    """Everything about the model checkable without loading its weights: the device and dtype on
    this machine, the attention implementation, config.json, the tokenizer's files (and that its
    ids fit the embedding), and the weight files. Raises ModelLoadError (one line)."""
    device, dtype = check_device(model_cfg.device, model_cfg.dtype)
    check_attention(model_cfg.attn_implementation, device)
    path = resolve_model_path(model_cfg.path)
    local = _local_snapshot(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model.path: cannot read the model's config.json ({model_cfg.path!r}): "
                             f"{_first_line(e)}") from None
    if local is not None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model.path: no tokenizer in {local} (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = load_tokenizer(path, model_cfg.trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ModelLoadError is a ValueError too
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"model.path: cannot load the tokenizer of {model_cfg.path!r}: {_first_line(e)}") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelLoadError(f"model.path: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                             f"{vocab} (config.json vocab_size): tokenizer and weights do not belong together")
    # A local directory must hold its weights; a hub snapshot may not have downloaded them yet.
    downloaded = local is not None and (os.path.isdir(path) or any(local.glob("*.safetensors*"))
                                        or any(local.glob("*.bin*")))
    n_params = check_weights(local) if downloaded else None  # type: ignore[arg-type]
    return ModelFacts(path, config, tokenizer, device, dtype, n_params)
