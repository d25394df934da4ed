"""Grid operators and preconditioners: symmetry, diagonals, multigrid efficiency."""

from __future__ import annotations

import pytest
import torch

from difflayers import pde
from difflayers.solvers import CG, GMRES, linear_solve

DTYPE = torch.float64
MIXED = [(pde.Dirichlet(), pde.Neumann()), (pde.Robin(2.0, 0.5), pde.Dirichlet())]


def _matrix(grid, k, bc):
    n = grid.size
    eye = torch.eye(n, dtype=DTYPE).reshape(n, *grid.shape)
    kk = k.expand(n, *grid.shape) if isinstance(k, torch.Tensor) else k
    return pde.diffusion(eye, kk, grid, bc).reshape(n, n).T


@pytest.mark.parametrize("shape", [(7,), (6, 5), (4, 3, 5)])
def test_linear_part_is_symmetric_positive_definite_with_exact_diagonal(shape):
    grid = pde.Grid(shape)
    k = 0.5 + torch.rand(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    bc = MIXED[0][0] if len(shape) != 2 else MIXED
    A = _matrix(grid, k, bc)
    torch.testing.assert_close(A, A.T)
    assert torch.linalg.eigvalsh(A).min() > 0
    diag = pde.diffusion_diagonal(k, grid, bc, torch.zeros(1, *shape, dtype=DTYPE))
    torch.testing.assert_close(diag.reshape(-1), torch.diagonal(A))
    M = pde.Jacobi(grid, k, bc)
    x = torch.randn(1, grid.size, dtype=DTYPE)
    torch.testing.assert_close(M.mv(x), x / torch.diagonal(A))


def test_multigrid_is_symmetric_positive_definite():
    grid = pde.Grid((16, 8))
    k = 0.5 + torch.rand(2, 16, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    M = pde.Multigrid(grid, k, MIXED, reaction=0.3, coarsest=4)
    assert [lv.grid.shape for lv in M.levels] == [(16, 8), (8, 4), (4, 2), (2, 1)]
    n = grid.size
    eye = torch.eye(n, dtype=DTYPE)
    mats = torch.stack([M.mv(eye[i].expand(2, n).contiguous()) for i in range(n)], dim=2)  # [2, n, n]
    torch.testing.assert_close(mats, mats.transpose(1, 2))
    assert torch.linalg.eigvalsh(mats).min() > 0


def test_multigrid_iterations_do_not_grow_with_the_grid():
    counts = {}
    for n in (16, 32, 64):
        grid = pde.Grid((n, n))
        k = torch.exp(0.5 * torch.randn(2, n, n, dtype=DTYPE, generator=torch.Generator().manual_seed(n)))
        A = lambda x, k=k, grid=grid, n=n: pde.diffusion(x.reshape(-1, n, n), k, grid, pde.Dirichlet()).reshape(x.shape)  # noqa: E731
        b = torch.ones(2, n * n, dtype=DTYPE)
        sol = linear_solve(A, b, CG(), preconditioner=pde.Multigrid(grid, k, pde.Dirichlet()), symmetric=True,
                           positive_definite=True)
        jacobi = linear_solve(A, b, CG(), preconditioner=pde.Jacobi(grid, k, pde.Dirichlet()), symmetric=True,
                              positive_definite=True)
        counts[n] = (int(sol.stats["num_steps"].max()), int(jacobi.stats["num_steps"].max()))
    assert all(mg <= 24 for mg, _ in counts.values()), counts
    assert counts[64][1] > 5 * counts[64][0]


def test_multigrid_preconditions_gmres_on_a_nonsymmetric_jacobian():
    n = 16
    grid = pde.Grid((n, n))
    u = torch.rand(1, n, n, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    # Jacobian of -div((1 + u^2) grad u) at u, applied matrix-free.
    J = lambda v: torch.func.jvp(  # noqa: E731
        lambda w: pde.diffusion(w, 1.0 + w**2, grid, pde.Dirichlet()), (u,), (v.reshape(1, n, n),))[1].reshape(1, -1)
    b = torch.ones(1, n * n, dtype=DTYPE)
    plain = linear_solve(J, b, GMRES(restart=40, max_steps=2000))
    mg = linear_solve(J, b, GMRES(restart=40), preconditioner=pde.Multigrid(grid, 1.0 + u**2, pde.Dirichlet()))
    assert int(mg.stats["num_steps"]) * 3 < int(plain.stats["num_steps"])
    torch.testing.assert_close(mg.value, plain.value, rtol=1e-7, atol=1e-10)


def test_grid_checks():
    grid = pde.Grid((4, 6), lower=(0.0, -1.0), upper=(2.0, 1.0))
    assert grid.spacing == (0.5, 1 / 3) and grid.size == 24 and grid.coarsen().shape == (2, 3)
    with pytest.raises(ValueError, match="even"):
        grid.coarsen().coarsen()
    with pytest.raises(ValueError, match="upper > lower"):
        pde.Grid((4,), lower=(1.0,), upper=(0.0,))
    with pytest.raises(ValueError, match="does not match the grid"):
        pde.diffusion(torch.zeros(1, 4, 5, dtype=DTYPE), 1.0, grid, pde.Dirichlet())
    with pytest.raises(ValueError, match="pairs"):
        pde.diffusion(torch.zeros(1, 4, 6, dtype=DTYPE), 1.0, grid, [(pde.Dirichlet(), pde.Dirichlet())])
    with pytest.raises(ValueError, match="alpha"):
        pde.Robin(0.0, 0.0)
