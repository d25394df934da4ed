"""check_grad and dot_product_test: each passes on correct derivatives and fails on wrong ones."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import difflayers.testing
from difflayers.testing import (
    DotProductResult,
    GradCheckResult,
    check_grad,
    dot_product_test,
)
from difflayers.testing import _gradcheck

DTYPE = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _make_sin(backward_factor: float, jvp_factor: float) -> type[torch.autograd.Function]:
    """``sin`` as a custom Function whose backward and jvp are scaled by the given factors."""

    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.sin(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return backward_factor * grad * torch.cos(x)

        @staticmethod
        def jvp(ctx, tangent):
            (x,) = ctx.saved_tensors
            return jvp_factor * tangent * torch.cos(x)

    return Sin


GoodSin = _make_sin(1.0, 1.0)
WrongBackwardSin = _make_sin(1.01, 1.0)  # backward off by 1 %, jvp right
WrongJvpSin = _make_sin(1.0, 1.01)  # jvp off by 1 %, backward right
ConsistentlyWrongSin = _make_sin(1.01, 1.01)  # jvp and backward agree, both wrong


class BatchedMatvec(torch.autograd.Function):
    """``y = A x`` over a leading batch dimension; ``grad_A`` optionally off by a factor.

    Shapes: A (B, m, n), x (B, n), y (B, m). Backward: grad_A = g x^T, grad_x = A^T g.
    """

    grad_a_factor = 1.0

    @staticmethod
    def forward(A, x):
        return torch.einsum("bmn,bn->bm", A, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        A, x = ctx.saved_tensors
        grad_a = BatchedMatvec.grad_a_factor * torch.einsum("bm,bn->bmn", g, x)
        return grad_a, torch.einsum("bmn,bm->bn", A, g)


class WrongGradABatchedMatvec(BatchedMatvec):
    @staticmethod
    def backward(ctx, g):
        A, x = ctx.saved_tensors
        return 1.01 * torch.einsum("bm,bn->bmn", g, x), torch.einsum("bmn,bm->bn", A, g)


class NoJvpSin(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)


# ---------------------------------------------------------------------------- check_grad


def test_check_grad_passes_on_correct_custom_function():
    result = check_grad(GoodSin.apply, _randn(3, 4))
    assert isinstance(result, GradCheckResult)
    assert result.passed
    assert len(result.errors) == len(result.fd) == len(result.ad) == 4
    assert result.max_error == max(result.errors) < 1e-8


def test_check_grad_fails_on_backward_off_by_one_percent():
    x = _randn(3, 4)
    result = check_grad(WrongBackwardSin.apply, x, raise_exception=False)
    assert not result.passed
    # ad = 1.01 * fd exactly up to finite-difference error, so the relative error is 0.01 / 1.01.
    assert all(e == pytest.approx(0.01 / 1.01, rel=1e-5) for e in result.errors)
    with pytest.raises(AssertionError, match="FAILED in 4 of 4 directions"):
        check_grad(WrongBackwardSin.apply, x)


def test_check_grad_fails_when_only_one_of_several_inputs_has_a_wrong_gradient():
    A, x = _randn(5, 3, 4, seed=1), _randn(5, 4, seed=2)
    assert check_grad(BatchedMatvec.apply, (A, x)).passed
    with pytest.raises(AssertionError, match="reverse-mode gradient of fn disagrees"):
        check_grad(WrongGradABatchedMatvec.apply, (A, x))


def test_check_grad_fails_on_a_missing_gradient_path():
    # x.detach() cuts one of the two paths: autograd gives x instead of 2x.
    result = check_grad(lambda x: x * x.detach(), _randn(6), raise_exception=False)
    assert not result.passed
    assert result.max_error == pytest.approx(0.5, rel=1e-6)


def test_check_grad_tuple_outputs_unused_inputs_and_disconnected_outputs():
    def fn(x, y, unused):
        return torch.sin(x) * y, torch.ones(2, dtype=DTYPE), (x**2).sum()

    result = check_grad(fn, (_randn(3, seed=1), _randn(3, seed=2), _randn(7, seed=3)))
    assert result.passed


def test_check_grad_output_independent_of_every_input():
    result = check_grad(lambda x: torch.zeros(3, dtype=DTYPE), _randn(4))
    assert result.passed
    assert result.fd == result.ad == (0.0,) * 4
    assert result.errors == (0.0,) * 4


def test_check_grad_zero_dim_and_batched_inputs():
    a, b = torch.tensor(0.7, dtype=DTYPE), _randn(8, 2, 3)
    assert check_grad(lambda a, b: a * torch.exp(b).sum(-1), (a, b)).passed
    assert check_grad(lambda a: torch.sin(a) * a, a).passed
    # A batch of small linear solves: gradient w.r.t. every sample's matrix and rhs.
    A = _randn(4, 3, 3, seed=5) + 3 * torch.eye(3, dtype=DTYPE)
    assert check_grad(torch.linalg.solve, (A, _randn(4, 3, seed=6))).passed


def test_check_grad_integer_inputs_are_held_fixed_and_integer_outputs_ignored():
    index = torch.tensor([2, 0, 2])

    def fn(x, index):
        y = torch.sin(x[index])
        return y, torch.argmax(y)

    assert check_grad(fn, (_randn(4), index)).passed


def test_check_grad_ignores_requires_grad_flag():
    x = _randn(3)
    a = check_grad(torch.sin, x)
    b = check_grad(torch.sin, x.clone().requires_grad_(True))
    assert a == b
    assert x.grad is None and not x.requires_grad


def test_check_grad_step_and_seed():
    x = 10 * _randn(5)
    result = check_grad(torch.sin, x)
    expected = torch.finfo(DTYPE).eps ** (1 / 3) * max(1.0, float(x.norm()))
    assert result.step == pytest.approx(expected, rel=1e-12)
    assert check_grad(torch.sin, x, eps=1e-4).step == 1e-4
    assert check_grad(torch.sin, x, seed=3) == check_grad(torch.sin, x, seed=3)
    assert check_grad(torch.sin, x, seed=3).fd != check_grad(torch.sin, x, seed=4).fd
    assert len(check_grad(torch.sin, x, directions=7).errors) == 7


def test_check_grad_too_large_step_fails_on_nonlinear_function():
    # The truncation error O(h^2) of a step h = 0.3 is far above rtol: the step is used.
    assert not check_grad(torch.exp, _randn(3), eps=0.3, raise_exception=False).passed


def test_check_grad_str_is_a_table():
    text = str(check_grad(WrongBackwardSin.apply, _randn(3), raise_exception=False))
    assert text.splitlines()[0].startswith("check_grad FAILED in 4 of 4 directions")
    assert "finite differences" in text and "reverse mode" in text
    assert text.count("<-- fails") == 4
    assert str(check_grad(GoodSin.apply, _randn(3))).startswith("check_grad passed")


def test_check_grad_result_is_frozen():
    result = check_grad(torch.sin, _randn(2))
    with pytest.raises(AttributeError):
        result.passed = False


# ---------------------------------------------------------------------------- dot_product_test


def test_dot_product_test_passes_on_correct_custom_function():
    result = dot_product_test(GoodSin.apply, _randn(3, 4))
    assert isinstance(result, DotProductResult)
    assert result.passed
    assert result.max_error < 1e-14
    assert len(result.jvp) == len(result.vjp) == len(result.errors) == 2


def test_dot_product_test_fails_on_jvp_off_by_one_percent():
    x = _randn(3, 4)
    result = dot_product_test(WrongJvpSin.apply, x, raise_exception=False)
    assert not result.passed
    assert result.max_error > 1e-4
    with pytest.raises(AssertionError, match="not transposes of each other"):
        dot_product_test(WrongJvpSin.apply, x)


def test_dot_product_test_fails_on_backward_off_by_one_percent():
    with pytest.raises(AssertionError, match="dot_product_test FAILED"):
        dot_product_test(WrongBackwardSin.apply, _randn(5))


def test_dot_product_test_checks_consistency_not_correctness():
    # jvp and backward both 1 % off: transposes of each other, so the dot-product test passes;
    # only check_grad, which compares with f itself, catches the error.
    x = _randn(5)
    assert dot_product_test(ConsistentlyWrongSin.apply, x).passed
    assert not check_grad(ConsistentlyWrongSin.apply, x, raise_exception=False).passed


def test_dot_product_test_batched_multi_input_multi_output():
    A = _randn(4, 3, 3, seed=5) + 3 * torch.eye(3, dtype=DTYPE)
    b = _randn(4, 3, seed=6)

    def fn(A, b, scale):
        z = torch.linalg.solve(A, b)
        return z * scale, (z**2).sum(-1), torch.zeros(2, dtype=DTYPE)

    assert dot_product_test(fn, (A, b, torch.tensor(1.5, dtype=DTYPE)), directions=3).passed


def test_dot_product_test_unused_input_integer_input_and_output():
    def fn(x, unused, index):
        y = torch.exp(x[index])
        return y, torch.argmax(y)

    assert dot_product_test(fn, (_randn(4), _randn(2), torch.tensor([0, 3, 3]))).passed


def test_dot_product_test_without_jvp_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="`jvp` staticmethod"):
        dot_product_test(NoJvpSin.apply, _randn(3))


def test_dot_product_test_str_is_a_table():
    text = str(dot_product_test(WrongJvpSin.apply, _randn(3), raise_exception=False))
    assert text.startswith("dot_product_test FAILED")
    assert "<u, J v> (jvp)" in text and "<J^T u, v> (vjp)" in text
    assert "<-- fails" in text


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("check", [check_grad, dot_product_test])
class TestBadInputs:
    def test_non_callable_fn(self, check):
        with pytest.raises(TypeError, match="fn must be callable"):
            check(torch.sin(_randn(2)), _randn(2))

    def test_non_tensor_inputs(self, check):
        with pytest.raises(TypeError, match=r"inputs\[1\] is a float"):
            check(lambda x, y: x * y, (_randn(2), 2.0))
        with pytest.raises(TypeError, match="must be a torch.Tensor or a tuple"):
            check(torch.sin, 1.0)
        with pytest.raises(ValueError, match="empty"):
            check(torch.sin, ())

    def test_float32_input(self, check):
        with pytest.raises(TypeError, match=r"float32.*need float64.*\.double\(\)"):
            check(torch.sin, torch.ones(2, dtype=torch.float32))

    def test_complex_input(self, check):
        with pytest.raises(TypeError, match="complex"):
            check(torch.sin, torch.ones(2, dtype=torch.complex128))

    def test_no_floating_point_input(self, check):
        with pytest.raises(ValueError, match="no floating-point tensor"):
            check(lambda i: i.double(), torch.arange(3))

    def test_bad_outputs(self, check):
        with pytest.raises(TypeError, match="return a tensor or a tuple"):
            check(lambda x: 1.0, _randn(2))
        with pytest.raises(TypeError, match="output 1 of fn is a NoneType"):
            check(lambda x: (x, None), _randn(2))
        with pytest.raises(TypeError, match="output 0 of fn has dtype torch.float32"):
            check(lambda x: x.float(), _randn(2))
        with pytest.raises(ValueError, match="no floating-point output"):
            check(lambda x: torch.argmax(x), _randn(2))

    def test_bad_options(self, check):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="directions must be an integer >= 1"):
                check(torch.sin, _randn(2), directions=bad)
        with pytest.raises(ValueError, match="rtol must be a number >= 0"):
            check(torch.sin, _randn(2), rtol=-1.0)


def test_check_grad_bad_step():
    for bad in (0.0, -1e-3, math.nan):
        with pytest.raises(ValueError, match="eps"):
            check_grad(torch.sin, _randn(2), eps=bad)
    with pytest.raises(ValueError, match="atol must be a number >= 0"):
        check_grad(torch.sin, _randn(2), atol=-1.0)


def test_check_grad_shape_changing_fn():
    with pytest.raises(ValueError, match="output shapes changed"):
        check_grad(lambda x: x[x > 0], torch.tensor([1e-7, 1.0, -1.0], dtype=DTYPE), eps=1e-3)


# ---------------------------------------------------------------------------- docs


@pytest.mark.parametrize("module", [difflayers.testing, _gradcheck])
def test_docstring_examples_run(module):
    failed, attempted = doctest.testmod(module, raise_on_error=False)[:2]
    assert attempted > 0 and failed == 0


def test_public_names():
    assert set(difflayers.testing.__all__) >= {
        "check_grad",
        "dot_product_test",
        "taylor_test",
        "GradCheckResult",
        "DotProductResult",
        "TaylorResult",
    }
    for name in difflayers.testing.__all__:
        assert hasattr(difflayers.testing, name), name
