"""taylor_test: rates 1 and 2 for a correct gradient, r1 rate 1 for a wrong one."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from difflayers.testing import TaylorResult, taylor_test
from difflayers.testing import _taylor

DTYPE = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def functional(x: torch.Tensor) -> torch.Tensor:
    """A smooth, genuinely nonlinear functional of a batch of vectors."""
    return torch.logsumexp(3 * x, dim=-1).sum() + 0.5 * (x**2).sum() ** 1.5


def gradient(x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``functional``, by hand."""
    return 3 * torch.softmax(3 * x, dim=-1) + 1.5 * (x**2).sum().sqrt() * x


class WrongBackwardSquare(torch.autograd.Function):
    """``x**2`` whose backward is 1 % off."""

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 1.01 * 2 * x * grad


def test_hand_gradient_matches_autograd():
    x = _randn(2, 3).requires_grad_(True)
    (g,) = torch.autograd.grad(functional(x), x)
    torch.testing.assert_close(g, gradient(x.detach()), rtol=1e-13, atol=0)


def _assert_all_close(rates, target, tol):
    valid = [r for r in rates if not math.isnan(r)]
    assert len(valid) == len(rates), rates
    assert all(abs(r - target) < tol for r in valid), rates


def test_smooth_functional_converges_at_rates_one_and_two():
    x, dx = _randn(2, 3, seed=1), _randn(2, 3, seed=2)
    result = taylor_test(functional, x, dx)
    assert isinstance(result, TaylorResult)
    assert len(result.h) == len(result.r0) == len(result.r1) == len(result.floor) == 6
    assert len(result.rate0) == len(result.rate1) == 5
    _assert_all_close(result.rate0, 1.0, 0.05)
    _assert_all_close(result.rate1, 2.0, 0.05)
    assert result.passed()
    assert result.value == pytest.approx(float(functional(x)), rel=1e-15)
    assert result.derivative == pytest.approx(float((gradient(x) * dx).sum()), rel=1e-12)


def test_given_correct_gradient_passes():
    x, dx = _randn(2, 3, seed=1), _randn(2, 3, seed=2)
    result = taylor_test(functional, x, dx, grad=gradient(x))
    _assert_all_close(result.rate1, 2.0, 0.05)
    assert result.passed()


def test_wrong_gradient_drops_the_rate_to_one():
    x, dx = _randn(2, 3, seed=1), _randn(2, 3, seed=2)
    result = taylor_test(functional, x, dx, grad=1.01 * gradient(x))
    _assert_all_close(result.rate0, 1.0, 0.05)
    assert abs(result.rate1[-1] - 1.0) < 0.1, result.rate1
    assert not result.passed()
    assert result.passed(rate=1.0)


def test_wrong_custom_backward_is_caught_through_autograd():
    x, dx = _randn(4, seed=3), _randn(4, seed=4)
    good = taylor_test(lambda x: torch.sin(x**2).sum(), x, dx)
    bad = taylor_test(lambda x: torch.sin(WrongBackwardSquare.apply(x)).sum(), x, dx)
    assert good.passed()
    assert not bad.passed()
    assert abs(bad.rate1[-1] - 1.0) < 0.1, bad.rate1


def test_tuple_of_inputs():
    A, b = _randn(3, 3, seed=5) + 4 * torch.eye(3, dtype=DTYPE), _randn(3, seed=6)
    dA, db = _randn(3, 3, seed=7), _randn(3, seed=8)

    def J(A, b):
        return (torch.linalg.solve(A, b) ** 2).sum()

    result = taylor_test(J, (A, b), (dA, db))
    assert result.passed()
    leaves = (A.clone().requires_grad_(True), b.clone().requires_grad_(True))
    gA, gb = torch.autograd.grad(J(*leaves), leaves)
    assert taylor_test(J, (A, b), (dA, db), grad=(gA, gb)).passed()
    assert not taylor_test(J, (A, b), (dA, db), grad=(gA, 1.01 * gb)).passed()


def test_linear_functional_remainder_is_roundoff():
    c = _randn(5, seed=9)
    result = taylor_test(lambda x: (c * x).sum(), _randn(5, seed=10), _randn(5, seed=11))
    assert all(math.isnan(r) for r in result.rate1)
    _assert_all_close(result.rate0, 1.0, 1e-6)
    assert result.passed()
    assert "roundoff" in str(result)
    # A wrong gradient of a linear functional leaves r1 = O(h): rate 1.
    wrong = taylor_test(
        lambda x: (c * x).sum(), _randn(5, seed=10), _randn(5, seed=11), grad=1.01 * c
    )
    _assert_all_close(wrong.rate1, 1.0, 1e-6)
    assert not wrong.passed()


def test_no_signal_does_not_pass():
    # J constant along dx: nothing rises above roundoff, so there is no evidence either way.
    def constant_fn(x):
        return torch.ones((), dtype=DTYPE) + 0 * x.sum()

    constant = taylor_test(constant_fn, _randn(3), _randn(3, seed=1))
    assert all(math.isnan(r) for r in constant.rate0 + constant.rate1)
    assert not constant.passed()
    # h0 so small that J(x + h dx) - J(x) is roundoff.
    tiny = taylor_test(functional, _randn(2, 3), _randn(2, 3), h0=1e-15)
    assert not tiny.passed()


def test_functional_independent_of_autograd_gives_zero_gradient():
    # J computed outside autograd: dJ = 0, so r1 = r0 converges at rate 1 and the test fails.
    result = taylor_test(lambda x: functional(x.detach()), _randn(2, 3), _randn(2, 3, seed=1))
    assert result.derivative == 0.0
    assert result.r0 == result.r1
    assert not result.passed()


def test_steps_h0_and_one_element_output():
    x, dx = _randn(3, seed=1), _randn(3, seed=2)
    result = taylor_test(lambda x: (x**3).sum().reshape(1), x, dx, h0=0.1, steps=3)
    assert result.h == (0.1, 0.05, 0.025)
    assert result.passed()
    default = taylor_test(functional, x, dx)
    assert default.h[0] == pytest.approx(1e-2 * max(1.0, float(x.norm())) / float(dx.norm()))


def test_str_is_a_table():
    text = str(taylor_test(functional, _randn(2, 3), _randn(2, 3, seed=1)))
    lines = text.splitlines()
    assert lines[0].startswith("taylor_test: J(x) =") and "passed() = True" in lines[0]
    assert lines[1].split() == ["h", "r0", "rate0", "r1", "rate1"]
    assert len(lines) == 2 + 6


def test_result_is_frozen():
    result = taylor_test(functional, _randn(2, 3), _randn(2, 3, seed=1))
    with pytest.raises(AttributeError):
        result.value = 0.0


# ---------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    x, dx = _randn(3), _randn(3, seed=1)
    J = lambda x: (x**2).sum()  # noqa: E731
    with pytest.raises(TypeError, match="fn must be callable"):
        taylor_test(J(x), x, dx)
    with pytest.raises(TypeError, match="x must be a torch.Tensor or a tuple"):
        taylor_test(J, 1.0, dx)
    with pytest.raises(ValueError, match=r"dx\[0\] has shape \(4,\) but x\[0\] has shape \(3,\)"):
        taylor_test(J, x, _randn(4))
    with pytest.raises(ValueError, match="dx has 2 tensors but x has 1"):
        taylor_test(J, x, (dx, dx))
    with pytest.raises(TypeError, match=r"x\[0\] has dtype torch.float32.*float64"):
        taylor_test(J, x.float(), dx)
    with pytest.raises(TypeError, match=r"dx\[0\] has dtype torch.float32"):
        taylor_test(J, x, dx.float())
    with pytest.raises(TypeError, match=r"x\[0\] has dtype torch.int64"):
        taylor_test(J, torch.arange(3), dx)
    with pytest.raises(ValueError, match="dx is zero"):
        taylor_test(J, x, torch.zeros(3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"grad\[0\] has shape \(2,\)"):
        taylor_test(J, x, dx, grad=_randn(2))


def test_bad_outputs_and_options():
    x, dx = _randn(3), _randn(3, seed=1)
    with pytest.raises(TypeError, match=r"scalar tensor.*got a tensor of shape \(3,\).*sum"):
        taylor_test(lambda x: x**2, x, dx)
    with pytest.raises(TypeError, match="got a float"):
        taylor_test(lambda x: 1.0, x, dx)
    with pytest.raises(TypeError, match="float32"):
        taylor_test(lambda x: x.sum().float(), x, dx)
    with pytest.raises(TypeError, match="int64"):
        taylor_test(lambda x: torch.argmax(x), x, dx)
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 2"):
            taylor_test(lambda x: x.sum(), x, dx, steps=bad)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="h0 must be a number > 0"):
            taylor_test(lambda x: x.sum(), x, dx, h0=bad)


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(_taylor, raise_on_error=False)[:2]
    assert attempted > 0 and failed == 0
