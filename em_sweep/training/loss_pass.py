"""The loss pass's forward: a micro-batch's outputs at its scored positions, and the speed
machinery behind it.

:func:`response_outputs` is the forward em.py and rl.py call, and :func:`compiled_layers` the
context they run it in (run.py lists the layers once per model with :func:`decoder_layers`). Behind
them, three ways to compute
the same numbers faster, none of which changes a result (the tests compare each with the plain
pass): decoder layers run as torch.compile'd code (:func:`compiled_layers`,
``train.compile_loss``), a one-shot micro-batch's shared prompt computed once and its keys/values
repeated for the rows (``train.share_prompt_pass``), and per-layer checkpointing of that shared
pass where HF's own checkpointing would drop the cache.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint
from transformers import PreTrainedModel

from em_sweep.generation.decode import SUPPORTED_MODEL_TYPES
from em_sweep.generation.sample import SampleBatch, position_ids_for
from em_sweep.models import checkpointing_modules

# Architectures whose logits are exactly lm_head(final hidden state): the loss can be computed
# from hidden states in chunks without ever building the full [batch, seq, vocab] logits.
HIDDEN_STATE_LOSS_MODELS = frozenset(SUPPORTED_MODEL_TYPES)  # the decoder em_sweep.generation.decode implements


_compiled_module_call: Callable[..., Any] | None = None


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder's list of layers (``model.get_decoder().layers``); a clear error where there is none."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"train.compile_loss: {type(model).__name__} has no decoder `layers` list to compile; "
                         "set train.compile_loss=false")
    return list(layers)


# Variants one run can meet in the compiled loss pass: sequence lengths (dynamic from the first
# compile), an attention mask or none (padding or not), grad or no-grad (RL's ratio pass),
# checkpointing, another model in a packed task. Dynamo's default of 8 compiled entries per code
# object would send later calls back to eager without a word.
COMPILED_LOSS_RECOMPILE_LIMIT = 64


@contextmanager
def _layer_calls_through(layers: list[torch.nn.Module], wrapper: Callable[..., Any]) -> Iterator[None]:
    """While active, a call of each layer runs ``wrapper(layer, previous, *args, **kwargs)``,
    ``previous`` being the call it replaces (None: the module's own ``_call_impl``); afterwards
    the layers call as before. Nothing is left on the model, so a deep copy stays independent."""
    before = [layer._compiled_call_impl for layer in layers]
    for layer, previous in zip(layers, before, strict=True):
        layer._compiled_call_impl = functools.partial(wrapper, layer, previous)
    try:
        yield
    finally:
        for layer, previous in zip(layers, before, strict=True):
            layer._compiled_call_impl = previous


def _compiled_unless_cached(layer: torch.nn.Module, previous: Callable[..., Any] | None, *args: Any,
                            **kwargs: Any) -> Any:
    """The compiled layer, except for calls with a KV cache (the shared prompt pass): Dynamo
    specializes those on the layer's index, one graph per layer and call, past any recompile
    limit, so they run eager."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return (previous or layer._call_impl)(*args, **kwargs)
    assert _compiled_module_call is not None
    return _compiled_module_call(layer, *args, **kwargs)


@contextmanager
def compiled_layers(model: PreTrainedModel, enabled: bool = True) -> Iterator[None]:
    """While active, every decoder layer runs as torch.compile'd code, with its backward (the loss
    pass's norms, rotary embedding, activations and residual adds fused); outside it the layers are
    eager again, so sampling, evaluation and saving are untouched.

    One compiled function (``nn.Module._call_impl``, dynamic shapes) serves all layers: their
    weights are graph inputs, so the identical layers share a graph; new graphs come only with a
    new variant of the call (mask or none, grad mode, another model), each compiled once per
    process. Calls with a KV cache (``share_prompt_pass``'s micro-batches) stay eager. Nothing
    compiled is stored on the model, so a deep copy stays independent.
    """
    if not enabled:
        yield
        return
    global _compiled_module_call
    if _compiled_module_call is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   COMPILED_LOSS_RECOMPILE_LIMIT)
        _compiled_module_call = torch.compile(torch.nn.Module._call_impl, dynamic=True)
    with _layer_calls_through(decoder_layers(model), _compiled_unless_cached):
        yield


def _shares_prompt(ids: torch.Tensor, attn: torch.Tensor, first: int) -> bool:
    """Whether the rows' prompt columns can run once for all rows: identical prompts (one-shot EM)
    and a prompt of at least one token before the last."""
    if first < 1 or ids.shape[0] < 2:
        return False
    return bool((ids[:, :first] == ids[:1, :first]).all() and (attn[:, :first] == attn[:1, :first]).all())


def _read_only(cache: Any) -> bool:
    """Make ``cache`` hand out each layer's stored keys/values joined to the call's own without
    storing them (what its ``update`` returns on a first call), so a layer recomputed in backward
    under checkpointing sees exactly what it saw in forward. False where the cache does not keep
    per-layer ``keys``/``values`` (the caller runs the full pass)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None
                         for layer in layers):
        return False

    def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    cache.update = update
    return True


@contextmanager
def _hf_checkpointing_off(modules: list[torch.nn.Module]) -> Iterator[None]:
    """HF's gradient-checkpointing flag off on ``modules`` while active (HF layers drop a KV cache
    under it), back as it was afterwards."""
    before = [m.gradient_checkpointing for m in modules]
    for m in modules:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.gradient_checkpointing = flag


def _call_without_hf_checkpointing(layer: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with _hf_checkpointing_off([layer]):
        return fn(*args, **kwargs)


def _checkpointed_layer_call(layer: torch.nn.Module, previous: Callable[..., Any] | None, *args: Any,
                             **kwargs: Any) -> Any:
    """One decoder layer call of the shared pass, checkpointed here instead of by HF; the
    recomputation in backward runs with HF's flag off too."""
    fn = previous if previous is not None else layer._call_impl
    if not torch.is_grad_enabled():
        return _call_without_hf_checkpointing(layer, fn, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(_call_without_hf_checkpointing, layer, fn, *args, use_reentrant=False,
                                             **kwargs)


def _shared_prompt_hidden(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                          first: int) -> torch.Tensor | None:
    """Final hidden states [rows, columns from ``first`` on] with the prompt columns before
    ``first`` computed once for one row, their keys/values repeated for every row (with autograd:
    the repeat's backward sums the rows' gradients, so the gradient is the unshared pass's).

    Under gradient checkpointing the prompt pass (one row) keeps its activations and each layer
    of the rows' pass is checkpointed here: HF's own checkpointing would drop the cache.
    None where the decoder takes no cache argument this way (the caller runs the full pass)."""
    decoder = model.get_decoder()
    params = inspect.signature(decoder.forward).parameters
    key = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if key is None:
        return None
    flagged = checkpointing_modules(model)
    with _hf_checkpointing_off(flagged):
        prefix = decoder(input_ids=ids[:1, :first], attention_mask=attn[:1, :first], position_ids=pos[:1, :first],
                         use_cache=True)
    cache = getattr(prefix, "cache", None)
    cache = getattr(prefix, "past_key_values", None) if cache is None else cache
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(ids.shape[0])
    if not _read_only(cache):
        return None
    checkpointed = _layer_calls_through(decoder_layers(model), _checkpointed_layer_call) if flagged else nullcontext()
    with _hf_checkpointing_off(flagged), checkpointed:
        return decoder(input_ids=ids[:, first:], attention_mask=attn, position_ids=pos[:, first:], use_cache=True,
                       **{key: cache}).last_hidden_state


def response_outputs(model: PreTrainedModel, batch: SampleBatch, rows: slice,
                     share_prompt: bool = False, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """One forward of ``rows`` and its outputs at the scored positions (``positions`` [B, S], by
    default the response mask: the positions that produced generated tokens), in row-major order:
    final hidden states [n, H] (True: apply the output head, chunked) for architectures whose
    logits are lm_head(hidden), else logits [n, V] (False).

    ``share_prompt``: where all rows have the same prompt (one-shot EM), its columns run once for
    the micro-batch instead of once per row (``train.share_prompt_pass``); same result and gradient.
    """
    ids, attn = batch.input_ids[rows], batch.attention_mask[rows]
    scored = batch.response_mask[rows] if positions is None else positions[rows]
    # Only columns from the first scored one on (the last prompt position) carry the loss; skip the prompt's logits.
    first = batch.prompt_len - 1
    if positions is not None and bool(scored[:, :first].any()):
        first = int(scored.any(0).nonzero()[0])
    mask = scored[:, first:].bool()
    if model.config.model_type in HIDDEN_STATE_LOSS_MODELS:
        pos = position_ids_for(attn)
        hidden = None
        if share_prompt and _shares_prompt(ids, attn, first):
            hidden = _shared_prompt_hidden(model, ids, attn, pos, first)
        if hidden is None:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos,
                                         use_cache=False).last_hidden_state[:, first:]
        return hidden[mask], True
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_for(attn),
                   use_cache=False).logits[:, first:]
    return logits[mask], False
