"""Differentiable solves: ``fixed_point``, ``root_find``, ``argmin``, ``least_squares``
and ``custom_root``.

Each entry point solves a batched problem with a solver of ``difflayers.solvers`` and
makes the solution differentiable with respect to the explicit ``*params`` through
the chosen strategy (``adjoint=``). Batch convention: with ``batched=True`` (the
default) the leading dimension of ``z0`` is the batch, and sample ``b`` of the
problem's output may depend only on sample ``b`` of ``z``; with ``batched=False``
``z0`` is one problem of any shape (a 0-dim tensor included).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch

from ..solvers import (
    Anderson,
    FixedPointProblem,
    LeastSquaresProblem,
    LevenbergMarquardt,
    MinimizeProblem,
    Newton,
    NonlinearSolver,
    RootProblem,
    Solution,
    CG,
    batch_norm,
)
from ..solvers._precision import explain_upcast, to_compute, to_output, without_autocast
from ..solvers._problem import first_evaluation
from ..solvers._solution import ConvergenceError
from ..solvers._tracing import compiling
from ._adjoint import Adjoint, CheckpointedUnroll, Implicit, OneStep, Truncated, Unroll
from ._function import ImplicitSpec, implicit_solution

__all__ = ["fixed_point", "root_find", "argmin", "least_squares", "custom_root"]


# ----------------------------------------------------------------------------- checks


def _check_inputs(name: str, fn, z0, params) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: the problem function must be callable; got {type(fn).__name__}.")
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{name}: z0 must be a torch.Tensor; got {type(z0).__name__}.")
    if not z0.is_floating_point():
        raise TypeError(f"{name}: z0 must be a real floating-point tensor; got dtype {z0.dtype}.")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"{name}: params[{i}] is a {type(p).__name__}; every parameter after z0 must be a tensor. "
                "Bind non-tensor constants with functools.partial or a closure instead."
            )
        if p.device != z0.device:
            raise ValueError(
                f"{name}: params[{i}] is on {p.device} but z0 is on {z0.device}; move them to one device."
            )
        if p.is_floating_point() and p.dtype != z0.dtype:
            raise TypeError(
                f"{name}: params[{i}] has dtype {p.dtype} but z0 has {z0.dtype}; cast them to one dtype "
                "(mixed precision would silently change the solution's dtype)."
            )


def _check_solver(name: str, solver, adjoint) -> None:
    if not isinstance(solver, NonlinearSolver):
        raise TypeError(
            f"{name}: solver must be a difflayers.solvers solver object such as Anderson() or Newton(); "
            f"got {type(solver).__name__}."
        )
    if not isinstance(adjoint, Adjoint):
        raise TypeError(
            f"{name}: adjoint must be a differentiation strategy such as Implicit(), Unroll() or OneStep(); "
            f"got {type(adjoint).__name__}."
        )


def _check_no_captured_grad(name: str, root, z: torch.Tensor, params) -> torch.Tensor:
    """Evaluate ``F(z*)`` on detached inputs; an output that requires grad proves that
    ``F`` reads a differentiable tensor from its closure, whose gradient the implicit
    backward would silently drop."""
    with torch.enable_grad():
        out = root(z.detach(), *[p.detach() for p in params])
    if out.requires_grad:
        raise ValueError(
            f"{name}: the problem function uses a tensor that requires grad but is not passed as an explicit "
            "parameter (for example a module's weight captured by a closure). Implicit differentiation only "
            "differentiates with respect to the explicit *params: pass that tensor after z0, e.g. "
            f"dl.{name}(fn, z0, weight, ...) with fn(z, weight). For nn.Module parameters use "
            "torch.func.functional_call and pass tuple(module.parameters())."
        )
    return out


# ----------------------------------------------------------------------------- shapes


class _Flat:
    """Adapts a user function on ``[B, *event]`` (or unbatched) tensors to the solvers'
    flat ``[B, n]`` form, checking the shape it returns."""

    def __init__(self, name: str, what: str, fn: Callable, z0: torch.Tensor, batched: bool, out: str):
        if batched and z0.dim() == 0:
            raise ValueError(
                f"{name}: z0 is 0-dim but batched=True expects a leading batch dimension. "
                "Pass batched=False to solve a single problem (of any shape), or z0.reshape(1)."
            )
        self.name, self.what, self.batched, self.out = name, what, batched, out
        self.fn = explain_upcast(name, what, fn, z0.dtype)  # 16-bit z0: fn sees float32
        self.event = tuple(z0.shape[1:]) if batched else tuple(z0.shape)
        self.batch = z0.shape[0] if batched else 1
        self.evaluated = False

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(self.batch, math.prod(self.event))  # not -1: ambiguous for an empty batch

    def unflatten(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape((self.batch, *self.event) if self.batched else self.event)

    def _first_call(self, z: torch.Tensor, params) -> torch.Tensor:
        """Evaluate once with torch's shape errors restated in terms of the arguments."""
        out = first_evaluation(self.fn, self.unflatten(z), params, owner=self.name, what=f"{self.what}(z, *params)",
                               expects=self.what, arg="z", params_name="params", each="param",
                               batch=self.batch if self.batched else None, start="z0")
        self.evaluated = True
        return out

    def __call__(self, z: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if self.evaluated:
            out = self.fn(self.unflatten(z), *params)
        else:
            out = self._first_call(z, params)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.name}: {self.what} must return a tensor; got {type(out).__name__}.")
        lead = (z.shape[0],) if self.batched else ()
        if self.out == "same":
            expected = lead + self.event
            if tuple(out.shape) != expected:
                raise ValueError(
                    f"{self.name}: {self.what} returned shape {tuple(out.shape)}; expected {expected}, the shape of z0."
                )
        elif self.out == "scalar":
            if tuple(out.shape) != lead:
                raise ValueError(
                    f"{self.name}: {self.what} returned shape {tuple(out.shape)}; expected {lead} "
                    f"({'one value per sample' if self.batched else 'a scalar'})."
                )
        elif self.batched and (out.dim() == 0 or out.shape[0] != z.shape[0]):
            raise ValueError(
                f"{self.name}: {self.what} returned shape {tuple(out.shape)}; expected a leading batch "
                f"dimension of size {z.shape[0]}."
            )
        if self.out == "scalar":
            return out.reshape(z.shape[0])
        # explicit sizes: reshape(B, -1) is ambiguous for an empty batch
        return out.reshape(z.shape[0], out.shape[1:].numel() if self.batched else out.numel())


# ----------------------------------------------------------------------------- driver


def _finish(name, sol: Solution, value: torch.Tensor, flat: _Flat, needs_grad: bool, throw: bool, return_solution: bool,
            dtype: torch.dtype):
    # The warning below needs a host read, which torch.compile cannot trace: it is not
    # given there (throw=False then keeps the whole call in one graph).
    if throw or (needs_grad and not compiling()):
        ok = bool(sol.converged.all())  # the one host sync of a call
        if not ok and throw:
            raise ConvergenceError(name, Solution(flat.unflatten(sol.value), sol.status, sol.stats))
        if not ok and needs_grad:
            bad = (~sol.converged).nonzero().flatten().tolist()
            warnings.warn(
                f"{name}: differentiating a solution that did not converge for samples {bad[:8]}"
                f"{' ...' if len(bad) > 8 else ''} (max residual {float(sol.stats['residual'].max()):.3e}); "
                "its gradient is unreliable. Check solution.status and raise max_steps or loosen rtol.",
                RuntimeWarning,
                stacklevel=3,
            )
    out = to_output(flat.unflatten(value), dtype)
    if return_solution:
        return Solution(value=out, status=sol.status, stats=sol.stats)
    return out


def _call_root(problem, z, *params):
    return problem.root(z, params)


def _solve(name, problem, flat: _Flat, z0, params, solver, adjoint, throw, return_solution):
    _check_solver(name, solver, adjoint)
    solver.check_problem(problem)
    # 16-bit inputs are solved in float32 and the result cast back (solvers._precision)
    dtype = z0.dtype
    z0 = to_compute(z0)
    params = tuple(to_compute(p) for p in params)
    # Derivatives are tracked whenever grad mode is on, so that torch.func transforms
    # (whose tensors do not report requires_grad) see them; nothing is recorded when no
    # input carries a derivative. Reverse-mode users get the checks and warnings.
    track = torch.is_grad_enabled()
    needs_grad = track and any(p.requires_grad for p in params)
    z0_flat = flat.flatten(z0)

    if isinstance(adjoint, (Unroll, CheckpointedUnroll)) and track:
        sol = solver.solve(problem, z0_flat, params, checkpoint=isinstance(adjoint, CheckpointedUnroll))
        value = sol.value
        if needs_grad and not value.requires_grad:
            # No step was taken (an empty batch, max_steps=0, or z0 already converged): the
            # computation does not depend on params, so its derivative is zero; keep the
            # output in the graph (an empty sum, NaN-free) so that backward gives zeros.
            value = value + sum(p.flatten()[:0].sum() for p in params if p.requires_grad)
        return _finish(name, sol, value, flat, needs_grad, throw, return_solution, dtype)

    with torch.no_grad():
        sol = solver.solve(problem, z0_flat.detach(), tuple(p.detach() for p in params))
    z = sol.value
    if track:
        if isinstance(adjoint, Implicit):
            root = functools.partial(_call_root, problem)
            if needs_grad:
                _check_no_captured_grad(name, root, z, params)
            spec = ImplicitSpec(root, problem.symmetric, adjoint.linear_solver, name)
            z = implicit_solution(spec, z, params)
        elif isinstance(adjoint, (Truncated, OneStep)):
            steps = adjoint.steps if isinstance(adjoint, Truncated) else 1
            state = solver.init(problem, z.detach(), params)
            for _ in range(steps):
                state = solver.differentiable_step(problem, state, params)
            z = state["z"]
    return _finish(name, sol, z, flat, needs_grad, throw, return_solution, dtype)


_SHARED_ARGS = """
        solver: a nonlinear solver of ``difflayers.solvers`` with its tolerances.
        adjoint: the differentiation strategy (``Implicit``, ``Unroll``,
            ``CheckpointedUnroll``, ``Truncated``, ``OneStep``); default ``Implicit()``.
        batched: whether the leading dimension of ``z0`` is the batch (default) or
            ``z0`` is a single problem.
        throw: raise ``ConvergenceError`` (naming the failed samples) when a sample does
            not converge; with ``False`` the per-sample status is returned instead and
            differentiating an unconverged solution warns. A sample whose ``z0`` or
            params make the problem NaN/Inf ends with ``Status.NONFINITE`` (the other
            samples, and their gradients, are unaffected); ``max_steps=0`` returns ``z0``
            with ``Status.MAX_STEPS``; an empty batch (``B = 0``) gives an empty result.
        return_solution: return a ``Solution`` (``value``, per-sample ``status``,
            ``stats`` with ``num_steps`` and ``residual``) instead of the tensor."""

_PRECISION = """
    Precision: the result has ``z0``'s dtype. float64 and float32 are solved as given;
    float16 and bfloat16 inputs (``z0`` and ``*params``) are cast to float32, solved
    with float32 tolerances, and the result is cast back; gradients reach them in
    their own dtype. The problem function is then evaluated on float32 tensors: a
    16-bit tensor it captures takes part in PyTorch's type promotion, but a matrix
    product needs one dtype, so pass such tensors as ``*params``. ``*params`` must
    share ``z0``'s floating dtype; integer ``z0`` raises ``TypeError``."""


def _with_shared_args(fn):
    fn.__doc__ = fn.__doc__.replace("{shared_args}", _SHARED_ARGS.strip("\n"))
    fn.__doc__ = fn.__doc__.replace("{precision}", _PRECISION.strip("\n"))
    return fn


@without_autocast
@_with_shared_args
def fixed_point(
    T: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *params: torch.Tensor,
    solver: NonlinearSolver | None = None,
    adjoint: Adjoint | None = None,
    batched: bool = True,
    throw: bool = True,
    return_solution: bool = False,
):
    """Solve ``z = T(z, *params)`` and differentiate the solution.

    With ``Implicit()``, the backward pass solves ``(I - dT/dz)^T w = g`` at the fixed
    point and returns ``(dT/dparams)^T w``.

    Args:
        T: the map, ``T(z, *params)`` with ``z`` shaped like ``z0``.
        z0: initial guess ``[B, ...]`` (or any shape with ``batched=False``).
        *params: tensors ``T`` depends on; gradients flow to these only.
{shared_args}

    Returns:
        The fixed point, shaped like ``z0`` (or a ``Solution``).

{precision}

    Raises:
        ConvergenceError: with ``throw=True``, if a sample did not converge.
        ValueError, TypeError: malformed inputs; the message says what to change.

    Example:
        >>> A = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        >>> z = dl.fixed_point(lambda z, b: z @ A.T + b, torch.zeros(2, 3, dtype=torch.float64), b)
        >>> z.sum().backward(); b.grad[0]         # (I - A)^-T 1 = 2
        tensor([2., 2., 2.], dtype=torch.float64)
    """
    name = "fixed_point"
    _check_inputs(name, T, z0, params)
    flat = _Flat(name, "T", T, z0, batched, "same")
    return _solve(name, FixedPointProblem(flat), flat, z0, params, solver or Anderson(), adjoint or Implicit(),
                  throw, return_solution)


@without_autocast
@_with_shared_args
def root_find(
    F: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *params: torch.Tensor,
    solver: NonlinearSolver | None = None,
    adjoint: Adjoint | None = None,
    symmetric: bool = False,
    batched: bool = True,
    throw: bool = True,
    return_solution: bool = False,
):
    """Solve ``F(z, *params) = 0`` and differentiate the solution.

    With ``Implicit()``, the backward pass solves ``(dF/dz)^T w = g`` and returns
    ``-(dF/dparams)^T w``.

    Args:
        F: the residual, same shape in and out.
        z0: initial guess ``[B, ...]`` (or any shape with ``batched=False``).
        *params: tensors ``F`` depends on; gradients flow to these only.
        symmetric: declare ``dF/dz`` symmetric (the backward then defaults to CG).
{shared_args}

    Returns:
        The root, shaped like ``z0`` (or a ``Solution``).

{precision}

    Raises:
        ConvergenceError: with ``throw=True``, if a sample did not converge.
        ValueError, TypeError: malformed inputs; the message says what to change.

    Example:
        >>> c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> z = dl.root_find(lambda z, c: z**2 - c, torch.tensor(1.0, dtype=torch.float64), c, batched=False)
        >>> z.backward(); c.grad                   # d sqrt(c)/dc = 1 / (2 sqrt 2)
        tensor(0.3536, dtype=torch.float64)
    """
    name = "root_find"
    _check_inputs(name, F, z0, params)
    flat = _Flat(name, "F", F, z0, batched, "same")
    return _solve(name, RootProblem(flat, symmetric=symmetric), flat, z0, params, solver or Newton(),
                  adjoint or Implicit(), throw, return_solution)


@without_autocast
@_with_shared_args
def argmin(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *params: torch.Tensor,
    solver: NonlinearSolver | None = None,
    adjoint: Adjoint | None = None,
    batched: bool = True,
    throw: bool = True,
    return_solution: bool = False,
):
    """Minimize a smooth objective ``f(z, *params)`` and differentiate the minimizer.

    The solution is a stationary point ``grad_z f(z*, params) = 0``. With
    ``Implicit()`` the backward pass solves ``H w = g`` with the Hessian ``H`` (by CG by
    default, since ``H`` is symmetric positive definite at a strict minimum) and
    returns ``-(d grad_z f / dparams)^T w``.

    Args:
        f: objective; returns one value per sample ``[B]`` (a scalar with
            ``batched=False``).
        z0: initial guess.
        *params: tensors ``f`` depends on; gradients flow to these only.
{shared_args}

    Returns:
        The minimizer, shaped like ``z0`` (or a ``Solution``).

{precision}

    Raises:
        ConvergenceError: with ``throw=True``, if a sample did not converge.
        ValueError, TypeError: malformed inputs; the message says what to change.

    Example:
        >>> lam = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * (lam * w**2).sum()
        >>> w = dl.argmin(f, torch.zeros(2, dtype=torch.float64), lam, batched=False)  # w = 1 / (1 + lam)
        >>> w
        tensor([0.5000, 0.2500], dtype=torch.float64, grad_fn=<ViewBackward0>)
    """
    name = "argmin"
    _check_inputs(name, f, z0, params)
    flat = _Flat(name, "f", f, z0, batched, "scalar")
    return _solve(name, MinimizeProblem(flat), flat, z0, params,
                  solver or Newton(linear_solver=CG()), adjoint or Implicit(), throw, return_solution)


@without_autocast
@_with_shared_args
def least_squares(
    r: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *params: torch.Tensor,
    solver: NonlinearSolver | None = None,
    adjoint: Adjoint | None = None,
    batched: bool = True,
    throw: bool = True,
    return_solution: bool = False,
):
    """Minimize ``1/2 ||r(z, *params)||^2`` and differentiate the minimizer.

    The solution satisfies ``J^T r = 0`` (``J = dr/dz``); with ``Implicit()`` the
    backward pass solves with the exact Hessian ``J^T J + sum_i r_i d^2 r_i/dz^2`` by CG.

    Args:
        r: residuals ``[B, ...]`` (any trailing shape).
        z0: initial guess.
        *params: tensors ``r`` depends on; gradients flow to these only.
{shared_args}

    Returns:
        The minimizer, shaped like ``z0`` (or a ``Solution``).

{precision}

    Example:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-0.5 * t)
        >>> fit = lambda p, y: p[0] * torch.exp(-p[1] * t) - y
        >>> dl.least_squares(fit, torch.ones(2, dtype=torch.float64), y, batched=False)
        tensor([2.0000, 0.5000], dtype=torch.float64)
    """
    name = "least_squares"
    _check_inputs(name, r, z0, params)
    flat = _Flat(name, "r", r, z0, batched, "any")
    return _solve(name, LeastSquaresProblem(flat), flat, z0, params,
                  solver or LevenbergMarquardt(), adjoint or Implicit(), throw, return_solution)


def custom_root(
    F: Callable[..., torch.Tensor],
    *,
    linear_solver=None,
    symmetric: bool = False,
    batched: bool = True,
):
    """Make any solver of ``F(z, *params) = 0`` differentiable by the implicit function theorem.

    ``custom_root(F)(solve)`` returns a function ``(z0, *params) -> z`` that runs
    ``solve(z0, *params)`` without recording gradients (any code: scipy, a CUDA kernel,
    a hand-written loop) and attaches the implicit derivative of ``F``'s root. When
    gradients are requested, the returned point is checked to be a root: a residual
    ``||F(z)|| > sqrt(eps) * (1 + ||z||)`` per sample, or a NaN/Inf one, triggers a
    warning, since the implicit gradient of a non-root is wrong.

    Args:
        F: the optimality condition, ``F(z, *params)``, zero at the solution.
        linear_solver: solver of the linearized systems (``None``: CG if ``symmetric``
            else GMRES).
        symmetric: declare ``dF/dz`` symmetric.
        batched: whether the leading dimension of ``z`` is the batch.

    Returns:
        A decorator: ``solve -> differentiable solve``. The differentiable solve returns
        ``z0``'s dtype; float16 and bfloat16 inputs are cast to float32 before ``solve``
        and ``F`` see them (the root check and the backward run in float32) and the
        root is cast back.

    Example:
        >>> F = lambda z, c: z**3 - c
        >>> cbrt = dl.custom_root(F, batched=False)(lambda z0, c: c.sign() * c.abs() ** (1 / 3))
        >>> c = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        >>> z = cbrt(torch.tensor(1.0, dtype=torch.float64), c); z.backward(); c.grad   # 1 / (3 z^2)
        tensor(0.0833, dtype=torch.float64)
    """
    if not callable(F):
        raise TypeError(f"custom_root: F must be callable; got {type(F).__name__}.")
    name = "custom_root"
    Implicit(linear_solver=linear_solver)  # validates linear_solver

    def decorator(solve: Callable[..., torch.Tensor]):
        if not callable(solve):
            raise TypeError(f"custom_root: the decorated solver must be callable; got {type(solve).__name__}.")

        @functools.wraps(solve)
        @without_autocast
        def differentiable_solve(z0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            _check_inputs(name, F, z0, params)
            flat = _Flat(name, "F", F, z0, batched, "same")
            dtype = z0.dtype
            z0, params = to_compute(z0), tuple(to_compute(p) for p in params)
            with torch.no_grad():
                z = solve(z0, *[p.detach() for p in params])
            if not isinstance(z, torch.Tensor) or z.shape != z0.shape:
                raise ValueError(
                    f"{name}: the decorated solver must return a tensor shaped like z0 {tuple(z0.shape)}; got "
                    f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}."
                )
            if z.is_floating_point() and z.dtype != z0.dtype:
                z = z.to(z0.dtype)
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
                return to_output(z, dtype)
            z_flat = flat.flatten(z)
            residual = _check_no_captured_grad(name, flat, z_flat, params)
            tol = math.sqrt(torch.finfo(z.dtype).eps) * (1.0 + batch_norm(z_flat))
            res_norm = batch_norm(residual)
            not_root = ~(res_norm <= tol)  # NaN/Inf residuals (a NaN point or parameter) count as failures
            if bool(not_root.any()):
                bad = not_root.nonzero().flatten().tolist()
                warnings.warn(
                    f"{name}: the solver returned a point that is not a root of F for samples {bad[:8]} "
                    f"(max ||F|| = {float(res_norm.max()):.3e}); the implicit gradient is wrong there"
                    + ("; the point or F holds NaN/Inf." if not bool(torch.isfinite(res_norm).all()) else "."),
                    RuntimeWarning,
                    stacklevel=3,  # past without_autocast's frame
                )
            spec = ImplicitSpec(flat, symmetric, linear_solver, name)
            return to_output(flat.unflatten(implicit_solution(spec, z_flat, params)), dtype)

        return differentiable_solve

    return decorator

