"""Implicit Euler and Crank-Nicolson: heat equation against closed forms, discrete adjoint
gradients against finite differences, checkpointing changes nothing but memory."""

from __future__ import annotations

import math

import pytest
import torch

from difflayers import pde
from difflayers.solvers import LU, Newton
from difflayers.testing import check_grad

DTYPE = torch.float64
PI = math.pi


def heat(grid):
    return lambda u: pde.diffusion(u, 1.0, grid, pde.Dirichlet())


@pytest.mark.parametrize("scheme, amplification", [
    (pde.ImplicitEuler(), lambda z: 1.0 / (1.0 + z)),
    (pde.CrankNicolson(), lambda z: (1.0 - z / 2) / (1.0 + z / 2)),
])
def test_heat_equation_matches_the_discrete_closed_form(scheme, amplification):
    # sin(pi x) is an eigenvector of the cell-centred Dirichlet Laplacian with eigenvalue
    # mu = (4 / h^2) sin^2(pi h / 2): u_N = g(dt mu)^N sin(pi x) exactly.
    n, dt, steps = 32, 0.01, 20
    grid = pde.Grid((n,))
    (x,) = grid.centers()
    u0 = torch.sin(PI * x)[None]
    u = pde.integrate(heat(grid), u0, dt=dt, steps=steps, scheme=scheme, symmetric=True, linear=True)
    mu = 4 * n**2 * math.sin(PI / (2 * n)) ** 2
    torch.testing.assert_close(u, amplification(dt * mu) ** steps * u0, rtol=1e-9, atol=1e-12)
    # and the continuous solution exp(-pi^2 t) sin(pi x) up to O(h^2 + dt^p)
    assert (u - math.exp(-PI**2 * dt * steps) * u0).abs().max() < 2e-2


def test_crank_nicolson_is_second_order_in_time():
    grid = pde.Grid((16,))
    (x,) = grid.centers()
    u0 = torch.sin(PI * x)[None] + torch.sin(3 * PI * x)[None]
    ref = pde.integrate(heat(grid), u0, dt=0.1 / 256, steps=256, symmetric=True, linear=True)
    errors = [float((pde.integrate(heat(grid), u0, dt=0.1 / s, steps=s, symmetric=True, linear=True) - ref)
                    .abs().max()) for s in (8, 16, 32)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(rates) > 1.9, rates


def test_discrete_adjoint_gradient_matches_finite_differences():
    n = 8
    grid = pde.Grid((n, n))
    gen = torch.Generator().manual_seed(0)
    k = (1.0 + torch.rand(2, n, n, dtype=DTYPE, generator=gen)).requires_grad_(True)
    u0 = torch.rand(2, n, n, dtype=DTYPE, generator=gen).requires_grad_(True)

    def final(k, u0):
        return pde.integrate(lambda u, k: pde.diffusion(u, k, grid, pde.Dirichlet()), u0, k, dt=0.01, steps=6,
                             symmetric=True, linear=True)

    check_grad(final, (k, u0), rtol=1e-6)


def test_nonlinear_steps_use_newton_and_checkpointing_changes_nothing():
    n = 6
    grid = pde.Grid((n, n))
    gen = torch.Generator().manual_seed(1)
    f = (5.0 * torch.rand(2, n, n, dtype=DTYPE, generator=gen)).requires_grad_(True)
    u0 = torch.zeros(2, n, n, dtype=DTYPE)
    N = lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, pde.Dirichlet()) - f  # noqa: E731
    grads = []
    for every in (0, 2):
        u = pde.integrate(N, u0, f, dt=0.05, steps=5, scheme=pde.ImplicitEuler(),
                          solver=Newton(linear_solver=LU()), checkpoint_every=every)
        grads.append(torch.autograd.grad((u**2).sum(), f)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    check_grad(lambda f: pde.integrate(N, u0, f, dt=0.05, steps=2, solver=Newton(linear_solver=LU())), (f,),
               rtol=1e-6)


def test_bad_time_arguments():
    grid = pde.Grid((4,))
    u0 = torch.zeros(1, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match="dt"):
        pde.integrate(heat(grid), u0, dt=-1.0, steps=2)
    with pytest.raises(ValueError, match="theta"):
        pde.ThetaMethod(theta=0.2)


def test_preconditioned_steps_match_unpreconditioned():
    n = 16
    grid = pde.Grid((n, n))
    gen = torch.Generator().manual_seed(2)
    k = 1.0 + torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    u0 = torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    N = lambda u, k: pde.diffusion(u, k, grid, pde.Dirichlet())  # noqa: E731
    plain = pde.integrate(N, u0, k, dt=0.01, steps=3, symmetric=True, linear=True)
    # the step Jacobian is I + theta dt A: a diffusion-reaction operator
    mg = pde.integrate(N, u0, k, dt=0.01, steps=3, symmetric=True, linear=True,
                       preconditioner=lambda u, u_prev, dt, k: pde.Multigrid(grid, 0.5 * dt * k, pde.Dirichlet(),
                                                                              reaction=1.0))
    torch.testing.assert_close(mg, plain, rtol=1e-6, atol=1e-8)  # both solves stop at rtol = 1e-10


def test_taylor_rates_of_the_time_stepping_adjoint():
    from difflayers.testing import taylor_test

    grid = pde.Grid((8, 8))
    gen = torch.Generator().manual_seed(3)
    k = 1.0 + torch.rand(2, 8, 8, dtype=DTYPE, generator=gen)
    u0 = torch.rand(2, 8, 8, dtype=DTYPE, generator=gen)

    def J(k):
        u = pde.integrate(lambda u, k: pde.diffusion(u, k, grid, pde.Dirichlet()), u0, k, dt=0.01, steps=6,
                          symmetric=True, linear=True)
        return (u**2).sum()

    result = taylor_test(J, k, 0.3 * torch.randn(2, 8, 8, dtype=DTYPE, generator=gen), h0=0.5, steps=5)
    rates = [r for r in result.rate1 if not math.isnan(r)]
    assert len(rates) == 4 and min(rates) >= 1.9, str(result)
