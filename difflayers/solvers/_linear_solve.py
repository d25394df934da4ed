"""``linear_solve``, the public entry point of the linear solvers, and ``Auto``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ._cg import CG
from ._dense import LU, Cholesky
from ._driver import IterativeSolver
from ._gmres import GMRES
from ._linear import LinearSolver, check_rhs
from ._minres import MINRES
from ._operator import DenseOperator, LinearOperator, aslinearoperator
from ._precision import explain_upcast, to_compute, to_output, without_autocast
from ._solution import Solution
from ._tracing import check_all

__all__ = ["linear_solve", "Auto"]

OperatorLike = LinearOperator | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Auto(IterativeSolver, LinearSolver):
    """Pick a linear solver from the operator's declared structure.

    ========================================  =============
    operator                                  solver
    ========================================  =============
    dense, symmetric and positive definite    ``Cholesky``
    dense, otherwise                          ``LU``
    matrix-free, symmetric positive definite  ``CG``
    matrix-free, symmetric                    ``MINRES``
    matrix-free, otherwise                    ``GMRES``
    ========================================  =============

    Dense means a tensor or a ``DenseOperator``; anything else (matvec callables,
    ``JacobianOperator``) is matrix-free. Structure is what the operator declares
    (``symmetric=``, ``positive_definite=``), never guessed. Normal equations are
    never used: they square the condition number of a symmetric system.

    Args:
        rtol, atol, max_steps, check_every: passed to the iterative solver it picks
            (see ``IterativeSolver``); direct solvers do not use them.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> Auto().select(DenseOperator(A, symmetric=True, positive_definite=True))
        Cholesky()
    """

    max_steps: int | None = None  # None: the picked Krylov solver's own default, 10 n

    def select(self, operator: LinearOperator) -> LinearSolver:
        """The solver used for ``operator``."""
        if isinstance(operator, DenseOperator):
            return Cholesky() if operator.symmetric and operator.positive_definite else LU()
        hyper = {f.name: getattr(self, f.name) for f in dataclasses.fields(IterativeSolver)}
        if operator.symmetric and operator.positive_definite:
            return CG(**hyper)
        if operator.symmetric:
            return MINRES(**hyper)
        return GMRES(**hyper)

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        operator = aslinearoperator(operator)
        return self.select(operator).solve(operator, b, x0=x0, preconditioner=preconditioner)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":  # nothing to read
        return
    # one host sync, at the boundary only (a device-side assertion while compiled)
    check_all(torch.isfinite(tensor.detach()), lambda _: ValueError(
        f"linear_solve: {name} contains NaN or Inf. Check how it was computed (a division by zero, "
        "an overflow in float32) before solving."
    ))


def _check_matrix(name: str, matrix: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Validate a dense matrix against ``b`` ``[B, n]``; return it as ``[B, n, n]`` or ``[n, n]``."""
    batch, n = b.shape
    if not matrix.is_floating_point():
        raise TypeError(f"linear_solve: {name} must be a floating-point tensor; got dtype {matrix.dtype}.")
    if matrix.dtype != b.dtype:
        raise TypeError(
            f"linear_solve: {name} has dtype {matrix.dtype} but b has dtype {b.dtype}; they must match. "
            f"Convert one of them, e.g. {name}.to(b.dtype)."
        )
    if matrix.device != b.device:
        raise ValueError(
            f"linear_solve: {name} is on device {matrix.device} but b is on {b.device}; they must match. "
            f"Move one of them, e.g. {name}.to(b.device)."
        )
    if matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"linear_solve: {name} must be a square matrix of shape [B, n, n] or [n, n]; "
            f"got shape {tuple(matrix.shape)}."
        )
    if matrix.shape[-1] != n:
        raise ValueError(
            f"linear_solve: {name} has shape {tuple(matrix.shape)}, which acts on vectors of size "
            f"{matrix.shape[-1]}, but b has shape {tuple(b.shape)} (size {n}). They must agree."
        )
    if matrix.dim() == 3 and matrix.shape[0] != batch:
        if matrix.shape[0] != 1:
            raise ValueError(
                f"linear_solve: {name} has batch size {matrix.shape[0]} but b has batch size {batch}. "
                f"Pass one matrix per sample ([{batch}, {n}, {n}]) or one shared matrix ([{n}, {n}])."
            )
        matrix = matrix[0]  # one matrix shared by the batch
    _check_finite(name, matrix)
    return matrix


def _shape_checked(name: str, matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``matvec`` with a check that it maps ``[B, n]`` to ``[B, n]`` (a shape comparison, no host sync)."""

    def checked(x: torch.Tensor) -> torch.Tensor:
        out = matvec(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ValueError(
                f"linear_solve: the matvec {name} returned {got} for x of shape {tuple(x.shape)}; it must return "
                f"A x shaped like x ([B, n] with n = b.shape[1]). Check the size of the operator against b."
            )
        return out

    return checked


def _as_operator(name: str, A, b: torch.Tensor, symmetric: bool, positive_definite: bool) -> LinearOperator:
    if isinstance(A, DenseOperator):
        matrix = to_compute(_check_matrix(name, A.matrix, b))
        if matrix is not A.matrix:
            A = DenseOperator(matrix, symmetric=A.symmetric, positive_definite=A.positive_definite)
        return aslinearoperator(A, symmetric=symmetric, positive_definite=positive_definite)
    if isinstance(A, torch.Tensor):
        A = to_compute(_check_matrix(name, A, b))
    elif not (isinstance(A, LinearOperator) or callable(A)):
        raise TypeError(
            f"linear_solve: {name} must be a LinearOperator, a tensor of shape [B, n, n] or [n, n], or a "
            f"callable matvec x [B, n] -> A x [B, n]; got {type(A).__name__}."
        )
    elif not isinstance(A, LinearOperator):
        A = _shape_checked(name, explain_upcast("linear_solve", f"the matvec {name}", A, b.dtype))
    return aslinearoperator(A, symmetric=symmetric, positive_definite=positive_definite)


@without_autocast
def linear_solve(
    A: OperatorLike,
    b: torch.Tensor,
    solver: LinearSolver | None = None,
    *,
    x0: torch.Tensor | None = None,
    preconditioner: OperatorLike | None = None,
    symmetric: bool = False,
    positive_definite: bool = False,
    throw: bool = True,
) -> Solution:
    """Solve the batched linear systems ``A x = b``, one per sample.

    Sample ``i`` solves ``A_i x_i = b_i``. ``A`` may be dense or matrix-free; its
    structure, declared here or on the operator, guides ``Auto`` (the default) to
    Cholesky/LU for dense matrices and CG/MINRES/GMRES otherwise.

    Args:
        A: a ``LinearOperator``, a tensor ``[B, n, n]`` (or ``[n, n]`` shared by the
            batch), or a callable matvec ``x [B, n] -> A x [B, n]``.
        b: right-hand sides ``[B, n]``.
        solver: a ``LinearSolver`` instance (``CG()``, ``GMRES(restart=30)``,
            ``LU()``...); ``None`` means ``Auto()``.
        x0: initial guess ``[B, n]`` for iterative solvers (zeros when ``None``).
        preconditioner: ``M ~ A^-1`` in the same forms as ``A``, applied as ``M r``
            (symmetric positive definite for CG and MINRES). Ignored by direct solvers.
        symmetric, positive_definite: declare the structure of a tensor or callable
            ``A`` (a ``LinearOperator`` carries its own).
        throw: raise ``ConvergenceError`` if any sample fails; with ``False``, return
            the per-sample statuses instead.

    Returns:
        ``Solution`` with ``value`` ``x`` ``[B, n]``, ``status`` ``[B]`` and ``stats``
        (``num_steps``, ``residual = ||b - A x||``). An empty batch (``B = 0``) gives an
        empty ``Solution``; an iterative solver with ``max_steps=0`` returns the initial
        guess with ``Status.MAX_STEPS`` (``SUCCESS`` where it already meets the tolerance).
        ``x`` has ``b``'s dtype.

    Precision: float64 and float32 systems are solved as given. float16 and bfloat16
    ``b`` (with a dense ``A``, ``x0`` and a dense preconditioner of the same dtype) are
    cast to float32, solved with float32 tolerances, and ``x`` is cast back; gradients
    reach them in their own dtype. A matvec callable or operator is then applied to
    float32 vectors (and must return float32). Integer ``b`` raises ``TypeError``.

    Raises:
        TypeError: ``A`` is not an operator, tensor or callable; ``solver`` is not a
            ``LinearSolver`` instance; dtypes differ.
        ValueError: shapes or devices disagree (also a matvec that does not return ``[B, n]``);
            ``b``, ``x0``, a dense ``A`` or a dense preconditioner holds NaN/Inf. A matvec
            that produces NaN/Inf is not checked up front: those samples end with
            ``Status.NONFINITE`` (``Status.BREAKDOWN`` when a dense factorization fails on it).
        ConvergenceError: with ``throw=True``, naming the failed samples.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> linear_solve(A, b, symmetric=True, positive_definite=True).value
        tensor([[0.0909, 0.6364]], dtype=torch.float64)
        >>> linear_solve(lambda x: x @ A.T, b, CG(), symmetric=True, positive_definite=True).value
        tensor([[0.0909, 0.6364]], dtype=torch.float64)
    """
    if solver is None:
        solver = Auto()
    if not isinstance(solver, LinearSolver):
        hint = ""
        if isinstance(solver, type) and issubclass(solver, LinearSolver):
            hint = f" Pass an instance: solver={solver.__name__}()."
        raise TypeError(
            f"linear_solve: solver must be a LinearSolver instance such as CG(), MINRES(), GMRES(), "
            f"BiCGStab(), LU() or Auto(); got {solver!r}.{hint}"
        )
    check_rhs(b, x0)
    operator = _as_operator("A", A, b, symmetric, positive_definite)
    M = None if preconditioner is None else _as_operator("preconditioner", preconditioner, b, False, False)
    _check_finite("b", b)
    if x0 is not None:
        _check_finite("x0", x0)
    dtype = b.dtype  # 16-bit systems are solved in float32, x cast back (see _precision)
    sol = solver.solve(operator, to_compute(b), x0=to_compute(x0), preconditioner=M)
    if throw:
        sol.raise_if_failed("linear_solve")
    return sol if sol.value.dtype == dtype else dataclasses.replace(sol, value=to_output(sol.value, dtype))
