"""The entropy-minimization loss (arXiv 2505.20282, eq. 1; docs/method.md).

    p_t  = softmax(logits_t / tau)
    H_t  = - sum_v p_t[v] * log(p_t[v] + 1e-12)
    loss = sum_t mask_t * H_t / sum_t mask_t

:func:`token_entropy` is the formula as written. :func:`entropy_sum_from_hidden`
computes the same per-token entropies from the final hidden states chunk by chunk,
so the fp32 softmax over a 152k vocabulary exists for one chunk of tokens at a
time, and nothing of the size [tokens, vocab] is kept for backward (each chunk's
logits are recomputed there from the hidden states, with a hand-written gradient that
needs about three fp32 [chunk, vocab] buffers where autograd through the formula
keeps six or seven).
"""

from __future__ import annotations

import torch

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


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) for [N, V] inputs without an [N, V] temporary (a batched matmul)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(a.shape[0])


class _ChunkEntropy(torch.autograd.Function):
    """Per-row entropy of softmax(linear(hidden) / tau); saves only the inputs for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                temperature: float) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, bias)
        ctx.temperature = temperature
        p = torch.softmax(torch.nn.functional.linear(hidden, weight, bias).float() / temperature, dim=-1)
        log_p = p.add(EPS).log_()
        return -_row_dot(p, log_p)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias = ctx.saved_tensors
        tau = ctx.temperature
        p = torch.softmax(torch.nn.functional.linear(hidden, weight, bias).float() / tau, dim=-1)
        # H = -sum_i p_i log(p_i + eps);  a_i = -dH/dp_i = log(p_i + eps) + p_i / (p_i + eps);
        # softmax backward: dH/dz_j = -p_j (a_j - sum_i p_i a_i), with z = logits / tau.
        q = p.add(EPS)
        a = torch.div(p, q)
        a.add_(q.log_())
        del q
        mean_a = _row_dot(p, a)
        grad_logits = a.sub_(mean_a[:, None]).mul_(p).mul_((-grad_h.float() / tau)[:, None])
        del p
        grad_logits = grad_logits.to(weight.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.T @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def entropy_sum_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                            chunk_tokens: int = 4096, bias: torch.Tensor | None = None,
                            token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of ``hidden`` [N, H] of the entropy of ``softmax(hidden @ weight.T / tau)``
    (each row's entropy times ``token_weights[row]`` where given).

    Equal to ``per_token_entropy(hidden @ weight.T, tau).sum()`` (fp32 softmax, the same EPS),
    with the same gradient; memory is bounded by one chunk of ``chunk_tokens`` rows
    (0 = one chunk): about three fp32 [chunk, vocab] buffers at a time, none kept between
    forward and backward.
    """
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    step = n if chunk_tokens <= 0 else chunk_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        h = _ChunkEntropy.apply(hidden[start:start + step], weight, bias, temperature)
        total = total + (h.sum() if token_weights is None else (h * token_weights[start:start + step]).sum())
    return total


class _ChunkLogProb(torch.autograd.Function):
    """log softmax(linear(hidden) / tau)[target] per row; saves only the inputs for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature = temperature
        z = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
        return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        tau = ctx.temperature
        # d logp_y / dz = onehot(y) - softmax(z), with z = logits / tau.
        grad_z = torch.softmax(torch.nn.functional.linear(hidden, weight, bias).float() / tau, dim=-1)
        grad_z.neg_().scatter_add_(1, targets[:, None], torch.ones_like(grad_z[:, :1]))
        grad_logits = grad_z.mul_((grad_out.float() / tau)[:, None]).to(weight.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.T @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               temperature: float, chunk_tokens: int = 4096,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T / tau)[targets] for rows of ``hidden`` [N, H]: [N] fp32.

    The policy log-probabilities of the RL stage, with the same memory bound as
    :func:`entropy_sum_from_hidden` (one chunk's fp32 [chunk, vocab] at a time, nothing of that
    size kept for backward).
    """
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum(-1).float() * 0.0
    step = n if chunk_tokens <= 0 else chunk_tokens
    return torch.cat([_ChunkLogProb.apply(hidden[s:s + step], weight, bias, targets[s:s + step], temperature)
                      for s in range(0, n, step)])


def token_entropies_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                                chunk_tokens: int = 4096, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row entropies [N] of ``softmax(hidden @ weight.T / tau)``, with gradient: the terms that
    :func:`entropy_sum_from_hidden` sums (same memory bound), for losses that weight them per token."""
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum(-1).float() * 0.0
    step = n if chunk_tokens <= 0 else chunk_tokens
    return torch.cat([_ChunkEntropy.apply(hidden[s:s + step], weight, bias, temperature)
                      for s in range(0, n, step)])
