"""Bad-input hardening of ``dl.pde``: ``PDELayer``, grids and operators, ``integrate`` and
the topology-optimization entry points. A clear exception naming the argument, or a
per-sample status; failed samples come back detached (zero, never NaN, gradients)."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflayers as dl
from difflayers import solvers as S
from difflayers.pde import (
    CrankNicolson,
    Dirichlet,
    ElasticityQ4,
    Grid,
    Neumann,
    PDELayer,
    Robin,
    ThetaMethod,
    compliance,
    diffusion,
    integrate,
    topology_optimization,
)

D = torch.float64
STATUSES = {int(s) for s in dl.Status}
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
GRID = Grid((5, 4))


def _layer(kind, **kwargs):
    if kind == "linear":
        return PDELayer(lambda u, k, f: diffusion(u, k, GRID, Dirichlet()) - f, grid=GRID, symmetric=True,
                        linear=True, positive=(0,), **kwargs)
    return PDELayer(lambda u, k, f: diffusion(u, k, GRID, Dirichlet()) + u**3 - f, grid=GRID, symmetric=True,
                    positive=(0,), **kwargs)


@FAST
@given(
    st.sampled_from(["linear", "nonlinear"]),
    st.integers(0, 3),
    st.sampled_from([None, "k nan", "f inf", "u0 nan", "k zero", "k negative"]),
    st.sampled_from(["default", "max_steps=0", "max_steps=1", "zero_tol"]),
)
def test_pde_layer_fails_clearly_or_reports_status(kind, batch, poison, budget):
    newton = S.Newton(linear_solver=S.CG())
    newton = {"default": newton, "max_steps=0": S.Newton(linear_solver=S.CG(), max_steps=0),
              "max_steps=1": S.Newton(linear_solver=S.CG(), max_steps=1),
              "zero_tol": S.Newton(linear_solver=S.CG(), rtol=0.0, atol=0.0, max_steps=6)}[budget]
    layer = _layer(kind, solver=newton, throw=False)
    k = torch.linspace(0.5, 2.0, batch * GRID.size, dtype=D).reshape(batch, *GRID.shape)
    f = torch.ones(GRID.shape, dtype=D)
    u0 = torch.zeros(batch, *GRID.shape, dtype=D)
    if batch and poison == "k nan":
        k[0, 1, 1] = math.nan
    if poison == "f inf":
        f = f.clone()
        f[2, 0] = math.inf
    if batch and poison == "u0 nan":
        u0[-1, 0, 0] = math.nan
    if batch and poison == "k zero":
        k[0, 0, 0] = 0.0
    if batch and poison == "k negative":
        k[-1] = -k[-1]
    k.requires_grad_(True)
    run = lambda: layer(k, f, u0=u0, return_solution=True)  # noqa: E731
    if poison == "f inf":
        with pytest.raises(ValueError, match=r"PDELayer: theta\[1\] contains NaN or Inf"):
            run()
        return
    if batch and poison is not None:
        match = {"k nan": r"theta\[0\] contains NaN or Inf", "u0 nan": "u0 contains NaN or Inf",
                 "k zero": r"theta\[0\] must be strictly positive", "k negative": r"theta\[0\] must be strictly"}
        with pytest.raises(ValueError, match="PDELayer: " + match[poison]):
            run()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = run()
        sol.value.sum().backward()
    assert sol.value.shape == (batch, *GRID.shape) and sol.status.shape == (batch,)
    assert set(sol.status.tolist()) <= STATUSES
    assert bool(torch.isfinite(sol.value).all())
    assert k.grad is not None and bool(torch.isfinite(k.grad).all())
    failed = ~sol.converged
    assert bool((k.grad[failed] == 0).all())  # failed samples are detached: zero gradient, never NaN
    if kind == "linear" or budget == "default":  # linear=True is one linear solve: no Newton budget
        assert bool(sol.converged.all()), sol.status
    elif budget == "max_steps=0":
        assert bool((sol.status == int(dl.Status.MAX_STEPS)).all())
        assert bool((sol.stats["num_steps"] == 0).all())
        torch.testing.assert_close(sol.value.detach(), u0)
    else:
        assert bool((sol.stats["num_steps"] <= newton.max_steps).all())
        assert set(sol.status.tolist()) <= {int(dl.Status.SUCCESS), int(dl.Status.MAX_STEPS)}
    if bool(failed.any()):
        assert any("did not converge" in str(w.message) for w in caught)


def test_pde_layer_failures_raise_with_throw():
    layer = _layer("nonlinear", solver=S.Newton(linear_solver=S.CG(), max_steps=1))
    with pytest.raises(dl.ConvergenceError, match="PDELayer: 2 of 2 samples did not succeed") as info:
        layer(torch.ones(2, *GRID.shape, dtype=D), torch.ones(GRID.shape, dtype=D))
    assert info.value.indices == [0, 1] and info.value.solution.value.shape == (2, *GRID.shape)


@pytest.mark.parametrize(
    "name, residual, status",
    [
        # a coefficient that is not declared positive and vanishes: 0/0 in the face means
        ("undeclared zero coefficient", lambda u, k: diffusion(u, 0 * k, GRID, Dirichlet()) - k, dl.Status.NONFINITE),
        # pure Neumann: the operator is singular (constants), CG breaks down on it
        ("all-Neumann operator", lambda u, k: diffusion(u, 1.0, GRID, Neumann()) - k, dl.Status.BREAKDOWN),
    ],
)
def test_singular_problems_end_with_a_failure_status(name, residual, status):
    layer = PDELayer(residual, grid=GRID, symmetric=True, linear=True, throw=False)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = layer(torch.ones(2, *GRID.shape, dtype=D), return_solution=True)  # zero k; a source without mean zero
    assert sol.status.tolist() == [int(status)] * 2
    assert bool(torch.isfinite(sol.value).all())


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_pde_layer_empty_batch_and_batch_of_one(kind):
    layer = _layer(kind)
    k0 = torch.ones(0, *GRID.shape, dtype=D, requires_grad=True)
    f = torch.ones(GRID.shape, dtype=D)
    u = layer(k0, f)
    assert u.shape == (0, *GRID.shape)
    u.sum().backward()
    assert k0.grad.shape == (0, *GRID.shape)
    k = torch.linspace(0.5, 2.0, 2 * GRID.size, dtype=D).reshape(2, *GRID.shape)
    torch.testing.assert_close(layer(k[1:], f), layer(k, f)[1:])
    # without a grid, z0 says the batch
    plain = PDELayer(lambda u, c: u**3 + u - c)
    assert plain(torch.ones(0, 3, dtype=D), u0=torch.zeros(0, 3, dtype=D)).shape == (0, 3)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("theta grid shape", ValueError, r"the coefficient k has shape \(2, 4, 4\), which does not match the grid"),
        ("theta batch", ValueError, r"PDELayer: theta\[0\] has batch size 3 but u0 has 2"),
        ("u0 shape", ValueError, r"PDELayer: u0 has shape \(2, 4, 5\), which does not match the grid"),
        ("theta dtype", TypeError, r"PDELayer: theta\[1\] has dtype torch.float32 but u0 has torch.float64"),
        ("theta device", ValueError, r"PDELayer: theta\[1\] is on meta but u0 is on cpu"),
        ("theta type", TypeError, r"PDELayer: theta\[1\] is a float"),
        ("u0 integer", TypeError, "PDELayer: u0 must be a floating-point tensor"),
        ("no u0 no grid", ValueError, "PDELayer: pass u0="),
        ("positive index", ValueError, r"PDELayer: positive=\(5,\) names arguments beyond the 2 given"),
        ("residual shape", ValueError, r"PDELayer: the residual returned \(2, 20\); it must return a tensor shaped like u"),
        ("theta shape in residual", ValueError, r"PDELayer: the residual failed on its first evaluation, with u of shape "
                                                r"\(2, 3\) and theta of shapes \[\(3, 3\)\]"),
        ("residual type", TypeError, "PDELayer: residual must be callable"),
        ("solver", TypeError, "PDELayer: solver must be a difflayers.solvers.Newton"),
        ("adjoint", TypeError, "PDELayer: adjoint must be Implicit"),
        ("jacobian without linear", ValueError, "PDELayer: jacobian= .* needs linear=True"),
        ("grid type", TypeError, "PDELayer: grid must be a difflayers.pde.Grid"),
    ],
)
def test_pde_layer_rejects_malformed_inputs(case, error, match):
    residual = lambda u, k, f: diffusion(u, k, GRID, Dirichlet()) - f  # noqa: E731
    k, f = torch.ones(2, *GRID.shape, dtype=D), torch.ones(GRID.shape, dtype=D)
    u0 = torch.zeros(2, *GRID.shape, dtype=D)
    build, call, kwargs = dict(grid=GRID, symmetric=True, linear=True, positive=(0,)), [k, f], {"u0": u0}
    if case == "theta grid shape":
        call[0] = torch.ones(2, 4, 4, dtype=D)
    elif case == "theta batch":
        call[0] = torch.ones(3, *GRID.shape, dtype=D)
    elif case == "u0 shape":
        kwargs["u0"] = torch.zeros(2, 4, 5, dtype=D)
    elif case == "theta dtype":
        call[1] = f.float()
    elif case == "theta device":
        call[1] = torch.empty_like(f, device="meta")
    elif case == "theta type":
        call[1] = 1.0
    elif case == "u0 integer":
        kwargs["u0"] = u0.long()
    elif case == "no u0 no grid":
        build.pop("grid")
        kwargs = {}
    elif case == "positive index":
        build["positive"] = (5,)
    elif case == "residual shape":
        residual = lambda u, k, f: u.reshape(u.shape[0], -1)  # noqa: E731
    elif case == "theta shape in residual":
        build = {}
        residual = lambda u, c: u**3 + u - c  # noqa: E731
        call, kwargs = [torch.ones(3, 3, dtype=D)], {"u0": torch.zeros(2, 3, dtype=D)}
    elif case == "residual type":
        residual = "R"
    elif case == "solver":
        build["solver"] = S.Anderson()
    elif case == "adjoint":
        build["adjoint"] = dl.OneStep()
    elif case == "jacobian without linear":
        build.update(linear=False, jacobian=lambda u, k, f: None)
    elif case == "grid type":
        build["grid"] = (5, 4)
    with pytest.raises(error, match=match):
        PDELayer(residual, **build)(*call, **kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: Grid((0, 3)), ValueError, "Grid: shape must be 1 to 3 positive ints"),
        (lambda: Grid((2, 2, 2, 2)), ValueError, "Grid: shape must be 1 to 3 positive ints"),
        (lambda: Grid((4,), lower=(1.0,), upper=(0.0,)), ValueError, "Grid: lower and upper"),
        (lambda: Robin(-1.0, 0.0), ValueError, "Robin: need alpha >= 0, beta >= 0"),
        (lambda: Robin(0.0, 0.0), ValueError, "Robin: need alpha >= 0, beta >= 0 and alpha \\+ beta > 0"),
        (lambda: Robin(math.nan, 1.0), ValueError, "Robin: need alpha >= 0"),
        (lambda: Dirichlet(math.nan), ValueError, "Robin: value must be finite"),
        (lambda: Neumann(math.inf), ValueError, "Robin: value must be finite"),
        (lambda: diffusion(torch.zeros(1, 4, 5, dtype=D), 1.0, GRID, Dirichlet()), ValueError,
         r"u has shape \(1, 4, 5\), which does not match the grid of shape \(5, 4\)"),
        (lambda: diffusion(torch.zeros(2, 5, 4, dtype=D), torch.ones(3, 5, 4, dtype=D), GRID, Dirichlet()),
         ValueError, "the coefficient k has batch size 3 but the field has 2"),
        (lambda: diffusion(torch.zeros(1, 5, 4, dtype=D), 1.0, GRID, [(Dirichlet(), Dirichlet())]), ValueError,
         "bc must be one condition"),
        (lambda: ThetaMethod(theta=0.3), ValueError, r"ThetaMethod: theta must be in \[0.5, 1\]"),
    ],
)
def test_grids_conditions_and_operators_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_operators_on_an_empty_batch():
    assert diffusion(torch.zeros(0, *GRID.shape, dtype=D), 1.0, GRID, Dirichlet(1.0)).shape == (0, *GRID.shape)
    assert dl.pde.diffusion_diagonal(torch.ones(0, *GRID.shape, dtype=D), GRID, Dirichlet(),
                                     torch.zeros(0, *GRID.shape, dtype=D)).shape == (0, *GRID.shape)


# --------------------------------------------------------------------- time stepping


def _heat(u, k):
    return diffusion(u, k, GRID, Dirichlet())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dt=0.0), ValueError, "integrate: dt must be a positive finite number; got 0.0"),
        (dict(dt=-0.1), ValueError, "integrate: dt must be a positive finite number"),
        (dict(dt=math.nan), ValueError, "integrate: dt must be a positive finite number; got nan"),
        (dict(dt=math.inf), ValueError, "integrate: dt must be a positive finite number"),
        (dict(steps=-1), ValueError, "integrate: steps must be an int >= 0"),
        (dict(steps=2.0), ValueError, "integrate: steps must be an int >= 0"),
        (dict(checkpoint_every=-1), ValueError, "integrate: checkpoint_every must be None or an int >= 0"),
        (dict(scheme="euler"), TypeError, "integrate: scheme must be ImplicitEuler"),
        (dict(u0="nan"), ValueError, r"PDELayer: theta\[0\] contains NaN or Inf"),
        (dict(k="nan"), ValueError, r"PDELayer: theta\[2\] contains NaN or Inf"),
        (dict(k="float32"), TypeError, r"PDELayer: theta\[2\] has dtype torch.float32"),
        (dict(u0="int"), TypeError, "PDELayer: u0 must be a floating-point tensor"),
    ],
)
def test_integrate_rejects_malformed_inputs(kwargs, error, match):
    u0, k = torch.rand(2, *GRID.shape, dtype=D), torch.ones(GRID.shape, dtype=D)
    if kwargs.get("u0") == "nan":
        u0[1, 2, 2] = math.nan
    if kwargs.get("u0") == "int":
        u0 = u0.long()
    if kwargs.get("k") == "nan":
        k[0, 0] = math.nan
    if kwargs.get("k") == "float32":
        k = k.float()
    options = dict(dt=0.01, steps=2, symmetric=True, linear=True)
    options.update({key: v for key, v in kwargs.items() if key not in ("u0", "k")})
    with pytest.raises(error, match=match):
        integrate(_heat, u0, k, **options)


def test_integrate_edge_sizes():
    u0, k = torch.rand(2, *GRID.shape, dtype=D), torch.ones(GRID.shape, dtype=D, requires_grad=True)
    # steps=0 is the identity
    assert integrate(_heat, u0, k, dt=0.01, steps=0, symmetric=True, linear=True) is u0
    # an empty batch gives an empty state and a zero gradient for shared coefficients
    u = integrate(_heat, u0[:0], k, dt=0.01, steps=3, symmetric=True, linear=True, scheme=CrankNicolson())
    assert u.shape == (0, *GRID.shape)
    u.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    # a batch of one equals its row of the batch
    both = integrate(_heat, u0, k.detach(), dt=0.01, steps=2, symmetric=True, linear=True)
    one = integrate(_heat, u0[1:], k.detach(), dt=0.01, steps=2, symmetric=True, linear=True)
    torch.testing.assert_close(one, both[1:])


def test_integrate_non_convergence_raises():
    newton = S.Newton(linear_solver=S.CG(), max_steps=1)
    with pytest.raises(dl.ConvergenceError, match="PDELayer"):
        integrate(lambda u, k: _heat(u, k) + u**3, torch.rand(1, *GRID.shape, dtype=D) + 5.0,
                  torch.ones(GRID.shape, dtype=D), dt=0.1, steps=2, solver=newton, symmetric=True)


# --------------------------------------------------------------------- topology optimization


@pytest.fixture(scope="module")
def fem():
    return ElasticityQ4.cantilever(6, 4)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("negative", ValueError, "compliance: densities must be >= 0"),
        ("nan", ValueError, r"PDELayer: theta\[0\] contains NaN or Inf"),
        ("dtype", TypeError, "compliance: x has dtype torch.float32 but the discretization has torch.float64"),
        ("shape", ValueError, r"ElasticityQ4: densities must be shaped \[B, 4, 6\]"),
    ],
)
def test_compliance_rejects_bad_densities(fem, case, error, match):
    x = torch.full((2, 4, 6), 0.5, dtype=D)
    if case == "negative":
        x[1, 0, 0] = -0.1
    elif case == "nan":
        x[0, 1, 1] = math.nan
    elif case == "dtype":
        x = x.float()
    elif case == "shape":
        x = x[:, :3]
    with pytest.raises(error, match=match):
        compliance(fem, x)


def test_compliance_edge_sizes(fem):
    x = torch.full((2, 4, 6), 0.5, dtype=D)
    x[1] = 0.8
    c = compliance(fem, x)
    assert c.shape == (2,) and bool(torch.isfinite(c).all()) and bool((c > 0).all())
    torch.testing.assert_close(compliance(fem, x[1:]), c[1:])
    torch.testing.assert_close(compliance(fem, x[1]), c[1:])  # an unbatched design
    x0 = torch.zeros(0, 4, 6, dtype=D, requires_grad=True)
    c0 = compliance(fem, x0)
    assert c0.shape == (0,)
    c0.sum().backward()
    assert x0.grad.shape == (0, 4, 6)
    # void everywhere (x = 0) is still solvable thanks to Emin > 0
    assert bool(torch.isfinite(compliance(fem, torch.zeros(1, 4, 6, dtype=D))).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_iterations=0), "topology_optimization: max_iterations must be an int >= 1; got 0"),
        (dict(batch=0), "topology_optimization: batch must be an int >= 1; got 0"),
        (dict(volfrac=0.0), r"topology_optimization: volfrac must be in \(0, 1\)"),
        (dict(volfrac=math.nan), r"topology_optimization: volfrac must be in \(0, 1\)"),
        (dict(rmin=0.0), "DensityFilter: rmin must be > 0"),
        (dict(rmin=math.nan), "DensityFilter: rmin must be > 0"),
        (dict(filter="none"), "topology_optimization: filter must be 'sensitivity' or 'density'"),
    ],
)
def test_topology_optimization_rejects_bad_settings(fem, kwargs, match):
    with pytest.raises(ValueError, match=match):
        topology_optimization(fem, **kwargs)


def test_topology_optimization_is_bounded_by_max_iterations(fem):
    # a zero tolerance never stops early: exactly max_iterations iterations, finite history
    result = topology_optimization(fem, tol=0.0, max_iterations=3, batch=1)
    assert result.iterations == 3 and result.history.shape == (3, 1)
    assert bool(torch.isfinite(result.history).all())


@pytest.mark.parametrize(
    "kwargs",
    [dict(penal=0.0), dict(E0=0.0), dict(Emin=-1e-9), dict(Emin=2.0), dict(nu=0.6), dict(nu=-1.0), dict(nu=math.nan)],
)
def test_elasticity_moduli_are_validated(kwargs):
    with pytest.raises(ValueError, match="ElasticityQ4: need penal > 0, E0 > 0, 0 <= Emin < E0"):
        ElasticityQ4.mbb(6, 4, **kwargs)
