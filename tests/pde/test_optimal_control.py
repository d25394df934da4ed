"""Optimal control of Poisson: min 1/2 ||u - d||^2 + alpha/2 ||f||^2 s.t. -lap u = f, u = 0 on the
boundary of the unit square, d = sin(pi x) sin(pi y) / (2 pi^2). The optimum is
J* = alpha / (8 (1 + 4 alpha pi^4)) = 1.249513144e-7 at alpha = 1e-6; the reduced problem
is solved by CG with Hessian-vector products from the PDELayer adjoint."""

from __future__ import annotations

import math

import torch

from difflayers import pde
from difflayers.solvers import CG, MatvecOperator, linear_solve
from difflayers.testing import taylor_test

DTYPE = torch.float64
PI = math.pi
ALPHA = 1e-6


def control_problem(n):
    grid = pde.Grid((n, n))
    X, Y = grid.centers()
    d = (torch.sin(PI * X) * torch.sin(PI * Y) / (2 * PI**2))[None]
    layer = pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0, grid, pde.Dirichlet()) - f, grid=grid,
                         symmetric=True, linear=True,
                         preconditioner=lambda u, f: pde.Multigrid(grid, 1.0, pde.Dirichlet()))
    h2 = grid.cell_volume

    def objective(f):
        u = layer(f)
        return 0.5 * h2 * ((u - d) ** 2).sum() + 0.5 * ALPHA * h2 * (f**2).sum()

    return grid, objective


def optimal_value(n):
    grid, objective = control_problem(n)

    def gradient(f):
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            return torch.autograd.grad(objective(f), f)[0]

    g0 = gradient(torch.zeros(1, n, n, dtype=DTYPE))
    scale = 1.0 / (ALPHA * grid.cell_volume)  # reduced Hessian scaled to eigenvalues in [1, ~6e3]
    hessian = MatvecOperator(lambda v: scale * (gradient(v.reshape(1, n, n)) - g0).reshape(1, -1),
                             symmetric=True, positive_definite=True)
    f = linear_solve(hessian, -scale * g0.reshape(1, -1), CG(rtol=1e-8, atol=0.0)).value.reshape(1, n, n)
    return float(objective(f))


def test_optimal_objective_converges_at_second_order():
    exact = ALPHA / (8 * (1 + 4 * ALPHA * PI**4))
    assert abs(exact - 1.249513144e-7) < 1e-16
    values = [optimal_value(n) for n in (8, 16, 32, 64)]
    errors = [abs(v - exact) for v in values]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
    assert min(rates) > 1.95, rates
    assert errors[-1] < 5e-4 * exact


def test_reduced_gradient_taylor_rates():
    n = 16
    _, objective = control_problem(n)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(1, n, n, dtype=DTYPE, generator=gen)
    df = torch.randn(1, n, n, dtype=DTYPE, generator=gen)
    result = taylor_test(objective, f, df, h0=1.0, steps=5)
    rates = [r for r in result.rate1 if not math.isnan(r)]
    assert len(rates) == 4 and min(rates) >= 1.9, str(result)
