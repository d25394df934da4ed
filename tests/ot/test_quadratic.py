"""Quadratically regularized OT (float64): the primal against a QP solver, sparse plans,
envelope and implicit gradients against finite differences, zero weights, batching,
warm starts and bad input."""

import pytest
import torch

import difflayers as dl
from difflayers.ot import SemismoothNewton, quadratic_ot
from difflayers.testing import check_grad

F64 = torch.float64


def _clouds(batch=2, n=10, m=12, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, d, generator=g, dtype=F64)
    y = torch.rand(batch, m, d, generator=g, dtype=F64)
    a = torch.rand(batch, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=F64) + 0.1
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def _primal(C, a, b, eps, P):
    return (C * P).sum((-2, -1)) + 0.5 * eps * (P.square() / (a[..., :, None] * b[..., None, :])).sum((-2, -1))


def test_matches_a_qp_solver():
    cp = pytest.importorskip("cvxpy")
    np = pytest.importorskip("numpy")
    x, y, a, b = _clouds(batch=1, n=9, m=7, seed=1)
    eps = 0.05
    res = quadratic_ot(x=x[0], y=y[0], a=a[0], b=b[0], epsilon=eps)
    C = torch.cdist(x[0], y[0]).square().numpy()
    A, B = a[0].numpy(), b[0].numpy()
    P = cp.Variable(C.shape)
    objective = cp.sum(cp.multiply(C, P)) + eps / 2 * cp.sum(cp.multiply(1 / np.outer(A, B), cp.square(P)))
    problem = cp.Problem(cp.Minimize(objective), [cp.sum(P, 1) == A, cp.sum(P, 0) == B, P >= 0])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert abs(problem.value - float(res.value)) < 1e-10
    torch.testing.assert_close(res.plan, torch.from_numpy(P.value), rtol=0, atol=1e-8)
    # strong duality: the dual value equals the primal objective at the returned plan
    torch.testing.assert_close(res.value, _primal(torch.from_numpy(C), a[0], b[0], eps, res.plan))


def test_plan_is_sparse_feasible_and_sparser_for_smaller_epsilon():
    x, y, a, b = _clouds(batch=3, n=40, m=50, seed=2)
    supports = []
    for eps in (1e-1, 1e-2, 1e-3):
        res = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=eps)
        P = res.plan
        assert bool((P >= 0).all())
        torch.testing.assert_close(P.sum(2), a, rtol=0, atol=1e-10)
        torch.testing.assert_close(P.sum(1), b, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.stats["support"], (P > 0).flatten(1).to(F64).mean(1))
        supports.append(res.stats["support"])
    assert bool((supports[1] < supports[0]).all() and (supports[2] < supports[1]).all())
    # an unregularized optimal plan has at most n + m - 1 nonzeros (a vertex of the polytope)
    assert bool((supports[2] * 40 * 50 < 3 * (40 + 50)).all())


def test_envelope_gradient_matches_finite_differences():
    x, y, a, b = _clouds(seed=3)
    fn = lambda x, y: quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.05).value  # noqa: E731
    check_grad(fn, (x, y), rtol=1e-6, atol=1e-9, raise_exception=True)


def test_envelope_gradient_of_the_cost_is_the_plan():
    x, y, a, b = _clouds(seed=4)
    C = torch.cdist(x, y).square().requires_grad_()
    res = quadratic_ot(cost=C, a=a, b=b, epsilon=0.05)
    res.value.sum().backward()
    torch.testing.assert_close(C.grad, res.plan)


@pytest.mark.parametrize("wrt", ["cost", "weights"])
def test_implicit_plan_gradient_matches_finite_differences(wrt):
    x, y, a, b = _clouds(seed=5)
    C = torch.cdist(x, y).square()
    W = torch.randn(C.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    solver = SemismoothNewton(rtol=1e-12, atol=0.0)

    def loss(C, a, b):
        res = quadratic_ot(cost=C, a=a, b=b, epsilon=0.05, adjoint=dl.Implicit(), solver=solver)
        return (res.plan * W).sum((1, 2)) + res.value

    if wrt == "cost":
        check_grad(lambda C: loss(C, a, b), (C,), rtol=1e-5, atol=1e-8, raise_exception=True)
    else:
        # mass-preserving directions keep the problem balanced
        g = torch.Generator().manual_seed(2)
        da = torch.randn(a.shape, generator=g, dtype=F64)
        db = torch.randn(b.shape, generator=g, dtype=F64)
        da, db = da - da.mean(1, keepdim=True), db - db.mean(1, keepdim=True)
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss(C, a1, b1).sum().backward()
        h = 1e-6
        fd = (loss(C, a + h * da, b + h * db) - loss(C, a - h * da, b - h * db)).sum() / (2 * h)
        analytic = (a1.grad * da).sum() + (b1.grad * db).sum()
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-8)


def test_implicit_point_cloud_potentials_match_finite_differences():
    """The potentials in the gauge <a, f> = <b, g> are differentiable as such."""
    x, y, a, b = _clouds(seed=6, n=8, m=9)
    solver = SemismoothNewton(rtol=1e-12, atol=0.0)

    def potentials(x, y):
        res = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.1, adjoint=dl.Implicit(), solver=solver)
        return torch.cat([res.f, res.g], 1)

    check_grad(potentials, (x, y), rtol=1e-5, atol=1e-8, raise_exception=True)


def test_implicit_and_envelope_value_gradients_agree():
    x, y, a, b = _clouds(seed=7)
    grads = []
    for adjoint in (dl.ot.Envelope(), dl.Implicit()):
        x1 = x.clone().requires_grad_()
        quadratic_ot(x=x1, y=y, a=a, b=b, epsilon=0.05, adjoint=adjoint).value.sum().backward()
        grads.append(x1.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_zero_weights_pad_without_changing_the_result():
    x, y, a, b = _clouds(batch=1, n=8, m=9, seed=8)
    pad_x = torch.cat([x, torch.rand(1, 3, 2, dtype=F64)], 1).requires_grad_()
    pad_a = torch.cat([a, torch.zeros(1, 3, dtype=F64)], 1)
    full = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.05)
    padded = quadratic_ot(x=pad_x, y=y, a=pad_a, b=b, epsilon=0.05, adjoint=dl.Implicit())
    torch.testing.assert_close(padded.value, full.value)
    torch.testing.assert_close(padded.plan[:, :8], full.plan)
    assert bool((padded.plan[:, 8:] == 0).all()) and bool((padded.f[:, 8:] == 0).all())
    (padded.plan.square().sum() + padded.value.sum()).backward()
    assert bool(torch.isfinite(pad_x.grad).all()) and bool((pad_x.grad[:, 8:] == 0).all())


def test_batched_equals_loop_and_warm_start():
    x, y, a, b = _clouds(batch=3, seed=9)
    res = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.02)
    for i in range(3):
        one = quadratic_ot(x=x[i], y=y[i], a=a[i], b=b[i], epsilon=0.02)
        assert one.value.dim() == 0 and one.plan.shape == (10, 12)
        torch.testing.assert_close(one.value, res.value[i])
        torch.testing.assert_close(one.plan, res.plan[i], rtol=0, atol=1e-10)
    warm = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.02, init=(res.f, res.g))
    assert bool((warm.stats["num_steps"] <= 1).all())
    torch.testing.assert_close(warm.value, res.value)


def test_float32_converges():
    x, y, a, b = _clouds(batch=2, n=30, m=30, seed=10)
    res = quadratic_ot(x=x.float(), y=y.float(), a=a.float(), b=b.float(), epsilon=0.01)
    ref = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.01)
    assert res.value.dtype == torch.float32
    torch.testing.assert_close(res.value.double(), ref.value, rtol=1e-4, atol=1e-6)


def test_non_convergence_raises_or_reports():
    x, y, a, b = _clouds(seed=11)
    with pytest.raises(dl.ConvergenceError, match="MAX_STEPS"):
        quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.001, solver=SemismoothNewton(max_steps=1))
    res = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=0.001, solver=SemismoothNewton(max_steps=1), throw=False)
    assert bool((res.status == int(dl.Status.MAX_STEPS)).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(epsilon=0.1, a=torch.tensor([0.5, 0.6, -0.1], dtype=F64)), ValueError, "negative"),
        (dict(epsilon=0.1, a=torch.tensor([0.5, 0.6, 0.1], dtype=F64)), ValueError, "same total mass"),
        (dict(epsilon=0.1, a=torch.ones(3, dtype=torch.float32) / 3), TypeError, "dtype"),
        (dict(epsilon=0.1, adjoint=dl.Unroll()), TypeError, "Envelope"),
        (dict(epsilon=0.1, solver=dl.ot.Sinkhorn()), TypeError, "SemismoothNewton"),
    ],
)
def test_bad_input(kwargs, error, match):
    x = torch.rand(3, 2, dtype=F64)
    y = torch.rand(4, 2, dtype=F64)
    with pytest.raises(error, match=match):
        quadratic_ot(x=x, y=y, **kwargs)


def test_bad_solver_options():
    with pytest.raises(ValueError, match="shift"):
        SemismoothNewton(shift=0.0)
    with pytest.raises(ValueError, match="armijo"):
        SemismoothNewton(armijo=0.7)
    with pytest.raises(TypeError, match="linear_solver"):
        SemismoothNewton(linear_solver="cg")
    with pytest.raises(ValueError, match="NaN"):
        quadratic_ot(cost=torch.full((3, 4), float("nan"), dtype=F64), epsilon=0.1)


@pytest.mark.parametrize("epsilon", [1e-3, 0.1])  # sparse (CSR) and dense products in CG
def test_newton_cg_equals_the_dense_factorization(epsilon):
    x, y, a, b = _clouds(batch=2, n=40, m=50, seed=12)
    tight = dict(rtol=1e-12, atol=0.0)
    cg = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=epsilon,
                      solver=SemismoothNewton(**tight, linear_solver=dl.solvers.CG(rtol=1e-2, atol=0.0)))
    dense = quadratic_ot(x=x, y=y, a=a, b=b, epsilon=epsilon, solver=SemismoothNewton(**tight))
    torch.testing.assert_close(cg.value, dense.value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cg.plan, dense.plan, rtol=0, atol=1e-12)
