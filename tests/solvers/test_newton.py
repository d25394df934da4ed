"""Newton (dense and Newton-Krylov), Gauss-Newton and Levenberg-Marquardt."""

import numpy as np
import pytest
import torch

from difflayers.solvers import (
    CG,
    GMRES,
    LU,
    FixedPointProblem,
    GaussNewton,
    LeastSquaresProblem,
    LevenbergMarquardt,
    MinimizeProblem,
    Newton,
    RootProblem,
    Status,
)

D = torch.float64
SUCCESS = int(Status.SUCCESS)


# --- Newton ----------------------------------------------------------------------------


def cubic_system(B=4, n=6):
    """F(z) = z^3 + A z - c with SPD A: the gradient of a strictly convex quartic, so
    the root is unique and the Jacobian 3 diag(z^2) + A is SPD everywhere."""
    M = torch.randn(B, n, n, dtype=D)
    A = M @ M.transpose(1, 2) / n + torch.eye(n, dtype=D)
    z_star = torch.randn(B, n, dtype=D)
    c = z_star**3 + torch.einsum("bij,bj->bi", A, z_star)
    return A, c, z_star


def F_cubic(z, A, c):
    return z**3 + torch.einsum("bij,bj->bi", A, z) - c


def f_quartic(z, A, c):
    return 0.25 * z.pow(4).sum(1) + 0.5 * torch.einsum("bi,bij,bj->b", z, A, z) - (c * z).sum(1)


NEWTONS = [Newton(), Newton(linear_solver=LU()), Newton(linear_solver=GMRES()), Newton(linear_solver=CG())]
NEWTON_IDS = ["default", "lu", "gmres", "cg"]


@pytest.mark.parametrize("solver", NEWTONS, ids=NEWTON_IDS)
def test_newton_root_converges_in_few_steps(solver):
    A, c, z_star = cubic_system()
    sol = solver.solve(RootProblem(F_cubic), torch.zeros_like(c), (A, c))
    assert sol.status.tolist() == [SUCCESS] * 4
    assert int(sol.stats["num_steps"].max()) <= 12
    torch.testing.assert_close(sol.value, z_star, rtol=1e-9, atol=1e-9)


def test_newton_quadratic_convergence():
    A, c, _ = cubic_system()
    solver, problem = Newton(line_search=False), RootProblem(F_cubic)
    state = solver.init(problem, torch.zeros_like(c), (A, c))
    norms = [state["f"].norm(dim=1)]
    for _ in range(12):
        state = solver.step(problem, state, (A, c))
        norms.append(state["f"].norm(dim=1))
    norms = torch.stack(norms)  # [steps, B]
    # Once in the basin (||F|| < 1e-2), ||F_{k+1}|| <= C ||F_k||^2 until rounding.
    for k in range(len(norms) - 1):
        inside = (norms[k] < 1e-2) & (norms[k] > 1e-12)
        assert bool((norms[k + 1][inside] <= 10.0 * norms[k][inside] ** 2 + 1e-13).all())
    assert bool((norms[-1] < 1e-12).all())


@pytest.mark.parametrize("solver", [Newton(), Newton(linear_solver=GMRES())], ids=["lu", "gmres"])
def test_newton_batched_equals_loop(solver):
    A, c, _ = cubic_system()
    z0 = 2.0 * torch.randn_like(c)
    batched = solver.solve(RootProblem(F_cubic), z0, (A, c))
    for i in range(c.shape[0]):
        alone = solver.solve(RootProblem(F_cubic), z0[i : i + 1], (A[i : i + 1], c[i : i + 1]))
        torch.testing.assert_close(alone.value[0], batched.value[i], rtol=1e-10, atol=1e-10)
        assert int(alone.stats["num_steps"][0]) == int(batched.stats["num_steps"][i])


def test_newton_minimize_strictly_convex_quartic_with_cg():
    A, c, z_star = cubic_system()
    sol = Newton(linear_solver=CG()).solve(MinimizeProblem(f_quartic), torch.zeros_like(c), (A, c))
    assert sol.status.tolist() == [SUCCESS] * 4
    torch.testing.assert_close(sol.value, z_star, rtol=1e-9, atol=1e-9)


def test_newton_fixed_point_problem():
    W = 0.8 * torch.randn(3, 5, 5, dtype=D) / 5**0.5
    b = torch.randn(3, 5, dtype=D)

    def T(z, W, b):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + b)

    sol = Newton().solve(FixedPointProblem(T), torch.zeros_like(b), (W, b))
    assert sol.status.tolist() == [SUCCESS] * 3
    assert int(sol.stats["num_steps"].max()) <= 8
    torch.testing.assert_close(T(sol.value, W, b), sol.value, rtol=1e-10, atol=1e-10)


def test_line_search_rescues_diverging_newton():
    """Undamped Newton on arctan(z) = 0 diverges from |z0| > 1.39."""
    problem, z0 = RootProblem(lambda z: torch.atan(z)), torch.tensor([[3.0], [-2.0], [0.5]], dtype=D)
    plain = Newton(line_search=False).solve(problem, z0)
    assert not bool(plain.converged[:2].any())
    assert bool((plain.value[:2].abs() > 1e100).all())  # thrown out, until J = 1/(1 + z^2) underflows
    assert int(plain.status[2]) == SUCCESS  # inside the basin: unaffected by the other samples
    damped = Newton().solve(problem, z0)
    assert damped.status.tolist() == [SUCCESS] * 3
    torch.testing.assert_close(damped.value, torch.zeros_like(z0), rtol=0, atol=1e-10)


def test_singular_jacobian_fails_only_that_sample():
    c = torch.tensor([[2.0, 3.0], [2.0, 3.0], [5.0, 1.0]], dtype=D)
    z0 = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]], dtype=D)  # J = 2 diag(z0): singular for sample 1
    sol = Newton().solve(RootProblem(lambda z, c: z**2 - c), z0, (c,))
    assert sol.status.tolist() == [SUCCESS, int(Status.BREAKDOWN), SUCCESS]
    torch.testing.assert_close(sol.value[[0, 2]], c[[0, 2]].sqrt(), rtol=1e-10, atol=1e-10)
    assert bool(torch.isfinite(sol.value).all())


class _WrongJacobian(torch.autograd.Function):
    """F(z) = z^3 + z - 1 whose derivative has the wrong sign: Newton directions
    point uphill and no step length decreases the merit."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z):
        return z**3 + z - 1

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx, v):
        (z,) = ctx.saved_tensors
        return -(3 * z**2 + 1) * v

    @staticmethod
    def backward(ctx, u):
        (z,) = ctx.saved_tensors
        return -(3 * z**2 + 1) * u


@pytest.mark.parametrize("linear_solver", [None, GMRES()], ids=["lu", "gmres"])
def test_line_search_failure_status(linear_solver):
    problem = RootProblem(lambda z: _WrongJacobian.apply(z))
    sol = Newton(linear_solver=linear_solver).solve(problem, torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=D))
    assert sol.status.tolist() == [int(Status.LINE_SEARCH_FAILED)] * 2
    # alpha = 2^-k < min_step = 1e-8 first at k = 27
    assert sol.stats["num_steps"].tolist() == [27, 27]
    torch.testing.assert_close(sol.value, torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=D))


def test_max_steps_exhausted():
    A, c, _ = cubic_system()
    sol = Newton(max_steps=2).solve(RootProblem(F_cubic), 3.0 + torch.zeros_like(c), (A, c))
    assert sol.status.tolist() == [int(Status.MAX_STEPS)] * 4
    assert sol.stats["num_steps"].tolist() == [2] * 4


@pytest.mark.parametrize("solver", [Newton(), Newton(linear_solver=GMRES())], ids=["lu", "gmres"])
def test_nan_initial_guess_marks_only_that_sample(solver):
    A, c, z_star = cubic_system()
    z0 = torch.zeros_like(c)
    z0[2, 1] = float("nan")
    sol = solver.solve(RootProblem(F_cubic), z0, (A, c))
    assert sol.status.tolist() == [SUCCESS, SUCCESS, int(Status.NONFINITE), SUCCESS]
    torch.testing.assert_close(sol.value[[0, 1, 3]], z_star[[0, 1, 3]], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("linear_solver", [None, CG()], ids=["lu", "cg"])
def test_one_step_at_the_solution_gives_the_implicit_gradient(linear_solver):
    """A step taken at the root must be accepted (not lost to a rounding-level Armijo
    test) and, for Krylov solvers, must iterate although ||F|| is below their atol, so
    that differentiating it gives dz/dc = -J^-1 dF/dc."""
    c = torch.tensor([[2.0], [7.0]], dtype=D)
    solver, problem = Newton(linear_solver=linear_solver), RootProblem(lambda z, c: z**2 - c)
    z_star = solver.solve(problem, torch.ones_like(c), (c,)).value
    c = c.clone().requires_grad_(True)
    state = solver.step(problem, solver.init(problem, z_star, (c,)), (c,))
    (grad,) = torch.autograd.grad(state["z"].sum(), c)
    torch.testing.assert_close(grad, 0.5 / c.detach().sqrt(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["unroll", "checkpoint"])
def test_unrolled_gradients_match_closed_forms(checkpoint):
    c = torch.tensor([[2.0], [9.0]], dtype=D, requires_grad=True)
    z0 = torch.full((2, 1), 1.1, dtype=D)
    sol = Newton().solve(RootProblem(lambda z, c: z**2 - c), z0, (c,), checkpoint=checkpoint)
    (grad,) = torch.autograd.grad(sol.value.sum(), c)
    torch.testing.assert_close(grad, 0.5 / c.detach().sqrt(), rtol=1e-8, atol=1e-10)

    A = torch.randn(2, 6, 3, dtype=D)
    y = torch.randn(2, 6, dtype=D, requires_grad=True)
    problem = LeastSquaresProblem(lambda z, A, y: torch.einsum("bij,bj->bi", A, z) - y)
    (reference,) = torch.autograd.grad(torch.linalg.lstsq(A, y[:, :, None]).solution.sum(), y)
    solvers = [GaussNewton(), LevenbergMarquardt()]
    if not checkpoint:  # torch.func.vjp (matrix-free normal equations) refuses checkpoint's hooks
        solvers += [GaussNewton(linear_solver=CG()), LevenbergMarquardt(linear_solver=CG())]
    for solver in solvers:
        sol = solver.solve(problem, torch.zeros(2, 3, dtype=D), (A, y), checkpoint=checkpoint)
        (grad,) = torch.autograd.grad(sol.value.sum(), y)
        torch.testing.assert_close(grad, reference, rtol=1e-8, atol=1e-9)


def test_newton_bad_arguments():
    with pytest.raises(ValueError, match="armijo"):
        Newton(armijo=0.7)
    with pytest.raises(ValueError, match="min_step"):
        Newton(min_step=0.0)
    with pytest.raises(TypeError, match="linear_solver"):
        Newton(linear_solver="lu")


# --- Gauss-Newton and Levenberg-Marquardt ------------------------------------------------


def exp_residuals(z, t, y):
    """Model a exp(b t) + c, parameters z = (a, b, c)."""
    return z[:, 0:1] * torch.exp(z[:, 1:2] * t) + z[:, 2:3] - y


def exp_batch(B=4, m=20, t_max=2.0):
    t = torch.linspace(0, t_max, m, dtype=D)
    z_true = torch.stack([1 + torch.rand(B, dtype=D), -0.5 - torch.rand(B, dtype=D), torch.randn(B, dtype=D)], 1)
    return t, z_true


# The tolerance is on the gradient J^T r relative to its initial norm; a tight one makes
# the parameters accurate to ~1e-10 whatever the conditioning of J.
TIGHT = 1e-13
LEAST_SQUARES = [
    GaussNewton(rtol=TIGHT),
    GaussNewton(rtol=TIGHT, linear_solver=CG()),
    LevenbergMarquardt(rtol=TIGHT),
    LevenbergMarquardt(rtol=TIGHT, linear_solver=CG()),
]
LS_IDS = ["gn", "gn-cg", "lm", "lm-cg"]


@pytest.mark.parametrize("solver", LEAST_SQUARES, ids=LS_IDS)
def test_zero_residual_curve_fit(solver):
    t, z_true = exp_batch()
    y = exp_residuals(z_true, t, 0.0)
    z0 = z_true + 0.3 * torch.randn_like(z_true)
    sol = solver.solve(LeastSquaresProblem(exp_residuals), z0, (t, y))
    assert sol.status.tolist() == [SUCCESS] * 4
    torch.testing.assert_close(sol.value, z_true, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", LEAST_SQUARES, ids=LS_IDS)
def test_nonzero_residual_matches_scipy(solver):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t, z_true = exp_batch(B=3, m=50, t_max=4.0)
    y = exp_residuals(z_true, t, 0.0) + 0.01 * torch.randn(3, t.numel(), dtype=D)
    z0 = z_true + 0.2
    sol = solver.solve(LeastSquaresProblem(exp_residuals), z0, (t, y))
    assert sol.status.tolist() == [SUCCESS] * 3
    tn = t.numpy()
    for i in range(3):
        yn = y[i].numpy()

        def fun(p, yn=yn):
            return p[0] * np.exp(p[1] * tn) + p[2] - yn

        def jac(p):  # analytic: MINPACK's finite differences alone would limit it to ~1e-8
            e = np.exp(p[1] * tn)
            return np.stack([e, p[0] * tn * e, np.ones_like(tn)], axis=1)

        ref = scipy_optimize.least_squares(
            fun, z0[i].numpy(), jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
        torch.testing.assert_close(sol.value[i], torch.from_numpy(ref.x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("linear_solver", [None, CG()], ids=["dense", "cg"])
def test_levenberg_marquardt_converges_where_gauss_newton_breaks_down(linear_solver):
    """From a = 0 the column d r / d b = a t exp(b t) vanishes: J^T J is singular, so
    Gauss-Newton cannot even take its first step; the damping carries LM through."""
    t, z_true = exp_batch(B=2)
    y = exp_residuals(z_true, t, 0.0)
    z0 = torch.tensor([[0.0, -4.0, 5.0], [0.0, -3.0, -2.0]], dtype=D)
    problem = LeastSquaresProblem(exp_residuals)
    gn = GaussNewton().solve(problem, z0, (t, y))
    assert gn.status.tolist() == [int(Status.BREAKDOWN)] * 2
    lm = LevenbergMarquardt(rtol=TIGHT, linear_solver=linear_solver).solve(problem, z0, (t, y))
    assert lm.status.tolist() == [SUCCESS] * 2
    torch.testing.assert_close(lm.value, z_true, rtol=1e-8, atol=1e-8)


def test_least_squares_batched_equals_loop():
    t, z_true = exp_batch()
    y = exp_residuals(z_true, t, 0.0) + 0.05 * torch.randn(4, t.numel(), dtype=D)
    z0 = z_true + torch.randn_like(z_true)
    for solver in (GaussNewton(), LevenbergMarquardt()):
        batched = solver.solve(LeastSquaresProblem(exp_residuals), z0, (t, y))
        for i in range(4):
            alone = solver.solve(LeastSquaresProblem(exp_residuals), z0[i : i + 1], (t, y[i : i + 1]))
            torch.testing.assert_close(alone.value[0], batched.value[i], rtol=1e-10, atol=1e-10)
            assert int(alone.stats["num_steps"][0]) == int(batched.stats["num_steps"][i])


def test_levenberg_marquardt_underdetermined():
    """m < n: J^T J is singular everywhere; the damping keeps every system solvable."""
    target = torch.randn(3, 2, dtype=D)

    def r(z, target):
        return torch.stack([z[:, 0] * z[:, 1] + z[:, 2], z[:, 3] - z[:, 4] ** 2], 1) - target

    sol = LevenbergMarquardt().solve(LeastSquaresProblem(r), torch.ones(3, 5, dtype=D), (target,))
    assert sol.status.tolist() == [SUCCESS] * 3
    torch.testing.assert_close(r(sol.value, target), torch.zeros_like(target), rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver_type", [GaussNewton, LevenbergMarquardt])
def test_least_squares_rejects_other_problems(solver_type):
    with pytest.raises(TypeError, match="LeastSquaresProblem"):
        solver_type().solve(RootProblem(lambda z: z), torch.zeros(1, 2, dtype=D))
    with pytest.raises(TypeError, match="linear_solver"):
        solver_type(linear_solver="cholesky")
    if solver_type is LevenbergMarquardt:
        with pytest.raises(ValueError, match="initial_damping"):
            LevenbergMarquardt(initial_damping=0.0)


# --- devices -----------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_smoke():
    A, c, z_star = cubic_system()
    A, c = A.cuda(), c.cuda()
    for solver in (Newton(), Newton(linear_solver=GMRES())):
        sol = solver.solve(RootProblem(F_cubic), torch.zeros_like(c), (A, c))
        assert sol.value.device.type == "cuda"
        torch.testing.assert_close(sol.value.cpu(), z_star, rtol=1e-9, atol=1e-9)
    t, z_true = exp_batch()
    t, z_true = t.cuda(), z_true.cuda()
    y = exp_residuals(z_true, t, 0.0)
    sol = LevenbergMarquardt().solve(LeastSquaresProblem(exp_residuals), z_true + 0.3, (t, y))
    assert bool(sol.converged.all())
    torch.testing.assert_close(sol.value, z_true, rtol=1e-8, atol=1e-8)
