"""Taylor remainder convergence test of the gradient of a scalar functional.

The standard verification of adjoint gradients (as in dolfin-adjoint / pyadjoint): if ``dJ`` is
the gradient of ``J`` at ``x``, the first-order Taylor remainder decays like ``h^2``; with a
wrong gradient it decays only like ``h``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflayers.testing._gradcheck import (
    _as_tensor_tuple,
    _check_callable,
    _check_positive_int,
    _dot,
    _float64_or_raise,
    _norm,
)

__all__ = ["TaylorResult", "taylor_test"]

_EPS64 = torch.finfo(torch.float64).eps
# Remainders below this many ulps of the values they are computed from are roundoff.
_ROUNDOFF_FACTOR = 1e3


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaylorResult:
    """Outcome of :func:`taylor_test`.

    Rates are observed convergence orders between consecutive steps,
    ``rate_k = log2(r(h_k) / r(h_{k+1}))``; a rate is ``nan`` where either remainder is below
    its roundoff floor (it would measure noise, not convergence).

    Attributes:
        h: the steps ``h_k = h0 / 2^k``.
        r0: ``|J(x + h dx) - J(x)|`` per step (expected rate 1).
        r1: ``|J(x + h dx) - J(x) - h <dJ(x), dx>|`` per step (expected rate 2).
        rate0: observed orders of ``r0`` (``len(h) - 1`` entries).
        rate1: observed orders of ``r1`` (``len(h) - 1`` entries).
        floor: roundoff floor per step, ``1e3 * eps * max(|J(x)|, |J(x + h dx)|, |h <dJ, dx>|)``.
        value: ``J(x)``.
        derivative: ``<dJ(x), dx>``, the directional derivative being tested.
    """

    h: tuple[float, ...]
    r0: tuple[float, ...]
    r1: tuple[float, ...]
    rate0: tuple[float, ...]
    rate1: tuple[float, ...]
    floor: tuple[float, ...]
    value: float
    derivative: float

    def passed(self, rate: float = 2.0, tol: float = 0.1) -> bool:
        """Whether ``r1`` converges at order at least ``rate - tol`` as ``h -> 0``.

        The criterion is the last rate of ``r1`` that is not ``nan`` (the smallest steps whose
        remainders are above roundoff): it must be ``>= rate - tol``. The last rate is the
        most asymptotic one, both ways: where the curvature of ``J`` along ``dx`` is small,
        the ``h^2`` and ``h^3`` terms of ``r1`` cancel and early rates can be anything (a test
        on the minimum rate fails a few percent of random directions for a correct gradient);
        and a gradient error ``e`` adds ``h |<e, dx>|`` to ``r1``, which dominates as
        ``h -> 0`` and pulls the rate towards 1. More ``steps`` (or a smaller ``h0``) make
        the test sharper. Rates above ``rate`` pass (``J`` may have no second-order term along
        ``dx``).

        If every ``r1`` rate is ``nan``, the first-order expansion is exact to roundoff at all
        but possibly one step. This passes only if ``J`` itself varies measurably along ``dx``
        (some ``r0`` rate is not ``nan``, e.g. ``J`` linear), and fails when nothing rose
        above roundoff (``h0`` too small, or ``J`` constant along ``dx``): a test that saw no
        signal proves nothing.

        Args:
            rate: the expected order of ``r1``: 2 for a gradient check.
            tol: allowed shortfall of the observed order.

        Returns:
            True if the gradient is consistent with ``J`` to the stated order.
        """
        valid1 = [r for r in self.rate1 if not math.isnan(r)]
        if valid1:
            return valid1[-1] >= rate - tol
        return any(not math.isnan(r) for r in self.rate0)

    def __str__(self) -> str:
        def fmt(rates: tuple[float, ...], k: int) -> str:
            if k == 0:
                return f"{'':>9}"
            r = rates[k - 1]
            return f"{'roundoff':>9}" if math.isnan(r) else f"{r:>9.3f}"

        lines = [
            f"taylor_test: J(x) = {self.value:.6e}, <dJ(x), dx> = {self.derivative:.6e}, "
            f"passed() = {self.passed()}",
            f"  {'h':>10}  {'r0':>10}  {'rate0':>9}  {'r1':>10}  {'rate1':>9}",
        ]
        for k, h in enumerate(self.h):
            lines.append(
                f"  {h:>10.3e}  {self.r0[k]:>10.3e}  {fmt(self.rate0, k)}  "
                f"{self.r1[k]:>10.3e}  {fmt(self.rate1, k)}"
            )
        return "\n".join(lines)


def _scalar(value: Any, where: str) -> float:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else f"a {type(value).__name__}"
        )
        raise TypeError(
            f"taylor_test: fn must return a scalar tensor (one element) {where}, got {got}. "
            "Reduce it first, e.g. `lambda x: loss(x).sum()`."
        )
    _float64_or_raise(value, f"the value of fn {where}", "taylor_test")
    if not value.is_floating_point():
        raise TypeError(
            f"taylor_test: fn returned a {value.dtype} tensor {where}; expected float64."
        )
    return float(value.detach())


def _rates(r: list[float], floor: list[float]) -> tuple[float, ...]:
    return tuple(
        math.log2(r[k] / r[k + 1])
        if r[k] > floor[k] and r[k + 1] > floor[k + 1]
        else math.nan
        for k in range(len(r) - 1)
    )


def taylor_test(
    fn: Callable[..., Any],
    x: Tensor | Sequence[Tensor],
    dx: Tensor | Sequence[Tensor],
    *,
    h0: float | None = None,
    steps: int = 6,
    grad: Tensor | Sequence[Tensor] | None = None,
) -> TaylorResult:
    r"""Taylor remainder test of the gradient of a scalar functional ``J = fn(x)``.

    For a smooth ``J`` and its gradient ``dJ(x)``, Taylor's theorem gives

    .. math::
        r_0(h) = |J(x + h\,dx) - J(x)| = O(h), \qquad
        r_1(h) = |J(x + h\,dx) - J(x) - h \langle dJ(x), dx\rangle| = O(h^2).

    Evaluating both for ``h_k = h0 / 2^k`` and the observed orders
    ``log2(r(h_k) / r(h_{k+1}))`` gives rates ~1 and ~2; a wrong gradient leaves ``r1`` at
    rate ~1 (whenever the error is not orthogonal to ``dx``, which a random ``dx`` ensures).
    Use ``result.passed()`` to check the ``r1`` rate.

    Roundoff: once a remainder falls to the level of the rounding error of the values it is
    computed from it stops converging. Remainders below
    ``1e3 * eps * max(|J(x)|, |J(x + h dx)|, |h <dJ, dx>|)`` are treated as roundoff and the
    rates that involve them are reported as ``nan`` and ignored by ``passed()``.

    Args:
        fn: the functional, called as ``fn(*x)`` (``fn(x)`` for a single tensor); returns a
            one-element float64 tensor. Grad mode stays on while it is evaluated.
        x: the point, a float64 tensor or tuple of float64 tensors.
        dx: the perturbation direction, same structure and shapes as ``x``. A random
            direction is best: it is not orthogonal to a gradient error.
        h0: the largest step; default ``1e-2 * max(1, ||x||) / ||dx||``, a 1 % perturbation.
        steps: number of steps ``h0, h0 / 2, ..., h0 / 2^(steps - 1)`` (at least 2).
        grad: the gradient ``dJ(x)`` to test, same structure as ``x``; default: computed by
            ``torch.autograd.grad`` through ``fn``.

    Returns:
        A :class:`TaylorResult` with the remainders and observed rates; ``str(result)`` is a
        table.

    Raises:
        TypeError: ``fn`` is not callable, ``x``, ``dx`` or ``grad`` are not (float64)
            tensors, or ``fn`` does not return a one-element float64 tensor.
        ValueError: ``dx`` or ``grad`` do not match ``x`` in structure or shape, ``dx`` is
            zero, or bad ``h0`` / ``steps``.

    Example:
        >>> import torch
        >>> from difflayers.testing import taylor_test
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5, dtype=torch.float64, generator=gen)
        >>> dx = torch.randn(5, dtype=torch.float64, generator=gen)
        >>> J = lambda x: torch.exp(x).sum() + (x**2).sum() ** 2
        >>> result = taylor_test(J, x, dx)
        >>> result.passed()
        True
        >>> [round(r) for r in result.rate0], [round(r) for r in result.rate1]
        ([1, 1, 1, 1, 1], [2, 2, 2, 2, 2])
        >>> taylor_test(J, x, dx, grad=2 * torch.exp(x)).passed()  # a wrong gradient
        False

    References:
        P. E. Farrell, D. A. Ham, S. W. Funke, M. E. Rognes, "Automated derivation of the
        adjoint of high-level transient finite element programs", SIAM J. Sci. Comput. 35(4),
        2013. https://doi.org/10.1137/120873558
    """
    caller = "taylor_test"
    _check_callable(fn, caller)
    xs = _as_tensor_tuple(x, "x", caller)
    dxs = _as_tensor_tuple(dx, "dx", caller)
    _check_positive_int(steps, "steps", caller, minimum=2)
    if h0 is not None and (isinstance(h0, bool) or not isinstance(h0, (int, float)) or not h0 > 0):
        raise ValueError(f"{caller}: h0 must be a number > 0, got {h0!r}.")

    def check_like_x(ts: tuple[Tensor, ...], name: str) -> None:
        if len(ts) != len(xs):
            raise ValueError(
                f"{caller}: {name} has {len(ts)} tensors but x has {len(xs)}; pass one "
                f"{name} per tensor of x."
            )
        for i, (t, xi) in enumerate(zip(ts, xs)):
            if t.shape != xi.shape:
                raise ValueError(
                    f"{caller}: {name}[{i}] has shape {tuple(t.shape)} but x[{i}] has shape "
                    f"{tuple(xi.shape)}; they must match."
                )
            _float64_or_raise(t, f"{name}[{i}]", caller)
            if not t.is_floating_point():
                raise TypeError(f"{caller}: {name}[{i}] has dtype {t.dtype}; expected float64.")

    check_like_x(xs, "x")
    check_like_x(dxs, "dx")
    x0 = [t.detach() for t in xs]
    d0 = [t.detach() for t in dxs]
    norm_dx = _norm(d0)
    if norm_dx == 0.0:
        raise ValueError(f"{caller}: dx is zero; pass a nonzero (ideally random) direction.")

    leaves = [t.clone().requires_grad_(grad is None) for t in x0]
    with torch.enable_grad():
        out = fn(*leaves)
    value = _scalar(out, "at x")
    if grad is None:
        if out.requires_grad:
            grads = torch.autograd.grad(out.reshape(()), leaves, allow_unused=True)
        else:  # J does not depend on x through autograd
            grads = (None,) * len(leaves)
    else:
        grads = _as_tensor_tuple(grad, "grad", caller)
        check_like_x(grads, "grad")
        grads = tuple(g.detach() for g in grads)
    derivative = _dot(grads, d0)

    if h0 is None:
        h0 = 1e-2 * max(1.0, _norm(x0)) / norm_dx
    hs = [float(h0) / 2.0**k for k in range(steps)]
    r0, r1, floor = [], [], []
    for h in hs:
        value_h = _scalar(fn(*[t + h * d for t, d in zip(x0, d0)]), f"at x + {h:.3e} dx")
        r0.append(abs(value_h - value))
        r1.append(abs(value_h - value - h * derivative))
        floor.append(_ROUNDOFF_FACTOR * _EPS64 * max(abs(value), abs(value_h), abs(h * derivative)))

    return TaylorResult(
        h=tuple(hs),
        r0=tuple(r0),
        r1=tuple(r1),
        rate0=_rates(r0, floor),
        rate1=_rates(r1, floor),
        floor=tuple(floor),
        value=value,
        derivative=derivative,
    )
