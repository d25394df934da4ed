"""Soft sorting and ranking (float64)."""

import pytest
import torch

import difflayers as dl
from difflayers.ot import soft_rank, soft_sort

F64 = torch.float64


def _x(seed=0, batch=2, n=6):
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_small_epsilon_approaches_sort_and_rank():
    x = _x()
    torch.testing.assert_close(soft_sort(x, epsilon=1e-2), x.sort(1).values, rtol=0, atol=0.1)
    ranks = (x.argsort(1).argsort(1) + 1).to(F64)
    torch.testing.assert_close(soft_rank(x, epsilon=1e-2), ranks, rtol=0, atol=0.35)
    # the soft ranks of n values always sum to n (n + 1) / 2
    torch.testing.assert_close(soft_rank(x, epsilon=0.1).sum(1), torch.full((2,), 21.0, dtype=F64))
    assert soft_sort(x[0]).shape == (6,) and soft_sort(x, m=3).shape == (2, 3)


@pytest.mark.parametrize("fn", [soft_sort, soft_rank], ids=["sort", "rank"])
def test_gradients_match_finite_differences_and_unrolling(fn):
    x = _x(seed=1)
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    tight = dl.ot.Sinkhorn(rtol=1e-12, atol=1e-14, max_steps=20000)
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        xx = x.clone().requires_grad_()
        (fn(xx, epsilon=0.05, adjoint=adjoint, solver=tight) * w).sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)
    d = torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    h = 1e-5
    fd = ((fn(x + h * d, epsilon=0.05, solver=tight) - fn(x - h * d, epsilon=0.05, solver=tight)) * w).sum() / (2 * h)
    torch.testing.assert_close((grads[0] * d).sum(), fd, rtol=1e-6, atol=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[n\] or \[B, n\]"):
        soft_sort(torch.zeros(2, 3, 4, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        soft_rank(torch.arange(5))
