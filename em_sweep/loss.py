"""The entropy-minimization loss (MISSION.md s1).

    p_t  = softmax(logits_t / tau)
    H_t  = - sum_v p_t[v] * log(p_t[v] + 1e-12)
    loss = sum_t mask_t * H_t / sum_t mask_t

:func:`token_entropy` is the formula as written. :func:`entropy_sum_from_hidden`
computes the same per-token entropies from the final hidden states chunk by chunk,
so the fp32 softmax over a 152k vocabulary exists for one chunk of tokens at a
time (and is recomputed in backward instead of stored).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

EPS = 1e-12


def per_token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H over the last dim of ``logits`` (any leading shape), computed in fp32."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    return -(p * torch.log(p + EPS)).sum(dim=-1)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Masked mean of per-token entropy: a scalar.

    ``logits`` is [..., V]; ``mask`` has the leading shape of ``logits`` and is 1 where the
    token counts. A fully masked input gives 0 (with a gradient path), never NaN.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h = per_token_entropy(logits, temperature)
    m = mask.to(h.dtype)
    return (h * m).sum() / m.sum().clamp(min=1.0)


def _chunk_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return per_token_entropy(logits, temperature).sum()


def entropy_sum_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                            chunk_tokens: int = 4096, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of ``hidden`` [N, H] of the entropy of ``softmax(hidden @ weight.T / tau)``.

    Equal to ``per_token_entropy(hidden @ weight.T, tau).sum()``; memory is bounded by one chunk
    of ``chunk_tokens`` rows (0 = one chunk). Each chunk is checkpointed when gradients flow.
    """
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    step = n if chunk_tokens <= 0 else chunk_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        chunk = hidden[start:start + step]
        if torch.is_grad_enabled() and (chunk.requires_grad or weight.requires_grad) and step < n:
            total = total + checkpoint(_chunk_entropy_sum, chunk, weight, bias, temperature, use_reentrant=False)
        else:
            total = total + _chunk_entropy_sum(chunk, weight, bias, temperature)
    return total
