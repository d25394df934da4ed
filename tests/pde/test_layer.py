"""PDELayer: reference solutions, adjoint gradients (also for non-symmetric Jacobians),
forward mode, batching and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import difflayers as dl
from difflayers import pde
from difflayers.solvers import GMRES, LU, Newton, Status
from difflayers.testing import adjoint_consistency, check_grad, dot_product_test, taylor_test

DTYPE = torch.float64
PI = math.pi


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def poisson_layer(grid, bc=pde.Dirichlet()):
    """-div(k grad u) = f, linear and symmetric, multigrid-preconditioned CG."""
    return pde.PDELayer(
        lambda u, k, f: pde.diffusion(u, k, grid, bc) - f,
        grid=grid, symmetric=True, linear=True, positive=(0,),
        preconditioner=lambda u, k, f: pde.Multigrid(grid, k, bc),
    )


def nonlinear_layer(grid, krylov=False, **kwargs):
    """-div((1 + u^2) grad u) = f: the Jacobian v -> -div((1 + u^2) grad v + 2 u v grad u)
    is not symmetric. Newton with dense LU on these small grids, or Newton-GMRES
    preconditioned by multigrid (``krylov=True``); the adjoint is GMRES either way."""
    if krylov:
        kwargs["preconditioner"] = lambda u, f: pde.Multigrid(grid, 1.0 + u**2, pde.Dirichlet())
    else:
        kwargs.setdefault("solver", Newton(linear_solver=LU()))
    return pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, pde.Dirichlet()) - f, grid=grid, **kwargs)


def bratu_layer(grid, lam=1.0):
    """-u'' - lam e^u = 0 with u = 0 on the boundary (lower branch from u0 = 0)."""
    return pde.PDELayer(
        lambda u, lam: pde.diffusion(u, 1.0, grid, pde.Dirichlet()) - lam * torch.exp(u),
        grid=grid, solver=Newton(linear_solver=LU()), symmetric=True,
    )


# ----------------------------------------------------------------------------- references


def test_poisson_manufactured_solution_converges_at_rate_two():
    errors = []
    for n in (8, 16, 32, 64):
        grid = pde.Grid((n, n))
        X, Y = grid.centers()
        exact = torch.sin(PI * X) * torch.sin(PI * Y)
        u = poisson_layer(grid)(torch.ones(n, n, dtype=DTYPE), 2 * PI**2 * exact)
        errors.append(float((u[0] - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
    assert min(rates) > 1.95 and abs(rates[-1] - 2.0) < 0.01, rates


def test_robin_and_neumann_boundaries_are_second_order():
    # u = cos(pi x / 2) + y^2 on the unit square with k = 1 + x: Dirichlet at x = 0,
    # Neumann at x = 1, Robin u + k du/dn = g at y = 0 and y = 1.
    def solve(n):
        grid = pde.Grid((n, n))
        X, Y = grid.centers()
        k = 1.0 + X
        f = 0.25 * PI**2 * (1 + X) * torch.cos(PI * X / 2) + 0.5 * PI * torch.sin(PI * X / 2) - 2 * (1 + X)
        face = (torch.arange(n, dtype=DTYPE) + 0.5) / n
        bc = [
            (pde.Dirichlet(torch.ones(n, dtype=DTYPE) * 0 + 1.0 + face**2),
             pde.Neumann(-2.0 * 0.5 * PI * torch.sin(torch.tensor(PI / 2, dtype=DTYPE)) + 0 * face)),
            (pde.Robin(1.0, 1.0, torch.cos(PI * face / 2) + 0.0 - 0.0 * face),
             pde.Robin(1.0, 1.0, torch.cos(PI * face / 2) + 1.0 + 2.0 * (1 + face))),
        ]
        layer = pde.PDELayer(lambda u, k, f: pde.diffusion(u, k, grid, bc) - f, grid=grid, symmetric=True,
                             linear=True, preconditioner=lambda u, k, f: pde.Multigrid(grid, k, bc))
        exact = torch.cos(PI * X / 2) + Y**2
        return float((layer(k, f)[0] - exact).abs().max())

    errors = [solve(n) for n in (8, 16, 32)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(rates) > 1.9, (errors, rates)


def test_bratu_midpoint_value():
    # 1-D Bratu, lambda = 1: u(1/2) = 0.140539214400 (lower branch). Cell centres hit x = 1/2
    # for odd cell counts; Richardson extrapolation of the O(h^2) values (ratio 3).
    values = []
    for n in (81, 243, 729):
        grid = pde.Grid((n,))
        u = bratu_layer(grid)(torch.ones(1, dtype=DTYPE))
        values.append(float(u[0, n // 2]))
    errors = [abs(v - 0.140539214400) for v in values]
    assert math.log(errors[0] / errors[1], 3) == pytest.approx(2.0, abs=0.05)
    extrapolated = (9 * values[2] - values[1]) / 8
    assert abs(extrapolated - 0.140539214400) < 1e-10


def test_three_dimensional_poisson_with_multigrid():
    errors = []
    for n in (8, 16):
        grid = pde.Grid((n, n, n))
        X, Y, Z = grid.centers()
        exact = torch.sin(PI * X) * torch.sin(PI * Y) * torch.sin(PI * Z)
        sol = poisson_layer(grid)(torch.ones(n, n, n, dtype=DTYPE), 3 * PI**2 * exact, return_solution=True)
        errors.append(float((sol.value[0] - exact).abs().max()))
        assert int(sol.stats["num_steps"].max()) <= 24
    assert math.log2(errors[0] / errors[1]) > 1.9


# ----------------------------------------------------------------------------- gradients


def _rates_ok(result):
    rates = [r for r in result.rate1 if not math.isnan(r)]
    return len(rates) == 4 and min(rates) >= 1.9


def test_taylor_rates_poisson():
    n = 16
    grid = pde.Grid((n, n))
    layer = poisson_layer(grid)
    gen = _gen(1)
    k = 1.0 + torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    f = torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    d = torch.randn(2, n, n, dtype=DTYPE, generator=gen)

    def J(k, f):
        return 0.5 * ((layer(k, f) - d) ** 2).sum()

    dk = 0.3 * torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    df = torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    result = taylor_test(J, (k, f), (dk, df), h0=0.5, steps=5)
    assert _rates_ok(result), str(result)


def test_taylor_rates_nonlinear_diffusion_nonsymmetric():
    n = 8
    grid = pde.Grid((n, n))
    layer = nonlinear_layer(grid)
    gen = _gen(2)
    f = 20.0 * torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    d = torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    df = 5.0 * torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    result = taylor_test(lambda f: (layer(f) * d).sum() + (layer(f) ** 4).sum(), f, df, h0=0.5, steps=5)
    assert _rates_ok(result), str(result)


def test_taylor_rates_bratu():
    grid = pde.Grid((41,))
    layer = bratu_layer(grid)
    lam = torch.tensor([1.0, 2.0], dtype=DTYPE)
    result = taylor_test(lambda lam: (layer(lam[:, None]) ** 2).sum(), lam, torch.tensor([1.0, -0.5], dtype=DTYPE),
                         h0=0.2, steps=5)
    assert _rates_ok(result), str(result)


def test_nonsymmetric_jacobian_adjoint_is_the_transpose():
    n = 8
    grid = pde.Grid((n, n))
    gen = _gen(3)
    f = 20.0 * torch.rand(1, n, n, dtype=DTYPE, generator=gen)
    layer = nonlinear_layer(grid)
    u = layer(f)
    residual = lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, pde.Dirichlet()) - f  # noqa: E731
    check = adjoint_consistency(residual, u, f)
    assert check.passed and max(check.asymmetry) > 1e-3, check

    # Dense oracle: dL/df = J^-T g (R = A(u) - f, so dR/df = -I).
    fn = lambda z: residual(z.reshape(1, n, n), f).reshape(-1)  # noqa: E731
    Jmat = torch.autograd.functional.jacobian(fn, u.detach().reshape(-1))
    assert (Jmat - Jmat.T).abs().max() > 1e-2 * Jmat.abs().max()
    g = torch.randn(n * n, dtype=DTYPE, generator=gen)
    fr = f.clone().requires_grad_(True)
    (layer(fr).reshape(-1) * g).sum().backward()
    oracle = torch.linalg.solve(Jmat.T, g)
    torch.testing.assert_close(fr.grad.reshape(-1), oracle, rtol=1e-8, atol=1e-10)
    wrong = torch.linalg.solve(Jmat, g)  # what a symmetric-Jacobian assumption would give
    assert (fr.grad.reshape(-1) - wrong).abs().max() > 1e-4 * oracle.abs().max()


def test_gradients_against_finite_differences():
    n = 8
    grid = pde.Grid((n, n))
    gen = _gen(4)
    k = 1.0 + torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    f = torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    check_grad(poisson_layer(grid), (k, f), rtol=1e-6)
    check_grad(nonlinear_layer(grid), (10 * f.abs(),), rtol=1e-6)


def test_boundary_data_is_differentiable():
    n = 8
    grid = pde.Grid((n, n))

    def residual(u, g):
        bc = [(pde.Dirichlet(g), pde.Dirichlet()), (pde.Neumann(), pde.Robin(1.0, 0.5))]
        return pde.diffusion(u, 1.0, grid, bc)

    layer = pde.PDELayer(residual, grid=grid, symmetric=True, linear=True)
    g = torch.linspace(0.0, 1.0, n, dtype=DTYPE).repeat(2, 1)  # [B, face]
    u0 = torch.zeros(2, n, n, dtype=DTYPE)
    check_grad(lambda g: layer(g, u0=u0), (g,), rtol=1e-6)


def test_forward_mode_matches_finite_differences_and_reverse_mode():
    n = 8
    grid = pde.Grid((n, n))
    gen = _gen(5)
    layer = nonlinear_layer(grid, krylov=True)
    f = 10.0 * torch.rand(2, n, n, dtype=DTYPE, generator=gen)
    v = torch.randn(2, n, n, dtype=DTYPE, generator=gen)
    u, tangent = torch.func.jvp(layer, (f,), (v,))
    eps = 1e-6
    with torch.no_grad():
        fd = (layer(f + eps * v) - layer(f - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    assert dot_product_test(layer, (f,), rtol=1e-8).passed


def test_batched_equals_loop():
    n = 8
    grid = pde.Grid((n, n))
    gen = _gen(6)
    f = 10.0 * torch.rand(3, n, n, dtype=DTYPE, generator=gen, requires_grad=True)
    layer = nonlinear_layer(grid, krylov=True)
    u = layer(f)
    (gb,) = torch.autograd.grad((u**2).sum(), f)
    for i in range(3):
        fi = f[i : i + 1].detach().requires_grad_(True)
        ui = layer(fi)
        (gi,) = torch.autograd.grad((ui**2).sum(), fi)
        torch.testing.assert_close(ui, u[i : i + 1], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gi, gb[i : i + 1], rtol=1e-7, atol=1e-10)


def test_implicit_equals_unrolled_at_convergence():
    n = 6
    grid = pde.Grid((n, n))
    f = 10.0 * torch.rand(2, n, n, dtype=DTYPE, generator=_gen(7))
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        layer = nonlinear_layer(grid, adjoint=adjoint)
        fr = f.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((layer(fr) ** 3).sum(), fr)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-10)


def test_no_grad_and_unbatched_theta():
    n = 8
    grid = pde.Grid((n, n))
    with torch.no_grad():
        u = poisson_layer(grid)(torch.ones(n, n, dtype=DTYPE), torch.ones(n, n, dtype=DTYPE))
    assert u.shape == (1, n, n) and not u.requires_grad
    k = torch.ones(n, n, dtype=DTYPE, requires_grad=True)
    f = torch.ones(3, n, n, dtype=DTYPE)
    u = poisson_layer(grid)(k, f)
    u.sum().backward()
    assert k.grad.shape == (n, n) and torch.isfinite(k.grad).all()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    n = 8
    grid = pde.Grid((n, n))
    layer = poisson_layer(grid)
    ones = torch.ones(n, n, dtype=DTYPE)
    with pytest.raises(ValueError, match="does not match the grid"):
        layer(torch.ones(n, n + 1, dtype=DTYPE), ones)
    with pytest.raises(ValueError, match="does not match the grid"):
        layer(ones, ones, u0=torch.zeros(1, n, n - 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="strictly positive"):
        layer(-ones, ones)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(ones, ones * float("nan"))
    with pytest.raises(ValueError, match="device"):
        layer(ones, torch.ones(n, n, dtype=DTYPE, device="meta"))
    with pytest.raises(TypeError, match="dtype"):
        layer(ones, ones.float())
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.ones(2, n, n, dtype=DTYPE), ones, u0=torch.zeros(3, n, n, dtype=DTYPE))
    bad = pde.PDELayer(lambda u, f: u.sum(dim=1), grid=grid)
    with pytest.raises(ValueError, match="shaped like u"):
        bad(ones)
    with pytest.raises(TypeError, match="Newton"):
        pde.PDELayer(lambda u: u, solver=GMRES())
    with pytest.raises(ValueError, match="positive ints"):
        pde.Grid((0, 4))


def test_newton_divergence_gives_statuses_and_finite_gradients():
    # u^2 + c = 0 has no real root for c > 0: Newton's line search fails for that sample.
    layer = pde.PDELayer(lambda u, c: u**2 + c, solver=Newton(linear_solver=LU(), max_steps=30), throw=False)
    c = torch.tensor([[-4.0, -1.0], [1.0, 2.0]], dtype=DTYPE, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = layer(c, u0=torch.ones(2, 2, dtype=DTYPE), return_solution=True)
    assert sol.status[0] == Status.SUCCESS and sol.status[1] != Status.SUCCESS
    sol.value.sum().backward()
    assert torch.isfinite(c.grad).all()
    torch.testing.assert_close(c.grad[0], -0.5 / torch.tensor([2.0, 1.0], dtype=DTYPE))
    assert (c.grad[1] == 0).all()
    strict = pde.PDELayer(lambda u, c: u**2 + c, solver=Newton(linear_solver=LU(), max_steps=30))
    with pytest.raises(dl.ConvergenceError, match="sample 1"):
        strict(c, u0=torch.ones(2, 2, dtype=DTYPE))


# ----------------------------------------------------------------------------- second order


def test_hessian_vector_product_matches_finite_differences_of_gradients():
    n = 6
    grid = pde.Grid((n, n))
    layer = nonlinear_layer(grid)
    gen = _gen(8)
    f = 5.0 * torch.rand(1, n, n, dtype=DTYPE, generator=gen)
    k = 1.0 + torch.rand(1, n, n, dtype=DTYPE, generator=gen)
    v = torch.randn(1, n, n, dtype=DTYPE, generator=gen)
    loss = lambda u, f: (u**3).sum() + (u * f).sum()  # noqa: E731 (depends on theta directly too)

    def gradient(f):
        f = f.detach().requires_grad_(True)
        return torch.autograd.grad(loss(layer(f), f), f)[0]

    value, (hv,) = pde.hessian_vector_product(layer, loss, (f,), (v,))
    eps = 1e-5
    fd = (gradient(f + eps * v) - gradient(f - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8 * float(fd.abs().max()))
    assert float(value) == pytest.approx(float(loss(layer(f), f)), rel=1e-12)

    # two arguments, a symmetric layer, a zero direction for one of them
    sym = poisson_layer(grid)
    loss2 = lambda u, k, f: (u**2 * k).sum()  # noqa: E731
    _, (hk, hf) = pde.hessian_vector_product(sym, loss2, (k, f), (v, None))

    def gradient2(k):
        k = k.detach().requires_grad_(True)
        return torch.autograd.grad(loss2(sym(k, f), k, f), k)[0]

    fd = (gradient2(k + eps * v) - gradient2(k - eps * v)) / (2 * eps)
    torch.testing.assert_close(hk, fd, rtol=1e-6, atol=1e-8 * float(fd.abs().max()))
    assert hf.shape == f.shape
