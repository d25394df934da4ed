"""Gradient checks: reverse mode against finite differences, forward mode against reverse mode.

Two checks that every differentiable path of difflayers passes in its tests:

* :func:`check_grad` -- the reverse-mode gradient ``J^T u`` against directional central finite
  differences of ``f``.
* :func:`dot_product_test` -- forward mode (``torch.func.jvp``) against reverse mode
  (``torch.func.vjp``): the adjoint identity ``<u, J v> == <J^T u, v>``. Every custom
  ``torch.autograd.Function`` that defines ``jvp`` must pass it.

Both call ``fn(*inputs)`` (``fn(inputs)`` for a single tensor), where ``fn`` returns a tensor
or a tuple of tensors, and both work in float64 only.

Which inputs are differentiated: every floating-point tensor in ``inputs``, whether or not
``requires_grad`` is set (the flag is ignored, as in ``torch.func``). Integer and bool tensors
(indices, masks) are passed through unchanged. To hold a floating-point input fixed, close over
it: ``check_grad(lambda x: fn(x, y), x)``. Integer and bool outputs are ignored; floating-point
outputs must be float64.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradCheckResult", "DotProductResult", "check_grad", "dot_product_test"]

_EPS64 = torch.finfo(torch.float64).eps
# Step of central differences that balances truncation O(h^2) against roundoff O(eps / h).
_CBRT_EPS64 = _EPS64 ** (1.0 / 3.0)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradCheckResult:
    """Outcome of :func:`check_grad`, one entry per random direction.

    Attributes:
        fd: ``<u_k, (f(x + h v_k) - f(x - h v_k)) / (2 h)>``, the finite-difference side.
        ad: ``<J^T u_k, v_k>`` with ``J^T u_k`` from ``torch.autograd.grad``.
        errors: relative errors ``|fd_k - ad_k| / max(|fd_k|, |ad_k|)`` (0 where both are 0).
        max_error: the largest of ``errors``.
        passed: ``|fd_k - ad_k| <= atol + rtol * max(|fd_k|, |ad_k|)`` for every ``k``.
        step: the finite-difference step ``h`` that was used.
        rtol: relative tolerance of the comparison.
        atol: absolute tolerance of the comparison.
    """

    fd: tuple[float, ...]
    ad: tuple[float, ...]
    errors: tuple[float, ...]
    max_error: float
    passed: bool
    step: float
    rtol: float
    atol: float

    def __str__(self) -> str:
        failed = [
            abs(f - a) > self.atol + self.rtol * max(abs(f), abs(a))
            for f, a in zip(self.fd, self.ad)
        ]
        verdict = (
            "passed" if self.passed else f"FAILED in {sum(failed)} of {len(failed)} directions"
        )
        lines = [
            f"check_grad {verdict}: max relative error {self.max_error:.2e} "
            f"(rtol={self.rtol:.1e}, atol={self.atol:.1e}, step h={self.step:.2e})",
            f"  {'dir':>3}  {'finite differences':>22}  {'reverse mode':>22}  {'rel. error':>10}",
        ]
        for k, (f, a, e, bad) in enumerate(zip(self.fd, self.ad, self.errors, failed)):
            mark = "  <-- fails" if bad else ""
            lines.append(f"  {k:>3}  {f:>+22.14e}  {a:>+22.14e}  {e:>10.2e}{mark}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotProductResult:
    """Outcome of :func:`dot_product_test`, one entry per random pair ``(u_k, v_k)``.

    Attributes:
        jvp: ``<u_k, J v_k>`` with ``J v_k`` from ``torch.func.jvp`` (forward mode).
        vjp: ``<J^T u_k, v_k>`` with ``J^T u_k`` from ``torch.func.vjp`` (reverse mode).
        errors: ``|jvp_k - vjp_k| / max(|u_k| |J v_k|, |v_k| |J^T u_k|)``, the mismatch relative
            to the Cauchy-Schwarz bound of both sides (0 where ``J`` vanishes). This scale does
            not blow up when ``<u, J v>`` is small by cancellation.
        max_error: the largest of ``errors``.
        passed: ``max_error <= rtol``.
        rtol: tolerance of the comparison.
    """

    jvp: tuple[float, ...]
    vjp: tuple[float, ...]
    errors: tuple[float, ...]
    max_error: float
    passed: bool
    rtol: float

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"dot_product_test {verdict}: max relative error {self.max_error:.2e} "
            f"(rtol={self.rtol:.1e})",
            f"  {'dir':>3}  {'<u, J v> (jvp)':>22}  {'<J^T u, v> (vjp)':>22}  {'rel. error':>10}",
        ]
        for k, (a, b, e) in enumerate(zip(self.jvp, self.vjp, self.errors)):
            mark = "  <-- fails" if e > self.rtol else ""
            lines.append(f"  {k:>3}  {a:>+22.14e}  {b:>+22.14e}  {e:>10.2e}{mark}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Boundary validation and helpers (shared with _taylor.py)
# --------------------------------------------------------------------------------------------


def _check_callable(fn: Any, caller: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{caller}: fn must be callable, got {type(fn).__name__}. Pass the function itself, "
            "e.g. `fn=torch.sin` or `fn=lambda x, y: (x * y).sum()`, not its value."
        )


def _as_tensor_tuple(inputs: Any, name: str, caller: str) -> tuple[Tensor, ...]:
    """``inputs`` as a non-empty tuple of tensors; a clear TypeError for anything else."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        if len(inputs) == 0:
            raise ValueError(f"{caller}: {name} is empty; pass at least one tensor.")
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{caller}: {name}[{i}] is a {type(t).__name__}, expected a torch.Tensor. "
                    "Close over non-tensor arguments instead: `lambda x: fn(x, 3)`."
                )
        return tuple(inputs)
    raise TypeError(
        f"{caller}: {name} must be a torch.Tensor or a tuple of tensors, got "
        f"{type(inputs).__name__}. Convert with torch.as_tensor(..., dtype=torch.float64)."
    )


def _float64_or_raise(t: Tensor, name: str, caller: str) -> None:
    if t.is_complex():
        raise TypeError(
            f"{caller}: {name} is complex ({t.dtype}); only real float64 tensors are supported. "
            "Split it into real and imaginary parts (torch.view_as_real)."
        )
    if t.is_floating_point() and t.dtype != torch.float64:
        raise TypeError(
            f"{caller}: {name} has dtype {t.dtype}, but gradient checks need float64: in lower "
            "precision, roundoff hides gradient errors. Pass `t.double()` and make fn compute "
            "in float64."
        )


def _differentiable_indices(xs: tuple[Tensor, ...], name: str, caller: str) -> list[int]:
    """Positions of the floating-point inputs, which must all be float64."""
    idx = []
    for i, x in enumerate(xs):
        _float64_or_raise(x, f"{name}[{i}]", caller)
        if x.is_floating_point():
            idx.append(i)
    if not idx:
        raise ValueError(
            f"{caller}: no floating-point tensor in {name} (dtypes "
            f"{[str(x.dtype) for x in xs]}); nothing to differentiate. Pass float64 tensors."
        )
    return idx


def _float_outputs(out: Any, caller: str) -> tuple[Tensor, ...]:
    """The floating-point outputs of ``fn`` (integer/bool outputs are dropped)."""
    outs = (out,) if isinstance(out, Tensor) else out
    if not isinstance(outs, (tuple, list)):
        raise TypeError(
            f"{caller}: fn must return a tensor or a tuple of tensors, got {type(out).__name__}."
        )
    kept = []
    for i, o in enumerate(outs):
        if not isinstance(o, Tensor):
            raise TypeError(
                f"{caller}: output {i} of fn is a {type(o).__name__}, expected a torch.Tensor. "
                "Wrap fn so that it returns only tensors."
            )
        _float64_or_raise(o, f"output {i} of fn", caller)
        if o.is_floating_point():
            kept.append(o)
    if not kept:
        raise ValueError(
            f"{caller}: fn returned no floating-point output; nothing to differentiate."
        )
    return tuple(kept)


def _assemble(xs: tuple[Tensor, ...], idx: list[int], values: Sequence[Tensor]) -> list[Tensor]:
    """The full argument list with the differentiable slots replaced by ``values``."""
    args = list(xs)
    for i, v in zip(idx, values):
        args[i] = v
    return args


def _random_unit(like: Sequence[Tensor], gen: torch.Generator) -> tuple[Tensor, ...]:
    """A standard normal direction shaped like ``like``, scaled to unit norm over all parts.

    Drawn on the CPU from ``gen`` (reproducible across devices), then moved to each device.
    """
    parts = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in like]
    norm = math.sqrt(sum(float(p.square().sum()) for p in parts))
    if norm == 0.0:  # only when every part is empty
        norm = 1.0
    return tuple((p / norm).to(t.device) for p, t in zip(parts, like))


def _dot(a: Sequence[Tensor | None], b: Sequence[Tensor]) -> float:
    """``sum_i <a_i, b_i>``; a ``None`` part (autograd's unused input) counts as zero."""
    return sum(float((x * y).sum().detach()) for x, y in zip(a, b) if x is not None)


def _norm(a: Sequence[Tensor | None]) -> float:
    return math.sqrt(sum(float(x.square().sum()) for x in a if x is not None))


def _check_positive_int(value: Any, name: str, caller: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}.")


def _check_nonnegative(value: Any, name: str, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{caller}: {name} must be a number >= 0, got {value!r}.")


# --------------------------------------------------------------------------------------------
# check_grad
# --------------------------------------------------------------------------------------------


def check_grad(
    fn: Callable[..., Any],
    inputs: Tensor | Sequence[Tensor],
    *,
    directions: int = 4,
    eps: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
    raise_exception: bool = True,
) -> GradCheckResult:
    r"""Checks the reverse-mode gradient of ``fn`` against central finite differences.

    For ``k = 1..directions`` draws a random direction ``v_k`` over all differentiable inputs
    and a random output cotangent ``u_k``, both of unit norm (over all parts), and compares

    .. math::
        \mathrm{fd}_k = \Big\langle u_k, \frac{f(x + h v_k) - f(x - h v_k)}{2h} \Big\rangle
        \quad\text{with}\quad
        \mathrm{ad}_k = \langle J^T u_k, v_k \rangle,

    where ``J^T u_k`` comes from ``torch.autograd.grad`` (reverse mode). An input or output
    that autograd reports as unused or disconnected (``None``) has zero gradient. The test
    passes when ``|fd_k - ad_k| <= atol + rtol * max(|fd_k|, |ad_k|)`` for every ``k``.

    Error model of the finite difference: the central difference has truncation error
    ``h^2 |f'''| / 6`` and roundoff error ``~ eps |f| / h``. Their sum is smallest at
    ``h ~ eps^(1/3)``, so the default step is ``h = eps^(1/3) * max(1, ||x||) ~ 6e-6 *
    max(1, ||x||)`` in float64 (``||x||`` over all differentiable inputs), leaving an
    expected relative error ``~ eps^(2/3) ~ 4e-11`` for smooth ``f`` -- far below the default
    ``rtol``. If ``fn`` is itself only accurate to ``tol`` (an iterative solver), the finite
    difference carries an extra error ``~ tol / h``: converge the solver tightly or loosen
    ``rtol``.

    Differentiable inputs are all floating-point tensors of ``inputs`` (``requires_grad`` is
    ignored); integer and bool tensors are passed through unchanged. Leading batch dimensions
    and 0-dim tensors need nothing special: directions span every element of every input.

    Args:
        fn: called as ``fn(*inputs)`` (``fn(inputs)`` for a single tensor); returns a tensor or
            a tuple of tensors. Integer and bool outputs are ignored.
        inputs: a tensor or a tuple of tensors. Floating-point ones must be float64.
        directions: number of random ``(u, v)`` pairs.
        eps: the finite-difference step ``h``; default ``eps^(1/3) * max(1, ||x||)``.
        rtol: relative tolerance.
        atol: absolute tolerance (matters where ``<J^T u, v>`` is near zero).
        seed: seed of the CPU generator that draws ``u`` and ``v``.
        raise_exception: raise on failure instead of returning a failed result.

    Returns:
        A :class:`GradCheckResult`; ``str(result)`` is a table of both sides per direction.

    Raises:
        AssertionError: the check failed and ``raise_exception`` is true; the message is the table.
        TypeError: ``fn`` is not callable, an input or output is not a tensor, or a
            floating-point input or output is not float64.
        ValueError: bad options, no floating-point input or output, or ``fn`` changes the
            shape of its outputs under perturbation.

    Example:
        >>> import torch
        >>> from difflayers.testing import check_grad
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> A = torch.randn(4, 4, dtype=torch.float64)
        >>> check_grad(lambda x: torch.tanh(x @ A), x).passed
        True
    """
    caller = "check_grad"
    _check_callable(fn, caller)
    xs = _as_tensor_tuple(inputs, "inputs", caller)
    _check_positive_int(directions, "directions", caller)
    _check_nonnegative(rtol, "rtol", caller)
    _check_nonnegative(atol, "atol", caller)
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0
    ):
        raise ValueError(f"{caller}: eps (the step h) must be a number > 0, got {eps!r}.")
    idx = _differentiable_indices(xs, "inputs", caller)

    x0 = [xs[i].detach() for i in idx]
    h = float(eps) if eps is not None else _CBRT_EPS64 * max(1.0, _norm(x0))
    gen = torch.Generator().manual_seed(seed)

    leaves = [x.clone().requires_grad_(True) for x in x0]
    with torch.enable_grad():
        outs = _float_outputs(fn(*_assemble(xs, idx, leaves)), caller)
    connected = [i for i, o in enumerate(outs) if o.requires_grad]

    def evaluate(values: list[Tensor]) -> tuple[Tensor, ...]:
        # Grad mode stays on: fn may use autograd internally (a gradient-based inner solver).
        res = _float_outputs(fn(*_assemble(xs, idx, values)), caller)
        if [r.shape for r in res] != [o.shape for o in outs]:
            raise ValueError(
                f"{caller}: output shapes changed from {[tuple(o.shape) for o in outs]} at x to "
                f"{[tuple(r.shape) for r in res]} at a perturbed x; fn must be a fixed-shape map."
            )
        return tuple(r.detach() for r in res)

    fd, ad = [], []
    for _ in range(directions):
        v = _random_unit(x0, gen)
        u = _random_unit(outs, gen)
        if connected:
            grads = torch.autograd.grad(
                [outs[i] for i in connected],
                leaves,
                grad_outputs=[u[i] for i in connected],
                retain_graph=True,
                allow_unused=True,
            )
        else:  # no output depends on any input through autograd
            grads = (None,) * len(leaves)
        ad.append(_dot(grads, v))
        plus = evaluate([x + h * d for x, d in zip(x0, v)])
        minus = evaluate([x - h * d for x, d in zip(x0, v)])
        fd.append(_dot(u, [(p - m) / (2.0 * h) for p, m in zip(plus, minus)]))

    errors = tuple(
        abs(f - a) / max(abs(f), abs(a)) if max(abs(f), abs(a)) > 0 else 0.0
        for f, a in zip(fd, ad)
    )
    passed = all(abs(f - a) <= atol + rtol * max(abs(f), abs(a)) for f, a in zip(fd, ad))
    result = GradCheckResult(
        fd=tuple(fd),
        ad=tuple(ad),
        errors=errors,
        max_error=max(errors),
        passed=passed,
        step=h,
        rtol=float(rtol),
        atol=float(atol),
    )
    if raise_exception and not passed:
        raise AssertionError(
            f"{result}\nThe reverse-mode gradient of fn disagrees with finite differences: check "
            "the backward of any custom autograd.Function, and that fn is smooth at x and "
            "evaluated accurately (solver tolerances well below rtol * h)."
        )
    return result


# --------------------------------------------------------------------------------------------
# dot_product_test
# --------------------------------------------------------------------------------------------


def dot_product_test(
    fn: Callable[..., Any],
    inputs: Tensor | Sequence[Tensor],
    *,
    directions: int = 2,
    seed: int = 0,
    rtol: float = 1e-10,
    raise_exception: bool = True,
) -> DotProductResult:
    r"""Checks forward mode against reverse mode: the adjoint identity ``<u, J v> = <J^T u, v>``.

    ``J`` is the Jacobian of ``fn`` at ``inputs``. For random unit-norm ``v`` (over all
    differentiable inputs) and ``u`` (over all floating-point outputs), ``J v`` comes from
    ``torch.func.jvp`` (forward mode) and ``J^T u`` from ``torch.func.vjp`` (reverse mode), and

    .. math::
        \frac{|\langle u, J v\rangle - \langle J^T u, v\rangle|}
             {\max(\|u\|\,\|J v\|,\ \|v\|\,\|J^T u\|)} \le \mathrm{rtol}

    must hold for each pair. The denominator bounds both sides by Cauchy-Schwarz, so the
    error is relative to the size of ``J`` along ``u`` and ``v``, not to an inner product that
    may be small by cancellation. Both sides are exact up to roundoff, hence the tight default
    ``rtol``; loosen it to the solver tolerance when forward and backward solve linear systems
    iteratively.

    Every custom ``torch.autograd.Function`` that defines ``jvp`` must pass this test: it
    checks that its ``jvp`` and ``backward`` are transposes of each other. It does not check
    that either is the derivative of ``forward`` -- that is :func:`check_grad`.

    Differentiable inputs are all floating-point tensors of ``inputs`` (``requires_grad`` is
    ignored); integer and bool tensors are held fixed.

    Args:
        fn: called as ``fn(*inputs)`` (``fn(inputs)`` for a single tensor); returns a tensor or
            a tuple of tensors. Integer and bool outputs are ignored. Must support
            ``torch.func`` transforms (custom Functions need ``setup_context`` and ``jvp``).
        inputs: a tensor or a tuple of tensors. Floating-point ones must be float64.
        directions: number of random ``(u, v)`` pairs.
        seed: seed of the CPU generator that draws ``u`` and ``v``.
        rtol: tolerance on the relative error above.
        raise_exception: raise on failure instead of returning a failed result.

    Returns:
        A :class:`DotProductResult`; ``str(result)`` is a table of both sides per pair.

    Raises:
        AssertionError: the test failed and ``raise_exception`` is true; the message is the table.
        TypeError: ``fn`` is not callable, an input or output is not a tensor, or a
            floating-point input or output is not float64.
        ValueError: bad options, or no floating-point input or output.
        RuntimeError: ``fn`` does not support forward-mode AD (``torch.func.jvp``).

    Example:
        >>> import torch
        >>> from difflayers.testing import dot_product_test
        >>> A = torch.randn(2, 5, 3, dtype=torch.float64)
        >>> b = torch.randn(2, 5, dtype=torch.float64)
        >>> solve = lambda A, b: torch.linalg.lstsq(A, b.unsqueeze(-1)).solution
        >>> dot_product_test(solve, (A, b)).passed
        True
    """
    caller = "dot_product_test"
    _check_callable(fn, caller)
    xs = _as_tensor_tuple(inputs, "inputs", caller)
    _check_positive_int(directions, "directions", caller)
    _check_nonnegative(rtol, "rtol", caller)
    idx = _differentiable_indices(xs, "inputs", caller)
    primals = tuple(xs[i].detach() for i in idx)
    gen = torch.Generator().manual_seed(seed)

    def g(*values: Tensor) -> tuple[Tensor, ...]:
        return _float_outputs(fn(*_assemble(xs, idx, values)), caller)

    jvps, vjps, errors = [], [], []
    for _ in range(directions):
        v = _random_unit(primals, gen)
        try:
            with warnings.catch_warnings():
                # torch's first forward-AD call scripts its jvp decompositions and warns that
                # torch.jit.script is deprecated: torch's own business, not the caller's.
                warnings.filterwarnings(
                    "ignore",
                    message=r"`torch\.jit\.script` is deprecated",
                    category=DeprecationWarning,
                )
                outs, jv = torch.func.jvp(g, primals, v)
        except (RuntimeError, NotImplementedError) as exc:
            raise RuntimeError(
                f"{caller}: forward-mode AD (torch.func.jvp) of fn failed: {exc}\nA custom "
                "torch.autograd.Function needs `setup_context` (not ctx in forward) and a "
                "`jvp` staticmethod to be used here."
            ) from exc
        u = _random_unit(outs, gen)
        _, vjp_fn = torch.func.vjp(g, *primals)
        jtu = vjp_fn(u)
        a, b = _dot(u, jv), _dot(jtu, v)
        # |u| = |v| = 1, so the Cauchy-Schwarz scale is max(|J v|, |J^T u|).
        scale = max(_norm(jv), _norm(jtu))
        jvps.append(a)
        vjps.append(b)
        errors.append(abs(a - b) / scale if scale > 0 else 0.0)

    max_error = max(errors)
    passed = max_error <= rtol
    result = DotProductResult(
        jvp=tuple(jvps),
        vjp=tuple(vjps),
        errors=tuple(errors),
        max_error=max_error,
        passed=passed,
        rtol=float(rtol),
    )
    if raise_exception and not passed:
        raise AssertionError(
            f"{result}\nForward mode (jvp) and reverse mode (vjp) of fn are not transposes of "
            "each other: check the `jvp` and `backward` of any custom autograd.Function."
        )
    return result
