"""Block-tridiagonal symmetric positive definite operators and their block Cholesky solver.

Structured meshes numbered line by line give stiffness matrices that are block
tridiagonal: ``m`` diagonal blocks ``D_j`` and sub-diagonal blocks ``E_j`` of size
``s x s``. Block Cholesky costs ``O(m s^3)`` instead of ``O((m s)^3)`` for dense
Cholesky, in ``m`` batched steps.
"""

from __future__ import annotations

import dataclasses

import torch

from ..solvers import LinearOperator, LinearSolver, Solution, Status, batch_norm

__all__ = ["BlockTridiagonalOperator", "BlockCholesky", "BlockCholeskyFactorization"]


class BlockTridiagonalOperator(LinearOperator):
    """A batched symmetric block-tridiagonal matrix, restricted to a subset of unknowns.

    The full matrix acts on vectors of ``m s`` entries; ``free`` selects the unknowns
    the operator acts on (rows and columns outside ``free`` must be zero except a unit
    diagonal, so that the restriction is the free-free block).

    Args:
        diag: diagonal blocks ``[B, m, s, s]``.
        lower: sub-diagonal blocks ``[B, m - 1, s, s]`` (block ``(j + 1, j)``).
        free: indices of the free unknowns (``None``: all).
    """

    symmetric = True
    positive_definite = True

    def __init__(self, diag: torch.Tensor, lower: torch.Tensor, free: torch.Tensor | None = None):
        if diag.dim() != 4 or lower.dim() != 4 or lower.shape[1] != diag.shape[1] - 1:
            raise ValueError(
                f"BlockTridiagonalOperator: expected diag [B, m, s, s] and lower [B, m - 1, s, s]; got "
                f"{tuple(diag.shape)} and {tuple(lower.shape)}."
            )
        self.diag, self.lower, self.free = diag, lower, free
        self.size = diag.shape[1] * diag.shape[2]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.free is None:
            return x
        return x.new_zeros(x.shape[0], self.size).index_copy(1, self.free, x)

    def _restrict(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.free is None else y[:, self.free]

    def full_mv(self, x: torch.Tensor) -> torch.Tensor:
        """Product with the full ``[m s, m s]`` matrix, ``x`` ``[B, m, s]``."""
        y = torch.einsum("bjkl,bjl->bjk", self.diag, x)
        below = torch.einsum("bjkl,bjl->bjk", self.lower, x[:, :-1])  # E_j x_j lands in block j + 1
        above = torch.einsum("bjlk,bjl->bjk", self.lower, x[:, 1:])  # E_j^T x_{j+1} lands in block j
        return y + torch.nn.functional.pad(below, (0, 0, 1, 0)) + torch.nn.functional.pad(above, (0, 0, 0, 1))

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        batch, m, s = x.shape[0], self.diag.shape[1], self.diag.shape[2]
        full = self._embed(x).reshape(batch, m, s)
        return self._restrict(self.full_mv(full).reshape(batch, m * s))

    def transpose(self) -> BlockTridiagonalOperator:
        return self


@dataclasses.dataclass(frozen=True)
class BlockCholeskyFactorization:
    """``A = L L^T`` with block-bidiagonal ``L``: diagonal factors ``C_j`` and sub-diagonal
    blocks ``F_j = E_j C_j^-T``; reusable for any number of right-hand sides.

    Attributes:
        operator: the factored operator.
        chol: ``C_j`` ``[B, m, s, s]`` (lower triangular).
        sub: ``F_j`` ``[B, m - 1, s, s]``.
        info: ``[B]``, non-zero where a diagonal block was not positive definite.
    """

    operator: BlockTridiagonalOperator
    chol: torch.Tensor
    sub: torch.Tensor
    info: torch.Tensor

    def solve(self, b: torch.Tensor, transpose: bool = False) -> Solution:
        """Solve ``A x = b`` for ``b`` ``[B, n_free]`` (``A`` is symmetric: ``transpose`` is moot)."""
        op = self.operator
        batch, m, s = b.shape[0], op.diag.shape[1], op.diag.shape[2]
        rhs = op._embed(b).reshape(batch, m, s)
        y = []
        for j in range(m):  # forward substitution, L y = b
            r = rhs[:, j] if j == 0 else rhs[:, j] - torch.einsum("bkl,bl->bk", self.sub[:, j - 1], y[-1])
            y.append(torch.linalg.solve_triangular(self.chol[:, j], r[..., None], upper=False)[..., 0])
        x = [None] * m
        for j in reversed(range(m)):  # back substitution, L^T x = y
            r = y[j] if j == m - 1 else y[j] - torch.einsum("blk,bl->bk", self.sub[:, j], x[j + 1])
            x[j] = torch.linalg.solve_triangular(self.chol[:, j].transpose(-1, -2), r[..., None], upper=True)[..., 0]
        value = op._restrict(torch.stack(x, dim=1).reshape(batch, m * s))
        residual = batch_norm(b - op.mv(value))
        status = torch.where(torch.isfinite(value).all(dim=1), int(Status.SUCCESS), int(Status.NONFINITE))
        status = torch.where(self.info != 0, int(Status.BREAKDOWN), status).to(torch.int64)
        steps = torch.zeros(batch, dtype=torch.int64, device=b.device)
        return Solution(value=value, status=status, stats={"num_steps": steps, "residual": residual})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockCholesky(LinearSolver):
    r"""Direct solver for symmetric positive definite ``BlockTridiagonalOperator``\ s.

    Factorization, for ``j = 0, ..., m - 1``:

    .. math::
        C_j C_j^T = D_j - F_{j-1} F_{j-1}^T, \qquad F_j = E_j C_j^{-T},

    then one forward and one backward block substitution per right-hand side.
    ``PDELayer(linear=True, symmetric=True, jacobian=...)`` computes the factorization
    once per call and reuses it for the adjoint solve.

    Example:
        >>> D = 4 * torch.eye(2, dtype=torch.float64).expand(1, 3, 2, 2)
        >>> E = -torch.eye(2, dtype=torch.float64).expand(1, 2, 2, 2)
        >>> A = BlockTridiagonalOperator(D, E)
        >>> x = BlockCholesky().solve(A, torch.ones(1, 6, dtype=torch.float64)).value
        >>> bool(torch.allclose(A.mv(x), torch.ones(1, 6, dtype=torch.float64)))
        True

    References:
        Golub & Van Loan, Matrix Computations (4th ed., 2013), section 4.5.
    """

    def factorize(self, operator: LinearOperator, like: torch.Tensor) -> BlockCholeskyFactorization:
        if not isinstance(operator, BlockTridiagonalOperator):
            raise TypeError(f"BlockCholesky needs a BlockTridiagonalOperator; got {type(operator).__name__}.")
        D, E = operator.diag, operator.lower
        m = D.shape[1]
        chol, sub = [], []
        info = torch.zeros(D.shape[0], dtype=torch.int32, device=D.device)
        for j in range(m):
            A = D[:, j] if j == 0 else D[:, j] - sub[-1] @ sub[-1].transpose(-1, -2)
            C, inf = torch.linalg.cholesky_ex(A)
            info = torch.where(info == 0, inf, info)
            chol.append(C)
            if j < m - 1:
                # F_j = E_j C_j^-T  <=>  C_j F_j^T = E_j^T
                sub.append(torch.linalg.solve_triangular(C, E[:, j].transpose(-1, -2), upper=False).transpose(-1, -2))
        empty = D.new_zeros(D.shape[0], 0, *D.shape[2:])
        return BlockCholeskyFactorization(operator, torch.stack(chol, 1), torch.stack(sub, 1) if sub else empty, info)

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        return self.factorize(operator, b).solve(b)
