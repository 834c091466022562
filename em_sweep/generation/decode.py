"""Batched decoding with a static KV cache, each decoding step replayed as one CUDA graph.

Why: HF ``generate`` runs one eager forward per token; at batch 64 the ~1,200 small kernel
launches of a 28-layer model cost more CPU time (~10 ms) than the GPU needs to read the
weights (1 ms for 1.5B, 5 ms for 7B), so sampling is launch-bound. Here the KV cache has a
fixed shape, every per-step tensor lives in a fixed buffer, and the whole step (forward,
sampling, bookkeeping) is captured once as a CUDA graph and replayed: the Python loop only
calls ``replay()`` and checks for EOS every few steps.

What it computes is HF generate's sampling, for the settings of
:class:`em_sweep.generation.sample.SamplingSettings` and nothing else (no hidden defaults from the
model's generation_config): repetition penalty over prompt and generated tokens, then
temperature, top-k, top-p (HF's processors, same order and semantics), then a draw from
the remaining distribution, or argmax when greedy. Finished rows emit the pad token. The
draw uses the exponential-race form (argmax of p / Exp(1) noise, an exact sample of p that
a graph can capture) instead of ``torch.multinomial``, so a seed gives other samples than
HF's. Greedy decoding matches HF token for token in fp32 (tests/test_sample.py).

The forward is the model's own modules (embeddings, projections, MLP, rotary tables; RMSNorms
through ``torch.nn.functional.rms_norm`` with their weights) wired through a static cache; it supports decoder-only Qwen2/Qwen3/Llama/Mistral
models with full attention (:func:`unsupported_reason` says why not otherwise; the caller
then uses HF generate). Attention over the cache is bucketed (keys up to 256, 512, 1024,
... columns), one graph per bucket, so a step reads only about the part of the cache in use.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# Rope variants whose tables do not depend on the sequence length seen so far.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ALIGN = 128  # cache length and attention buckets are multiples of this (kernel alignment, reuse)
FIRST_BUCKET = 256
CHECK_EVERY = 16  # decoding steps between host checks for "all rows finished"
PREFILL_TOKENS = 16384  # prompt tokens per prefill chunk
# RMSNorm classes computing weight * x * rsqrt(mean(x^2) + eps) (not Gemma's 1 + weight).
# Top-p by racing candidates (choose_tokens): allowed chance, per token, that no candidate lies in
# the nucleus, and the most candidates checked before the exact sort is used instead.
NUCLEUS_MISS = 1e-12
MAX_RACE_CANDIDATES = 64
STANDARD_RMSNORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")


@dataclass(frozen=True)
class DecodeSettings:
    """The sampling settings a captured graph bakes in (part of its cache key)."""

    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    eos_ids: tuple[int, ...]
    pad_id: int


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when :func:`generate_static` can run this model, else why not (one line)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window attention layers"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, n) for n in needed):
        return "decoder layout is not embed_tokens/layers/norm/rotary_emb"
    rope_type = getattr(decoder.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length"
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "attention layout is not q/k/v/o projections"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "decoder layer layout differs from Llama's"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "parameters are sharded (FSDP); unshard the model first"
    return None


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def attention_buckets(cache_len: int) -> list[int]:
    """Key lengths of the per-bucket graphs: 256, 512, 1024, ... below ``cache_len``, then it."""
    buckets, b = [], FIRST_BUCKET
    while b < cache_len:
        buckets.append(b)
        b *= 2
    return buckets + [cache_len]


def processed_scores(logits: torch.Tensor, seen: torch.Tensor | None, s: DecodeSettings,
                     top_p: bool = True) -> torch.Tensor:
    """HF's processors on fp32 logits [B, V]: repetition penalty, then (sampling only)
    temperature, top-k, top-p; filtered tokens get -inf.

    ``seen`` [B, V] bool marks tokens already in each row (prompt and generated),
    for the repetition penalty; None when the penalty is off. ``top_p=False`` skips the top-p
    cut (:func:`choose_tokens` applies it its own way).
    """
    if seen is not None and s.repetition_penalty != 1.0:
        penalized = torch.where(logits < 0, logits * s.repetition_penalty, logits / s.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if s.greedy:
        return logits
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        remove_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    return logits


def race_candidates(top_p: float, vocab: int) -> int:
    """How many of the race's leading tokens :func:`choose_tokens` checks against the top-p
    nucleus: the race orders tokens as draws without replacement, so all C leaders fall
    outside the nucleus (mass <= 1 - top_p) with probability <= (1 - top_p) ** C, kept below
    NUCLEUS_MISS. 0 = too many (small top_p): the exact sort is used instead."""
    if top_p >= 1.0:
        return 1
    c = math.ceil(math.log(NUCLEUS_MISS) / math.log(1.0 - top_p)) if top_p < 1.0 - 1e-12 else 1
    c = max(1, min(c, vocab))
    return c if c <= MAX_RACE_CANDIDATES else 0


def choose_tokens(logits: torch.Tensor, seen: torch.Tensor | None, s: DecodeSettings,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens [B] from fp32 logits [B, V]: argmax when greedy, else a draw from the
    processed distribution.

    The draw is an exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
    probability p_i, and unlike torch.multinomial it is plain kernels a CUDA graph can capture.
    Top-p without sorting the vocabulary (a sort + cumsum over 152k tokens cost 1.6 ms of a
    1.5B model's ~5 ms decoding step on an H100): HF keeps token i when the probability mass
    of tokens below it plus its own exceeds 1 - top_p. The race's C leaders are checked that
    way (one masked sum each) and the first kept one is the draw: the race restricted to the
    nucleus, i.e. an exact sample of HF's renormalised top-p distribution (tie order among
    equal probabilities aside). If none of the C leaders is kept (probability below
    NUCLEUS_MISS by the choice of C), the most likely token is taken.

    ``noise``: the Exp(1) draws [B, V] to race with (:func:`row_noise`); None draws them from
    torch's generator.
    """
    c = race_candidates(s.top_p, logits.shape[-1]) if not s.greedy else 1
    scores = processed_scores(logits, seen, s, top_p=c == 0)
    if s.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    race = probs / (torch.empty_like(probs).exponential_() if noise is None else noise)
    if s.top_p >= 1.0 or c == 0:
        return race.argmax(dim=-1)
    leaders = race.topk(c, dim=-1).indices  # [B, C], race order
    p_lead = probs.gather(1, leaders)
    below = torch.stack([torch.where(probs < p_lead[:, j:j + 1], probs, 0.0).sum(-1) for j in range(c)], dim=1)
    kept = below + p_lead > 1.0 - s.top_p
    first = kept.int().argmax(dim=1, keepdim=True)  # first kept leader (argmax returns the first max)
    token = leaders.gather(1, first).squeeze(1)
    return torch.where(kept.any(dim=1), token, probs.argmax(dim=-1))


class _Clock:
    """Marks on the device's timeline (CUDA events: no synchronisation while decoding)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm, through torch's rms_norm (one fused kernel on CUDA instead of ~7)
    for the standard form ``weight * x / rms(x)``; any other norm module runs as it is. fp32
    results are identical to HF's module; bf16 ones can differ in the last bit."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None or type(module).__name__ not in STANDARD_RMSNORMS:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _decode_layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, col: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, w: dict[str, torch.Tensor | None], eps: float,
                  scaling: float, n_heads: int, n_kv: int, head_dim: int, kv_len: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer for one new token, as a pure function of tensors: compiled once, it
    serves every layer (their weights are arguments), so compilation costs one layer, not 28.
    ``col``: the cache column written, one for all rows ([1]) or, with ``rows`` (arange(B)), one
    per row ([B], continuous batching)."""
    b = h.shape[0]
    x = F.rms_norm(h, (h.shape[-1],), w["ln1"], eps)
    q = F.linear(x, w["q"], w["q_b"]).view(b, 1, n_heads, head_dim)
    k = F.linear(x, w["k"], w["k_b"]).view(b, 1, n_kv, head_dim)
    if w["q_norm"] is not None:  # Qwen3
        q = F.rms_norm(q, (head_dim,), w["q_norm"], eps)
        k = F.rms_norm(k, (head_dim,), w["k_norm"], eps)
    q = _rotate(q.transpose(1, 2), cos, sin)
    k = _rotate(k.transpose(1, 2), cos, sin)
    v = F.linear(x, w["v"], w["v_b"]).view(b, 1, n_kv, head_dim).transpose(1, 2)
    if rows is None:
        k_cache.index_copy_(2, col, k)
        v_cache.index_copy_(2, col, v)
    else:
        k_cache[rows, :, col] = k[:, :, 0]
        v_cache[rows, :, col] = v[:, :, 0]
    qg = q.reshape(b, n_kv, n_heads // n_kv, head_dim)
    o = F.scaled_dot_product_attention(qg, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=bias,
                                       scale=scaling)
    h = h + F.linear(o.reshape(b, n_heads, 1, head_dim).transpose(1, 2).reshape(b, 1, -1), w["o"], w["o_b"])
    x = F.rms_norm(h, (h.shape[-1],), w["ln2"], eps)
    gate = F.silu(F.linear(x, w["gate"], w["gate_b"]))
    return h + F.linear(gate * F.linear(x, w["up"], w["up_b"]), w["down"], w["down_b"])


def _layer_weights(layer: torch.nn.Module) -> tuple[dict[str, torch.Tensor | None], float] | None:
    """The tensors _decode_layer needs from an HF layer, and its norm epsilon; None when the
    layer is not of that form (other norms or activation): the step then runs the modules."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm] + (
        [attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else [])
    if any(type(n).__name__ not in STANDARD_RMSNORMS for n in norms):
        return None
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = getattr(mlp, "act_fn", None)
    if type(act).__name__ not in ("SiLU", "SiLUActivation") and act is not F.silu:
        return None
    eps = {n.variance_epsilon for n in norms}
    if len(eps) != 1:
        return None
    w = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
         "q_norm": attn.q_norm.weight if hasattr(attn, "q_norm") else None,
         "k_norm": attn.k_norm.weight if hasattr(attn, "k_norm") else None}
    for key, mod in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                     ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
        w[key], w[key + "_b"] = mod.weight, mod.bias
    return w, eps.pop()


class StaticDecoder:
    """Static buffers (cache, masks, token state) and captured step graphs for one shape.

    One instance serves every batch with the same (batch, cache length, dtype, device,
    settings): EM steps reuse it, so graphs are captured once per run. Parameters are read
    in place, so optimizer updates between calls are seen.
    """

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, settings: DecodeSettings,
                 use_graphs: bool, compile_step: bool = False) -> None:
        # No reference to the model itself: _DECODERS is keyed weakly by it, and a value holding
        # its key would keep model, weights and KV cache alive for the process's life.
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.batch, self.cache_len, self.settings = batch, cache_len, settings
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        shape = (batch, self.n_kv, cache_len, self.head_dim)
        # zeros, not empty: masked columns must hold finite values (0 * -inf would be NaN).
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]
        positions = torch.arange(cache_len, device=self.device)[None]
        with torch.no_grad():
            cos, sin = self.decoder.rotary_emb(self.k[0], positions)
        self.cos, self.sin = cos[0], sin[0]  # [L, head_dim] in the model dtype, as HF computes them
        self.key_bias = torch.zeros(batch, 1, 1, cache_len, dtype=self.dtype, device=self.device)
        vocab = self.head.weight.shape[0]
        self.penalize = settings.repetition_penalty != 1.0
        self.seen = torch.zeros(batch, vocab if self.penalize else 1, dtype=torch.bool, device=self.device)
        self.eos = torch.tensor(settings.eos_ids or [-1], dtype=torch.long, device=self.device)
        self.current = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # Generated tokens; fixed for the graphs' sake, so sized for the longest possible run.
        self.out = torch.full((batch, cache_len), settings.pad_id, dtype=torch.long, device=self.device)
        self.key: tuple = ()
        self.last_timing: dict[str, Any] = {}
        self.buckets = attention_buckets(cache_len)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._step_fn = self._decode_step
        self._layer_fn = None
        self._choose_fn = choose_tokens
        self.row_columns = False  # ContinuousDecoder: each row writes its own cache column
        self.row_index = torch.arange(batch, device=self.device)
        self.layer_weights = [_layer_weights(layer) for layer in self.decoder.layers]
        if compile_step:
            # One compiled layer serves all layers; the sampling tail is compiled apart. Default
            # dynamism: the bucket length becomes symbolic at its second value (two compilations).
            if all(w is not None for w in self.layer_weights):
                self._layer_fn = torch.compile(_decode_layer)
            # The sampling tail too, except a sort-based top-p (small top_p): Inductor (torch 2.11)
            # fails to generate the cumsum over a 152k vocabulary (split scan; H100 machine).
            if settings.greedy or race_candidates(settings.top_p, self.head.weight.shape[0]) > 0:
                self._choose_fn = torch.compile(choose_tokens)

    # -- the model, through the static cache -------------------------------------------
    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                rows: slice | torch.Tensor, write: slice | torch.Tensor, kv_len: int) -> torch.Tensor:
        """Final hidden states of ``h`` [b, q, H] (cache rows ``rows``), writing K/V at ``write``
        (a slice of columns: prefill; a decoding step: a 1-element column tensor, or one column
        per row when ``self.row_columns`` is set)."""
        b, q_len, _ = h.shape
        rep = self.n_heads // self.n_kv
        decoding = not isinstance(write, slice)
        per_row = self.row_index if decoding and self.row_columns else None
        if decoding and self._layer_fn is not None:
            for i, entry in enumerate(self.layer_weights):
                assert entry is not None
                weights, eps = entry
                h = self._layer_fn(h, cos, sin, bias, write, self.k[i], self.v[i], weights, eps,
                                   self.decoder.layers[i].self_attn.scaling, self.n_heads, self.n_kv,
                                   self.head_dim, kv_len, per_row)
            return _norm(self.decoder.norm, h)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = _norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(b, q_len, self.n_heads, self.head_dim)
            k = attn.k_proj(x).view(b, q_len, self.n_kv, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            q = _rotate(q.transpose(1, 2), cos, sin)
            k = _rotate(k.transpose(1, 2), cos, sin)
            v = attn.v_proj(x).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            if decoding:
                if per_row is not None:
                    self.k[i][per_row, :, write] = k[:, :, 0]
                    self.v[i][per_row, :, write] = v[:, :, 0]
                else:
                    self.k[i].index_copy_(2, write, k)
                    self.v[i].index_copy_(2, write, v)
                # Grouped-query attention without copying K/V per query head: the query heads
                # sharing a KV head become extra query rows of it (one mask row fits all).
                qg = q.reshape(b, self.n_kv, rep * q_len, self.head_dim)
                o = F.scaled_dot_product_attention(qg, self.k[i][:, :, :kv_len], self.v[i][:, :, :kv_len],
                                                   attn_mask=bias, scale=attn.scaling)
                o = o.reshape(b, self.n_heads, q_len, self.head_dim)
            else:  # prefill: the chunk's own keys, repeated per query head (transient)
                self.k[i][rows, :, write] = k
                self.v[i][rows, :, write] = v
                o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                                   attn_mask=bias, scale=attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, q_len, -1))
            h = h + layer.mlp(_norm(layer.post_attention_layernorm, h))
        return _norm(self.decoder.norm, h)

    def _append(self, logits: torch.Tensor) -> None:
        """Choose, record and feed back the next token of every row (all in device tensors)."""
        token = self._choose_fn(logits.float(), self.seen if self.penalize else None, self.settings)
        token = torch.where(self.finished, torch.full_like(token, self.settings.pad_id), token)
        self.out.index_copy_(1, self.step, token[:, None])
        self.finished |= (token[:, None] == self.eos).any(dim=-1)
        if self.penalize:
            self.seen.scatter_(1, token[:, None], True)
        self.current.copy_(token)
        self.step.add_(1)

    def _decode_step(self, kv_len: int) -> None:
        self.key_bias.index_fill_(3, self.column, 0.0)  # the fed token's own column becomes visible
        h = self.decoder.embed_tokens(self.current[:, None])
        cos = self.cos[self.position][:, None, None]  # [B, 1, 1, d]: heads, one position
        sin = self.sin[self.position][:, None, None]
        h = self._layers(h, cos, sin, self.key_bias[..., :kv_len], slice(None), self.column, kv_len)
        self._append(self.head(h[:, -1]))
        self.position.add_(1)
        self.column.add_(1)

    # -- driving -----------------------------------------------------------------------
    def _capture(self) -> None:
        """Warm up and capture one graph per attention bucket (state is reset by prefill)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Every bucket once (twice for the first) before any capture: lazy initialisation and,
            # with compile_step, compilation must not happen while a graph is being captured.
            for kv_len in [self.buckets[0], *self.buckets]:
                self._step_fn(kv_len)
                self.column.zero_()
                self.step.zero_()
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for kv_len in self.buckets:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step_fn(kv_len)
            self.graphs[kv_len] = graph
            self.column.zero_()
            self.step.zero_()

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        b, width = input_ids.shape
        valid = attention_mask.bool()
        self.out.fill_(self.settings.pad_id)
        for t in (*self.k, *self.v):
            t.zero_()
        self.key_bias.fill_(float("-inf"))
        self.key_bias[:, 0, 0, :width].masked_fill_(valid, 0.0)
        self.seen.zero_()
        if self.penalize:  # prompt tokens count, left padding does not (as HF >= 5.2x does it)
            counts = torch.zeros(self.seen.shape, dtype=torch.int32, device=self.device)
            self.seen.copy_(counts.scatter_add_(1, input_ids, valid.int()) > 0)
        self.finished.zero_()
        self.step.zero_()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        last = []
        # Rows in chunks of about PREFILL_TOKENS tokens bound the MLP's and attention's transients.
        step = max(1, PREFILL_TOKENS // width)
        for r0 in range(0, b, step):
            rows = slice(r0, r0 + step)
            # A padding query sees itself only, so no attention row is empty (which would give NaN).
            allowed = (causal[None] & valid[rows, None, :]) | eye
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))[:, None]  # [b, 1, P, P]
            cos = self.cos[positions[rows]][:, None]  # [b, 1, P, d]
            sin = self.sin[positions[rows]][:, None]
            h = self._layers(self.decoder.embed_tokens(input_ids[rows]), cos, sin, bias, rows, slice(0, width), width)
            last.append(h[:, -1])
        self._append(self.head(torch.cat(last)))
        self.position.copy_(valid.sum(-1))
        self.column.fill_(width)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """New tokens [B, T] for left-padded prompts; T = steps until every row ended (or the budget)."""
        width = input_ids.shape[1]
        if width + max_new_tokens - 1 > self.cache_len:
            raise ValueError(f"prompt {width} + {max_new_tokens} new tokens exceed the cache ({self.cache_len})")
        if self.use_graphs and not self.graphs:
            # Capturing runs warm-up steps that draw random numbers: restore the generator so the
            # first call samples what every later call with the same seed samples.
            rng = torch.cuda.get_rng_state(self.device)
            self._capture()
            torch.cuda.set_rng_state(rng, self.device)
        clock = _Clock(self.device)
        self._prefill(input_ids, attention_mask)
        clock.mark()
        bucket, steps = 0, 0
        for i in range(1, max_new_tokens):
            if i % CHECK_EVERY == 0 and bool(self.finished.all()):
                break
            needed = width + i  # keys in use after this step writes column width + i - 1
            while self.buckets[bucket] < needed:
                bucket += 1
            if self.graphs:
                self.graphs[self.buckets[bucket]].replay()
            else:
                self._step_fn(self.buckets[bucket])
            steps += 1
        clock.mark()
        prefill_s, decode_s = clock.seconds()
        self.last_timing = {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
                            "batch": input_ids.shape[0], "prompt_width": width, "graphs": bool(self.graphs)}
        return self.out[:, :self._width(max_new_tokens)].clone()

    def _width(self, max_new_tokens: int) -> int:
        """HF's output width: the longest row through its first EOS, or the budget."""
        if not bool(self.finished.all()):
            return max_new_tokens
        out = self.out[:, :max_new_tokens]
        is_eos = (out[..., None] == self.eos).any(dim=-1)
        first = torch.where(is_eos, torch.arange(out.shape[1], device=self.device), out.shape[1])
        return int(first.min(dim=1).values.max()) + 1


_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, StaticDecoder] = weakref.WeakKeyDictionary()


def last_timing(model: torch.nn.Module) -> dict[str, Any]:
    """Prefill and decoding seconds (device time) of the model's latest static generation."""
    dec = _DECODERS.get(model)
    return dict(dec.last_timing) if dec is not None else {}


def release(model: torch.nn.Module) -> None:
    """Free the static cache and graphs kept for ``model`` (they are rebuilt when needed)."""
    _DECODERS.pop(model, None)


def generate_static(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    settings: DecodeSettings, max_new_tokens: int, use_graphs: bool = True,
                    compile_step: bool = False) -> torch.Tensor:
    """Generated tokens [B, T] (pad after each row's first EOS) for left-padded prompts.

    Keeps one :class:`StaticDecoder` per model (the latest shape): repeated calls with the same
    batch size, a cache length in the same 128-bucket and the same settings reuse its buffers
    and captured graphs; another shape frees it first. The model must be in eval mode.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"static decoding unavailable: {reason}")
    b, width = input_ids.shape
    cache_len = _round_up(width + max_new_tokens, ALIGN)
    p = next(model.parameters())
    key = (b, cache_len, settings, p.dtype, p.device, use_graphs, compile_step)
    dec = _DECODERS.get(model)
    if dec is None or dec.key != key:
        _DECODERS.pop(model, None)
        dec = StaticDecoder(model, b, cache_len, settings, use_graphs, compile_step)
        dec.key = key
        _DECODERS[model] = dec
    return dec.generate(input_ids, attention_mask, max_new_tokens)


def decode_settings(greedy: bool, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                    eos_ids: Sequence[int], pad_id: int) -> DecodeSettings:
    """DecodeSettings with the sampling knobs made inert where greedy ignores them."""
    if greedy:
        temperature, top_p, top_k = 1.0, 1.0, 0
    return DecodeSettings(greedy=greedy, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          repetition_penalty=float(repetition_penalty), eos_ids=tuple(int(e) for e in eos_ids),
                          pad_id=int(pad_id))


# -- continuous batching ------------------------------------------------------------------
M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (x in [0, 2^32) as int64; both multipliers < 2^31, so no product
    leaves int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _chain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hash of (a, b), not symmetric in them (a hash of a xor'd with one of b would be, and with
    seed 0 request r's step t would draw request t's step r noise)."""
    return _mix32(((_mix32(a) ^ 0x5851F42D) + b) & M32)


def row_keys(seed: int, jobs: Sequence[int]) -> list[int]:
    """Each request's noise key: a hash of (seed, the request's index in the caller's list)."""
    return _chain(torch.tensor([seed & M32]), torch.tensor(list(jobs), dtype=torch.long)).tolist()


def row_noise(vocab_hash: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [B, V] for the exponential race, a pure function of (request key, token index,
    vocabulary id): a request draws the same noise whichever slot, batch or step it runs in.
    ``vocab_hash`` is _mix32(arange(V)); 24-bit uniforms, as float32 draws have."""
    base = _chain(keys, counts)
    bits = _mix32(vocab_hash[None] ^ base[:, None])
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


class ContinuousDecoder(StaticDecoder):
    """Continuous batching over the static cache: ``batch`` slots, each decoding its own request
    from its own cache column; when a row ends (EOS or its token budget), its slot takes the
    next queued prompt (prefilled into that row of the cache) while the other rows go on.

    A row computes what it would compute in a static batch (same prompt tokens, positions,
    attention over its own keys, penalty over its own tokens), so greedy output is the static
    decoder's and HF generate's. Sampling races the row's own counter-based noise
    (:func:`row_noise`), so a request's draws do not depend on its slot or neighbours.
    """

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, settings: DecodeSettings,
                 use_graphs: bool, compile_step: bool = False) -> None:
        super().__init__(model, batch, cache_len, settings, use_graphs, compile_step)
        self.row_columns = True
        self.columns = torch.zeros(batch, dtype=torch.long, device=self.device)  # next column written
        self.count = torch.zeros(batch, dtype=torch.long, device=self.device)  # tokens generated
        self.limit = torch.zeros(batch, dtype=torch.long, device=self.device)  # each row's token budget
        self.keys = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.vocab_hash = _mix32(torch.arange(self.head.weight.shape[0], device=self.device))
        self._step_fn = self._continuous_step

    def _continuous_step(self, kv_len: int) -> None:
        rows = self.row_index
        self.key_bias[rows, 0, 0, self.columns] = 0.0  # each fed token's own column becomes visible
        h = self.decoder.embed_tokens(self.current[:, None])
        cos = self.cos[self.position][:, None, None]
        sin = self.sin[self.position][:, None, None]
        h = self._layers(h, cos, sin, self.key_bias[..., :kv_len], slice(None), self.columns, kv_len)
        noise = None if self.settings.greedy else row_noise(self.vocab_hash, self.keys, self.count)
        token = self._choose_fn(self.head(h[:, -1]).float(), self.seen if self.penalize else None, self.settings,
                                noise)
        active = ~self.finished
        token = torch.where(active, token, torch.full_like(token, self.settings.pad_id))
        self.out[rows, self.count] = token
        step = active.long()
        self.count.add_(step)
        self.finished |= (token[:, None] == self.eos).any(dim=-1) | (self.count >= self.limit)
        if self.penalize:
            self.seen.scatter_(1, token[:, None], True)  # an ended row's pad mark is reset by its next prompt
        self.current.copy_(token)
        self.position.add_(step)  # an ended row stays where it is (its writes stay inside the cache)
        self.columns.add_(step)

    def _reset(self, max_new_tokens: int) -> None:
        """Every slot empty (ended): steps leave them in bounds and change nothing that counts."""
        self.out.fill_(self.settings.pad_id)
        self.key_bias.fill_(float("-inf"))
        self.finished.fill_(True)
        for t in (self.count, self.columns, self.position, self.keys, self.seen):
            t.zero_()
        self.current.fill_(self.settings.pad_id)
        self.limit.fill_(max_new_tokens)

    def _start(self, slots: list[int], prompts: list[torch.Tensor], keys: list[int], budgets: list[int]) -> None:
        """Prefill ``prompts`` (1-D token ids) into cache rows ``slots`` and choose their first tokens."""
        b, width = len(prompts), max(len(p) for p in prompts)
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        ids = torch.full((b, width), self.settings.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=self.device)
        for r, p in enumerate(prompts):  # left padding, as in a static batch
            ids[r, width - len(p):] = p
            valid[r, width - len(p):] = True
        self.key_bias[idx] = float("-inf")
        self.key_bias[idx, 0, 0, :width] = torch.zeros(b, width, dtype=self.dtype, device=self.device).masked_fill(
            ~valid, float("-inf"))
        if self.penalize:  # prompt tokens count, left padding does not
            counts = torch.zeros(b, self.seen.shape[1], dtype=torch.int32, device=self.device)
            self.seen[idx] = counts.scatter_add_(1, ids, valid.int()) > 0
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        last = []
        chunk = max(1, PREFILL_TOKENS // width)
        for r0 in range(0, b, chunk):
            rows = slice(r0, r0 + chunk)
            allowed = (causal[None] & valid[rows, None, :]) | eye
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))[:, None]
            cos = self.cos[positions[rows]][:, None]
            sin = self.sin[positions[rows]][:, None]
            h = self._layers(self.decoder.embed_tokens(ids[rows]), cos, sin, bias, idx[rows], slice(0, width), width)
            last.append(h[:, -1])
        self.keys[idx] = torch.tensor(keys, dtype=torch.long, device=self.device)
        self.limit[idx] = torch.tensor(budgets, dtype=torch.long, device=self.device)
        self.count[idx] = 0
        noise = None if self.settings.greedy else row_noise(self.vocab_hash, self.keys[idx], self.count[idx])
        token = choose_tokens(self.head(torch.cat(last)).float(), self.seen[idx] if self.penalize else None,
                              self.settings, noise)
        self.out[idx] = self.settings.pad_id
        self.out[idx, 0] = token
        self.count[idx] = 1
        self.finished[idx] = (token[:, None] == self.eos).any(dim=-1) | (self.limit[idx] <= 1)
        if self.penalize:
            self.seen[idx, token] = True
        self.current[idx] = token
        self.position[idx] = valid.sum(-1)
        self.columns[idx] = width

    @torch.no_grad()
    def run(self, prompts: list[torch.Tensor], keys: list[int], max_new_tokens: int,
            budgets: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Generated tokens of each prompt (1-D, through its first EOS or its budget: ``budgets[i]``,
        default ``max_new_tokens``), in the order given; prompts are started in that order as
        slots free up."""
        if max(len(p) for p in prompts) + max_new_tokens > self.cache_len:
            raise ValueError(f"prompt + {max_new_tokens} new tokens exceed the cache ({self.cache_len})")
        budgets = [max_new_tokens] * len(prompts) if budgets is None else [min(int(b), max_new_tokens)
                                                                          for b in budgets]
        self._reset(max_new_tokens)
        if self.use_graphs and not self.graphs:
            self._capture()  # from the all-slots-empty state, which warm-up steps keep
            self._reset(max_new_tokens)
        clock = _Clock(self.device)
        queue = list(range(len(prompts)))[::-1]  # pop() takes the next
        job = [-1] * self.batch  # the request each slot decodes; -1 = free
        upper = [0] * self.batch  # host-side bound of each slot's next cache column (no sync needed)
        results: list[torch.Tensor | None] = [None] * len(prompts)
        # On CUDA a check synchronises (ends the queue of replays): every CHECK_EVERY steps, so a
        # finished row idles at most CHECK_EVERY - 1 steps. On CPU a check is free.
        check = CHECK_EVERY if self.device.type == "cuda" else 1
        steps = prefills = 0
        while True:
            if any(j >= 0 for j in job):
                ended, counts = self.finished.tolist(), self.count.tolist()
                for s, j in enumerate(job):
                    if j >= 0 and ended[s]:
                        results[j] = self.out[s, :counts[s]].clone()
                        job[s] = -1
            free = [s for s, j in enumerate(job) if j < 0]
            if free and queue:
                take = [queue.pop() for _ in range(min(len(free), len(queue)))]
                slots = free[:len(take)]
                self._start(slots, [prompts[j] for j in take], [keys[j] for j in take], [budgets[j] for j in take])
                width = max(len(prompts[j]) for j in take)
                for s, j in zip(slots, take, strict=True):
                    job[s], upper[s] = j, width
                prefills += 1
                continue  # rows that ended at their first token are harvested before any step
            busy = [s for s, j in enumerate(job) if j >= 0]
            if not busy:
                break
            for _ in range(check):
                needed = min(max(upper[s] for s in busy) + 1, self.cache_len)
                kv_len = next(b for b in self.buckets if b >= needed)
                if self.graphs:
                    self.graphs[kv_len].replay()
                else:
                    self._step_fn(kv_len)
                for s in busy:
                    upper[s] += 1
                steps += 1
        clock.mark()
        (seconds,) = clock.seconds()
        tokens = sum(len(r) for r in results if r is not None)
        self.last_timing = {"seconds": seconds, "decode_steps": steps, "prefills": prefills, "batch": self.batch,
                            "requests": len(prompts), "generated_tokens": tokens,
                            # decoding steps' share of slot-steps that produced a request's token
                            "slot_use": (tokens - len(prompts)) / max(steps * self.batch, 1),
                            "graphs": bool(self.graphs)}
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def generate_continuous(model: torch.nn.Module, prompts: list[torch.Tensor], keys: list[int],
                        settings: DecodeSettings, max_new_tokens: int, batch: int, use_graphs: bool = True,
                        compile_step: bool = False, budgets: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Generated tokens of each prompt (1-D ids without padding), with continuous batching over
    ``min(batch, len(prompts))`` slots; returned in the order given, which is also the order in
    which prompts enter the batch. ``keys`` (:func:`row_keys`) seed each request's sampling noise;
    ``budgets`` (benchmarks: lengths forced on models that never emit EOS) cap each request's
    new tokens below ``max_new_tokens``.

    Keeps one decoder per model, like :func:`generate_static` (same reuse rules).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"static decoding unavailable: {reason}")
    if not prompts:
        return []
    b = min(batch, len(prompts))
    cache_len = _round_up(max(len(p) for p in prompts) + max_new_tokens, ALIGN)
    p = next(model.parameters())
    key = ("continuous", b, cache_len, settings, p.dtype, p.device, use_graphs, compile_step)
    dec = _DECODERS.get(model)
    if dec is None or dec.key != key:
        _DECODERS.pop(model, None)
        dec = ContinuousDecoder(model, b, cache_len, settings, use_graphs, compile_step)
        dec.key = key
        _DECODERS[model] = dec
    assert isinstance(dec, ContinuousDecoder)
    return dec.run(prompts, keys, max_new_tokens, budgets)
