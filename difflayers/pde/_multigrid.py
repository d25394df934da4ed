"""Preconditioners for grid operators: Jacobi and a geometric multigrid V-cycle.

Both are ``difflayers.solvers.LinearOperator`` objects acting on flat ``[B, n]``
vectors, so they plug into any Krylov solver of ``difflayers.solvers`` through its
``preconditioner`` argument, or into ``PDELayer(preconditioner=...)`` which reuses
one preconditioner for the Newton systems and the adjoint solve.
"""

from __future__ import annotations

import dataclasses

import torch

from ..solvers import LinearOperator, LinearSolver, Solution
from ._grid import Boundary, Grid, boundary_sides, diffusion, diffusion_diagonal, _coefficient

__all__ = ["Jacobi", "Multigrid", "Preconditioned"]


class Jacobi(LinearOperator):
    """Diagonal (Jacobi) preconditioner ``M = D^-1`` of ``-div(k grad u) + c u``.

    Args:
        grid: the grid.
        k: diffusion coefficient (float, ``grid.shape`` or ``[B, *grid.shape]``).
        bc: boundary conditions (values are irrelevant).
        reaction: optional ``c`` (same forms as ``k``), added to the diagonal.
    """

    symmetric = True
    positive_definite = True

    def __init__(self, grid: Grid, k, bc: Boundary, *, reaction=None, like: torch.Tensor | None = None):
        like = _like(grid, k, like)
        diag = diffusion_diagonal(k, grid, bc, like)
        if reaction is not None:
            diag = diag + _coefficient(reaction, like, grid, expand=False)
        self.grid = grid
        self.inverse = (1.0 / diag).reshape(diag.shape[0], -1)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inverse

    def transpose(self) -> Jacobi:
        return self


def _like(grid: Grid, k, like):
    if like is not None:
        return like
    if isinstance(k, torch.Tensor) and k.dim() == grid.ndim + 1:
        return torch.zeros((k.shape[0], *grid.shape), dtype=k.dtype, device=k.device)
    dtype = k.dtype if isinstance(k, torch.Tensor) else torch.float64
    device = k.device if isinstance(k, torch.Tensor) else None
    return torch.zeros((1, *grid.shape), dtype=dtype, device=device)


def _prolong_axis(c: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation from ``m`` coarse to ``2 m`` fine cells along ``dim``.

    Fine cell ``2J`` gets ``3/4 c_J + 1/4 c_{J-1}``, fine cell ``2J + 1`` gets
    ``3/4 c_J + 1/4 c_{J+1}``; a missing neighbour beyond the boundary is replaced by
    ``c_J`` (constant extrapolation).
    """
    m = c.shape[dim]
    left = torch.cat([c.narrow(dim, 0, 1), c.narrow(dim, 0, m - 1)], dim=dim)
    right = torch.cat([c.narrow(dim, 1, m - 1), c.narrow(dim, m - 1, 1)], dim=dim)
    even = 0.75 * c + 0.25 * left
    odd = 0.75 * c + 0.25 * right
    shape = list(c.shape)
    shape[dim] = 2 * m
    return torch.stack([even, odd], dim=dim + 1).reshape(shape)


def _restrict_axis(f: torch.Tensor, dim: int) -> torch.Tensor:
    """Half the transpose of ``_prolong_axis``: ``R = P^T / 2``, so ``R 1 = 1``."""
    m = f.shape[dim] // 2
    shape = list(f.shape)
    shape[dim : dim + 1] = [m, 2]
    pairs = f.reshape(shape)
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    # Transpose of left[J] = c[J-1] (J >= 1), left[0] = c[0]; of right likewise.
    from_left = torch.cat([even.narrow(dim, 1, m - 1), even.narrow(dim, 0, 1) * 0], dim=dim)
    from_left = from_left + torch.nn.functional.pad(
        even.narrow(dim, 0, 1), _pad_spec(f.dim(), dim, 0, m - 1)
    )
    from_right = torch.cat([odd.narrow(dim, 0, 1) * 0, odd.narrow(dim, 0, m - 1)], dim=dim)
    from_right = from_right + torch.nn.functional.pad(
        odd.narrow(dim, m - 1, 1), _pad_spec(f.dim(), dim, m - 1, 0)
    )
    return 0.5 * (0.75 * (even + odd) + 0.25 * (from_left + from_right))


def _pad_spec(ndim: int, dim: int, before: int, after: int) -> list[int]:
    spec = [0, 0] * (ndim - dim - 1)
    return spec + [before, after]


def _average_children(k: torch.Tensor, ndim: int) -> torch.Tensor:
    for axis in range(ndim):
        dim = axis + 1
        m = k.shape[dim] // 2
        shape = list(k.shape)
        shape[dim : dim + 1] = [m, 2]
        k = k.reshape(shape).mean(dim=dim + 1)
    return k


@dataclasses.dataclass
class _Level:
    grid: Grid
    k: torch.Tensor
    reaction: torch.Tensor | None
    inv_diag: torch.Tensor


class Multigrid(LinearOperator):
    r"""One geometric multigrid V-cycle for ``-div(k grad u) + c u`` as a preconditioner.

    Levels are built by merging ``2^d`` cells while every axis has an even number of
    cells and the grid has more than ``coarsest`` cells; the coefficient ``k`` and the
    reaction ``c`` of a coarse cell are the averages of its children and the coarse
    operator is the same finite-volume discretization on the coarse grid
    (rediscretization, homogeneous boundary values). Transfers are cell-centred
    linear interpolation ``P`` and its scaled transpose ``R = P^T / 2^d``; smoothing is
    damped Jacobi (``omega = 2d / (2d + 1)``), ``smoothing`` sweeps before and after
    the coarse correction; the coarsest system is solved exactly by Cholesky.

    ``mv(r)`` returns one V-cycle applied to ``r`` from a zero initial guess. With
    equal pre- and post-smoothing, Jacobi smoothing and ``R`` proportional to
    ``P^T``, this map is symmetric positive definite, so it is a valid
    preconditioner for CG, MINRES and GMRES, in the forward and the adjoint solve.

    Args:
        grid: the fine grid.
        k: diffusion coefficient (float, ``grid.shape`` or ``[B, *grid.shape]``), > 0.
        bc: boundary conditions (only ``alpha``/``beta`` matter).
        reaction: optional ``c >= 0`` (same forms as ``k``).
        smoothing: Jacobi sweeps before and after each coarse correction.
        coarsest: largest number of cells solved directly.

    Example:
        >>> g = Grid((32, 32))
        >>> M = Multigrid(g, 1.0, Dirichlet())
        >>> A = lambda x: diffusion(x.reshape(-1, 32, 32), 1.0, g, Dirichlet()).reshape(x.shape)
        >>> b = torch.ones(1, 1024, dtype=torch.float64)
        >>> linear_solve(A, b, CG(rtol=1e-10), preconditioner=M, symmetric=True,
        ...              positive_definite=True).stats["num_steps"].item() <= 12
        True

    References:
        Trottenberg, Oosterlee & Schuller, Multigrid (2001), sections 2.8 and 7.7.
        Wesseling, An Introduction to Multigrid Methods (1992), chapter 5 (cell-centred
            multigrid).
    """

    symmetric = True
    positive_definite = True

    def __init__(self, grid: Grid, k, bc: Boundary, *, reaction=None, smoothing: int = 2, coarsest: int = 64,
                 like: torch.Tensor | None = None):
        if not isinstance(smoothing, int) or smoothing < 1:
            raise ValueError(f"Multigrid: smoothing must be an int >= 1, got {smoothing!r}.")
        like = _like(grid, k, like)
        self.bc = [tuple(c.homogeneous() for c in pair) for pair in boundary_sides(bc, grid.ndim)]
        self.smoothing = smoothing
        self.omega = 2.0 * grid.ndim / (2.0 * grid.ndim + 1.0)
        k = _coefficient(k, like, grid, expand=False)
        c = None if reaction is None else _coefficient(reaction, like, grid, expand=False)
        if c is not None and c.shape[0] != k.shape[0]:  # one batch size on every level
            batch = max(c.shape[0], k.shape[0])
            k, c = k.expand(batch, *grid.shape), c.expand(batch, *grid.shape)
        self.levels: list[_Level] = []
        while True:
            self.levels.append(_Level(grid, k, c, 1.0 / self._diag(grid, k, c, like)))
            if grid.size <= coarsest or not grid.can_coarsen():
                break
            grid = grid.coarsen()
            k = _average_children(k, grid.ndim)
            c = None if c is None else _average_children(c, grid.ndim)
        coarse = self.levels[-1]
        n = coarse.grid.size
        eye = torch.eye(n, dtype=like.dtype, device=like.device).reshape(n, *coarse.grid.shape)
        batch = coarse.k.shape[0]
        columns = self._apply(coarse, eye.repeat(batch, *([1] * coarse.grid.ndim)), repeat=n)
        matrix = columns.reshape(batch, n, n).transpose(1, 2)
        self.coarse_factor = torch.linalg.cholesky(0.5 * (matrix + matrix.transpose(1, 2)))

    def _diag(self, grid, k, c, like):
        diag = diffusion_diagonal(k, grid, self.bc, like)
        return diag if c is None else diag + c

    def _apply(self, level: _Level, u: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        k, c = level.k, level.reaction
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=0)
            c = None if c is None else c.repeat_interleave(repeat, dim=0)
        elif k.shape[0] == 1 and u.shape[0] > 1:
            k = k.expand(u.shape[0], *k.shape[1:])
        out = diffusion(u, k, level.grid, self.bc)
        return out if c is None else out + c * u

    def _vcycle(self, i: int, b: torch.Tensor) -> torch.Tensor:
        level = self.levels[i]
        if i == len(self.levels) - 1:
            factor = self.coarse_factor
            flat = b.reshape(b.shape[0], -1, 1)
            if factor.shape[0] != b.shape[0]:
                factor = factor.expand(b.shape[0], *factor.shape[1:])
            return torch.cholesky_solve(flat, factor).reshape(b.shape)
        w = self.omega * level.inv_diag
        x = w * b
        for _ in range(self.smoothing - 1):
            x = x + w * (b - self._apply(level, x))
        r = b - self._apply(level, x)
        rc = r
        for axis in range(level.grid.ndim):
            rc = _restrict_axis(rc, axis + 1)
        ec = self._vcycle(i + 1, rc)
        for axis in range(level.grid.ndim):
            ec = _prolong_axis(ec, axis + 1)
        x = x + ec
        for _ in range(self.smoothing):
            x = x + w * (b - self._apply(level, x))
        return x

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        b = x.reshape(x.shape[0], *self.levels[0].grid.shape)
        return self._vcycle(0, b).reshape(x.shape)

    def transpose(self) -> Multigrid:
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preconditioned(LinearSolver):
    """A linear solver with a fixed preconditioner attached.

    ``Preconditioned(solver=CG(), preconditioner=M).solve(A, b)`` runs
    ``CG().solve(A, b, preconditioner=M)``; an explicit ``preconditioner=`` argument
    still wins. This lets a preconditioner travel wherever a ``LinearSolver`` is
    accepted (``Newton(linear_solver=...)``, ``Implicit(linear_solver=...)``), so the
    Newton systems and the adjoint solve of a ``PDELayer`` share it. The adjoint
    system ``J^T w = g`` uses the same ``M``: exact for symmetric ``J``, and a good
    approximation when ``J`` is a diffusion operator plus lower-order terms.

    Args:
        solver: a Krylov solver (``CG()``, ``GMRES()``, ``MINRES()``, ``BiCGStab()``).
        preconditioner: ``M ~ A^-1`` as a ``LinearOperator``.
    """

    solver: LinearSolver
    preconditioner: LinearOperator

    def __post_init__(self):
        if not isinstance(self.solver, LinearSolver):
            raise TypeError(f"Preconditioned: solver must be a LinearSolver; got {type(self.solver).__name__}.")
        if not isinstance(self.preconditioner, LinearOperator):
            raise TypeError(
                f"Preconditioned: preconditioner must be a LinearOperator (Jacobi, Multigrid, ...); got "
                f"{type(self.preconditioner).__name__}."
            )

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        M = self.preconditioner if preconditioner is None else preconditioner
        return self.solver.solve(operator, b, x0=x0, preconditioner=M)

