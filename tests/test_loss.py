import math

import pytest
import torch

from em_sweep.training.loss import entropy_sum_from_hidden, token_entropy


def direct_entropy(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> float:
    """The formula of docs/method.md (paper eq. 1) written out with Python loops over tokens."""
    total, count = 0.0, 0
    flat_logits = logits.reshape(-1, logits.shape[-1]).double()
    for row, m in zip(flat_logits, mask.reshape(-1), strict=True):
        if not m:
            continue
        p = torch.softmax(row / tau, dim=-1)
        total += float(-(p * torch.log(p + 1e-12)).sum())
        count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 2.0])
def test_token_entropy_matches_the_formula(tau):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    mask = (torch.rand(3, 7, generator=g) > 0.4).long()
    mask[1] = 0  # a fully masked row
    got = token_entropy(logits, mask, tau)
    assert got.shape == ()
    assert math.isclose(float(got), direct_entropy(logits, mask, tau), rel_tol=1e-5, abs_tol=1e-6)


def test_token_entropy_gradient_is_finite_and_fully_masked_is_zero():
    logits = (torch.randn(2, 5, 9) * 50).requires_grad_()
    mask = torch.zeros(2, 5)
    mask[0, 1:3] = 1
    token_entropy(logits, mask, 0.5).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() == 0  # masked tokens get no gradient
    zero = token_entropy(logits, torch.zeros(2, 5), 0.5)
    assert float(zero) == 0.0 and not torch.isnan(zero)


def test_uniform_and_one_hot_extremes():
    v = 16
    assert math.isclose(float(token_entropy(torch.zeros(1, 1, v), torch.ones(1, 1), 1.0)), math.log(v), rel_tol=1e-6)
    peaked = torch.full((1, 1, v), -1e4)
    peaked[..., 3] = 1e4
    assert float(token_entropy(peaked, torch.ones(1, 1), 1.0)) < 1e-6


def test_token_entropy_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(1, 2, 3), torch.ones(1, 2), 0.0)


@pytest.mark.parametrize("chunk", [0, 1, 3, 100])
def test_chunked_hidden_state_entropy_equals_token_entropy(chunk):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    reference = token_entropy(hidden @ weight.T, torch.ones(10), 0.5) * 10
    got = entropy_sum_from_hidden(hidden, weight, 0.5, chunk_tokens=chunk)
    assert torch.allclose(got, reference, rtol=1e-5)
    g_ref = torch.autograd.grad(reference, (hidden, weight))
    g_got = torch.autograd.grad(got, (hidden, weight))
    for a, b in zip(g_ref, g_got, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_entropy_with_bias_matches_and_keeps_nothing_vocab_sized_for_backward():
    """Bias gradient too; and the memory promise: no [tokens, vocab] tensor is saved for backward."""
    g = torch.Generator().manual_seed(2)
    n, h, v = 12, 8, 301
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    reference = token_entropy(hidden @ weight.T + bias, torch.ones(n), 0.7) * n
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = entropy_sum_from_hidden(hidden, weight, 0.7, chunk_tokens=5, bias=bias)
    assert max(saved) <= max(hidden.numel(), weight.numel())  # inputs only, never n x v logits
    assert torch.allclose(got, reference, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(reference, (hidden, weight, bias)),
                    torch.autograd.grad(got, (hidden, weight, bias)), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_entropy_in_bfloat16_tracks_the_fp32_formula():
    """The GPU path: bf16 hidden states and head, fp32 softmax inside."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(16, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(500, 32, generator=g) * 0.3).bfloat16().requires_grad_()
    reference = token_entropy((hidden @ weight.T).float(), torch.ones(16), 0.5) * 16
    got = entropy_sum_from_hidden(hidden, weight, 0.5, chunk_tokens=7)
    assert got.dtype == torch.float32
    assert torch.allclose(got, reference, rtol=1e-4)
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    for a, b in zip(ref_grads, torch.autograd.grad(got, (hidden, weight)), strict=True):
        assert ((a.float() - b.float()).norm() / a.float().norm()) < 2e-2
