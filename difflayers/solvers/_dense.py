"""Direct (dense) linear solvers: LU, Cholesky and least squares, with reusable factorizations."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import batch_norm
from ._linear import LinearSolver, check_rhs
from ._operator import LinearOperator, aslinearoperator
from ._solution import Solution, Status

__all__ = ["LU", "Cholesky", "LSTSQ", "LUFactorization", "CholeskyFactorization"]


def _matrix(operator, like: torch.Tensor) -> torch.Tensor:
    return aslinearoperator(operator).as_matrix(like)


def _solution(matrix: torch.Tensor, b: torch.Tensor, x: torch.Tensor, info: torch.Tensor | None) -> Solution:
    """Per-sample status and ``||b - A x||`` of a direct solve (no host sync)."""
    residual = batch_norm(b - torch.einsum("bij,bj->bi", matrix, x))
    # a finite x can still come from an infinite matrix (x = b / inf = 0): the residual tells
    finite = torch.isfinite(x).all(dim=1) & torch.isfinite(residual)
    status = torch.where(finite, int(Status.SUCCESS), int(Status.NONFINITE))
    if info is not None:  # a failed factorization explains the NaN/Inf it produces
        status = torch.where(info != 0, int(Status.BREAKDOWN), status)
    num_steps = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    return Solution(value=x, status=status.to(torch.int64), stats={"num_steps": num_steps, "residual": residual})


@dataclasses.dataclass(frozen=True)
class LUFactorization:
    """An LU factorization with partial pivoting of a batch of matrices, reusable.

    Attributes:
        lu, pivots, info: as returned by ``torch.linalg.lu_factor_ex``; ``info[b] != 0``
            marks an exactly singular sample.
        matrix: the factored ``[B, n, n]`` matrix, for residuals.
    """

    lu: torch.Tensor
    pivots: torch.Tensor
    info: torch.Tensor
    matrix: torch.Tensor

    def solve(self, b: torch.Tensor, transpose: bool = False) -> Solution:
        """Solve ``A x = b``, or ``A^T x = b`` with ``transpose=True``, for ``b`` ``[B, n]``."""
        check_rhs(b)
        x = torch.linalg.lu_solve(self.lu, self.pivots, b[:, :, None], adjoint=transpose)[:, :, 0]
        matrix = self.matrix.transpose(1, 2) if transpose else self.matrix
        return _solution(matrix, b, x, self.info)


@dataclasses.dataclass(frozen=True)
class CholeskyFactorization:
    """A Cholesky factorization ``A = L L^T`` of a batch of matrices, reusable.

    Attributes:
        factor: the lower-triangular ``L`` ``[B, n, n]``.
        info: as returned by ``torch.linalg.cholesky_ex``; ``info[b] != 0`` marks a
            sample that is not positive definite.
        matrix: the factored matrix, for residuals.
    """

    factor: torch.Tensor
    info: torch.Tensor
    matrix: torch.Tensor

    def solve(self, b: torch.Tensor, transpose: bool = False) -> Solution:
        """Solve ``A x = b`` for ``b`` ``[B, n]``; ``A`` is symmetric, so ``transpose`` changes nothing."""
        check_rhs(b)
        x = torch.cholesky_solve(b[:, :, None], self.factor)[:, :, 0]
        return _solution(self.matrix, b, x, self.info)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LU(LinearSolver):
    """Dense LU with partial pivoting, batched.

    Solves ``A x = b`` for any nonsingular ``A`` by materializing ``A`` as a
    ``[B, n, n]`` matrix (``n`` matvecs for a matrix-free operator) and factoring it:
    ``O(n^3)`` work per sample, exact up to rounding, independent of conditioning
    for convergence. The right choice for small dense systems (``n`` up to a few
    thousand) and for reusing one factorization for the transposed system
    (``factorize``). An exactly singular sample (a zero pivot) gets
    ``Status.BREAKDOWN``; the other samples are solved normally. ``x0`` and
    ``preconditioner`` are ignored.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
        >>> LU().solve(DenseOperator(A), b).value
        tensor([[0., 1.]], dtype=torch.float64)
        >>> factors = LU().factorize(DenseOperator(A), b)
        >>> factors.solve(b, transpose=True).value  # A^T x = b, same factorization
        tensor([[0.5000, 0.8333]], dtype=torch.float64)

    References:
        Golub & Van Loan, Matrix Computations (4th ed., 2013), Sec. 3.4,
        ISBN 978-1-4214-0794-4.
    """

    def factorize(self, operator: LinearOperator | torch.Tensor, like: torch.Tensor) -> LUFactorization:
        """Factor ``operator`` for the batch, dtype and device of ``like`` (``[B, n]``)."""
        matrix = _matrix(operator, like)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        return LUFactorization(lu=lu, pivots=pivots, info=info, matrix=matrix)

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        check_rhs(b, x0)
        return self.factorize(operator, b).solve(b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cholesky(LinearSolver):
    """Dense Cholesky, batched, for symmetric positive definite operators.

    Solves ``A x = b`` with ``A = L L^T``: half the work of LU and no pivoting. Only
    the lower triangle of ``A`` is read, so ``A`` must be symmetric; a sample that is
    not positive definite gets ``Status.BREAKDOWN`` (use LU, or MINRES, for it) while
    the other samples are solved normally. ``x0`` and ``preconditioner`` are ignored.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> Cholesky().solve(DenseOperator(A, symmetric=True, positive_definite=True), b).value
        tensor([[0.0909, 0.6364]], dtype=torch.float64)

    References:
        Golub & Van Loan, Matrix Computations (4th ed., 2013), Sec. 4.2,
        ISBN 978-1-4214-0794-4.
    """

    def factorize(self, operator: LinearOperator | torch.Tensor, like: torch.Tensor) -> CholeskyFactorization:
        """Factor ``operator`` for the batch, dtype and device of ``like`` (``[B, n]``)."""
        matrix = _matrix(operator, like)
        factor, info = torch.linalg.cholesky_ex(matrix)
        return CholeskyFactorization(factor=factor, info=info, matrix=matrix)

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        check_rhs(b, x0)
        return self.factorize(operator, b).solve(b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSTSQ(LinearSolver):
    """Dense least squares, batched: ``x = argmin ||A x - b||`` (minimum norm on CPU).

    For a nonsingular ``A`` this is the solution of ``A x = b``; for a singular one it
    is a least-squares solution, and ``stats["residual"]`` tells how far from
    consistent the system is. The status is SUCCESS whenever the result is finite:
    the least-squares problem always has a solution, so judge consistency by the
    residual. A sample whose matrix holds NaN/Inf gets ``Status.NONFINITE``. On CPU the rank-revealing ``gelsy`` driver handles rank deficiency; on
    CUDA PyTorch only offers ``gels``, which assumes full rank. ``x0`` and
    ``preconditioner`` are ignored.

    Args:
        rcond: singular values below ``rcond`` times the largest are treated as zero
            (CPU drivers only); ``None`` uses machine epsilon times ``n``.

    Example:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # singular
        >>> b = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
        >>> LSTSQ().solve(DenseOperator(A), b).value
        tensor([[2., 0.]], dtype=torch.float64)

    References:
        Golub & Van Loan, Matrix Computations (4th ed., 2013), Sec. 5.5,
        ISBN 978-1-4214-0794-4.
    """

    rcond: float | None = None

    def __post_init__(self):
        if self.rcond is not None and not (0.0 <= self.rcond < 1.0):
            raise ValueError(f"LSTSQ: rcond must be None or in [0, 1), got {self.rcond!r}.")

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        check_rhs(b, x0)
        matrix = _matrix(operator, b)
        # LAPACK's drivers reject non-finite input (an internal error, not a result): solve a
        # stand-in for those samples and report them NONFINITE.
        finite = torch.isfinite(matrix).flatten(1).all(1)
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        safe = torch.where(finite[:, None, None], matrix, eye)
        x = torch.linalg.lstsq(safe, b[:, :, None], rcond=self.rcond).solution[:, :, 0]
        x = torch.where(finite[:, None], x, float("nan"))
        return _solution(matrix, b, x, None)
