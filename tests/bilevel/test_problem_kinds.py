"""Fixed-point and root inner problems, batched problems, dicts and nn.Module inner
models, logistic regression agreement, warm starts and Adam's safe square root."""

import pytest
import torch

from difflayers import bilevel as bl
from difflayers.solvers import Newton, LU
from difflayers.testing import check_hypergrad


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- fixed point


def _fixed_point_problem(n=8, m=3, seed=0):
    """w = A w + B lam + c with a nonsymmetric contraction A; f = 1/2 ||w - t||^2 + 1/2 ||lam||^2 / 10."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, ord=2)
    A = A + 0.3 * torch.triu(torch.ones(n, n, dtype=torch.float64), 1) / n  # clearly nonsymmetric
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    lam = torch.randn(m, generator=g, dtype=torch.float64)
    T = lambda w, lam: A @ w + B @ lam + c  # noqa: E731
    outer = lambda w, lam: 0.5 * ((w - t) ** 2).sum() + 0.05 * (lam**2).sum()  # noqa: E731
    I = torch.eye(n, dtype=torch.float64)
    w = torch.linalg.solve(I - A, B @ lam + c)
    exact = B.T @ torch.linalg.solve((I - A).T, w - t) + 0.1 * lam
    return T, outer, lam, exact, (A, B, w, t)


def test_fixed_point_gmres_dense_neumann_unrolled():
    T, outer, lam, exact, (A, B, w, t) = _fixed_point_problem()
    assert (A - A.T).abs().max() > 0.05
    w0 = torch.zeros(8, dtype=torch.float64)
    inner = bl.FixedPoint(T)
    g, info = bl.hypergradient(outer, inner, w0, lam)  # default: ImplicitGMRES
    assert isinstance(info.estimator, bl.ImplicitGMRES)
    assert rel(g, exact) < 1e-9 and bool(info.converged.all())
    for est, tol in ((bl.ImplicitDense(), 1e-10), (bl.ImplicitNeumann(steps=200), 1e-9),
                     (bl.Unrolled(optimizer=bl.SGD(lr=1.0), steps=200), 1e-9)):
        g, _ = bl.hypergradient(outer, inner, w0, lam, estimator=est)
        assert rel(g, exact) < tol, est
    # Jacobian-free backpropagation: dT/dlam^T df/dw + df/dlam, with no (I - A)^-T
    g, _ = bl.hypergradient(outer, inner, w0, lam, estimator=bl.OneStep())
    assert rel(g, B.T @ (w - t) + 0.1 * lam) < 1e-9


def test_cg_refuses_nonsymmetric_map():
    T, outer, lam, _, _ = _fixed_point_problem()
    for est in (bl.ImplicitCG(), bl.ImplicitMINRES()):
        with pytest.raises(TypeError, match="symmetric"):
            bl.hypergradient(outer, bl.FixedPoint(T), torch.zeros(8, dtype=torch.float64), lam, estimator=est)
    with pytest.raises(TypeError, match="inner objective"):
        bl.hypergradient(outer, bl.FixedPoint(T), torch.zeros(8, dtype=torch.float64), lam, estimator=bl.Penalty())


def test_root_problem():
    """R(w, lam) = w^3 + w - lam elementwise: dw/dlam = 1 / (3 w^2 + 1)."""
    lam = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    outer = lambda w, lam: (w**2).sum()  # noqa: E731
    R = lambda w, lam: w**3 + w - lam  # noqa: E731
    w0 = torch.zeros(3, dtype=torch.float64)
    for inner, est in ((bl.Root(R, symmetric=True), bl.ImplicitCG()), (bl.Root(R, symmetric=True), bl.ImplicitMINRES()),
                       (bl.Root(R), None), (bl.Root(R), bl.ImplicitDense())):
        g, info = bl.hypergradient(outer, inner, w0, lam, estimator=est)
        w = info.w
        assert float((w**3 + w - lam).abs().max()) < 1e-10
        torch.testing.assert_close(g, 2 * w / (3 * w**2 + 1), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- batched


def test_batched_equals_loop(ridge_factory):
    problems = [ridge_factory(40, 5, c, seed=i) for i, c in enumerate((10.0, 100.0, 1e3))]
    X = torch.stack([p.X for p in problems]); y = torch.stack([p.y for p in problems])
    Xv = torch.stack([p.Xv for p in problems]); yv = torch.stack([p.yv for p in problems])
    lam = torch.stack([p.lam for p in problems])  # [B, d]: one hyperparameter set per problem

    def inner(w, lam):  # [B]
        r = torch.einsum("bnd,bd->bn", X, w) - y
        return 0.5 * (r**2).sum(1) / 40 + 0.5 * (lam * w**2).sum(1)

    def outer(w, lam):
        r = torch.einsum("bnd,bd->bn", Xv, w) - yv
        return 0.5 * (r**2).sum(1) / 40

    w0 = torch.zeros(3, 5, dtype=torch.float64)
    sgd = bl.SGD(lr=5e-3)
    for est in (bl.ImplicitCG(), bl.ImplicitGMRES(), bl.ImplicitDense(), bl.ImplicitNeumann(steps=30, step_size=1e-3),
                bl.OneStep(), bl.FiniteDifference(), bl.Penalty(), bl.Unrolled(optimizer=sgd, steps=50),
                bl.CheckpointedUnrolled(optimizer=sgd, steps=50), bl.TruncatedUnrolled(optimizer=sgd, steps=50, last=5),
                bl.ForwardMode(optimizer=sgd, steps=20)):
        g, info = bl.hypergradient(outer, inner, w0, lam, estimator=est, batched=True)
        assert g.shape == (3, 5) and info.value.shape == (3,) and info.inner_residual.shape == (3,)
        for i, p in enumerate(problems):
            gi, _ = bl.hypergradient(p.outer, p.inner, torch.zeros(5, dtype=torch.float64), p.lam, estimator=est)
            assert rel(g[i], gi) < (1e-6 if isinstance(est, bl.Penalty) else 1e-8), (est, i)
        if isinstance(est, bl.ImplicitCG):
            for i, p in enumerate(problems):
                assert rel(g[i], p.hypergradient()) < 1e-8


# ----------------------------------------------------------------------------- logistic regression


def _logistic(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = (X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    Xv = torch.randn(n, d, generator=g, dtype=torch.float64)
    yv = (Xv @ w_true > 0).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    inner = lambda w, lam: bce(X @ w, y) + 0.5 * (lam.exp() * w**2).sum()  # noqa: E731
    outer = lambda w, lam: bce(Xv @ w, yv)  # noqa: E731
    lam = torch.log(torch.full((d,), 0.05, dtype=torch.float64))
    return inner, outer, lam


def test_logistic_estimators_agree_with_finite_differences():
    inner, outer, lam = _logistic()
    w0 = torch.zeros(4, dtype=torch.float64)
    check = check_hypergrad(outer, inner, w0, lam, optimizer=bl.SGD(lr=2.0, momentum=0.5), steps=60)
    errors = check.errors()
    assert check.passed(1e-6), check.table()
    assert {"ImplicitCG", "ImplicitMINRES", "ImplicitGMRES", "ImplicitDense"} <= set(errors)
    assert errors["Penalty"] < 1e-4, check.table()
    # 60 momentum steps converge to about 1e-6: the unrolled estimators agree to that level
    unrolled = [errors[k] for k in ("Unrolled(T=60)", "CheckpointedUnrolled(T=60)", "ForwardMode(T=60)")]
    assert max(unrolled) < 1e-4 and max(unrolled) - min(unrolled) < 1e-9, check.table()
    assert "rel. error" in str(check)


# ----------------------------------------------------------------------------- modules and dicts


def test_module_inner_model_with_dict_hyperparameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    X, Xv = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    y, yv = X.sum(1, keepdim=True).sin(), Xv.sum(1, keepdim=True).sin()
    params = {k: p.detach() for k, p in model.named_parameters()}
    lam = {k: torch.full_like(p, -2.0) for k, p in params.items()}  # one log-penalty per weight

    def inner(w, lam):
        fit = ((torch.func.functional_call(model, w, (X,)) - y) ** 2).mean()
        return fit + 0.5 * sum((lam[k].exp() * w[k] ** 2).sum() for k in w)

    def outer(w, lam):
        return ((torch.func.functional_call(model, w, (Xv,)) - yv) ** 2).mean()

    # a few hundred Adam steps bring Newton-CG into the basin of a minimum (nonconvex model)
    _, start = bl.hypergradient(outer, inner, params, lam, estimator=bl.TruncatedUnrolled(
        optimizer=bl.Adam(lr=0.05), steps=300, last=1))
    w0 = start.w
    g_cg, info = bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG(), on_unconverged="raise")
    g_dense, _ = bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitDense())
    assert set(g_cg) == set(params) and all(g_cg[k].shape == params[k].shape for k in params)
    assert info.w.keys() == params.keys() and float(info.value) < float(start.value) + 1e-6
    flat = lambda t: torch.cat([t[k].reshape(-1) for k in sorted(t)])  # noqa: E731
    assert rel(flat(g_cg), flat(g_dense)) < 1e-8
    # the inner solution is a minimum: Newton-CG converged, residual tiny
    assert float(info.inner_residual.max()) < 1e-8


def test_warm_start_reuses_solution_and_adjoint(ridge_factory):
    ridge = ridge_factory(60, 12, 1e3)
    w0 = torch.zeros(12, dtype=torch.float64)
    _, info1 = bl.hypergradient(ridge.outer, ridge.inner, w0, ridge.lam)
    lam2 = ridge.lam * (1 + 1e-9)
    g2, info2 = bl.hypergradient(ridge.outer, ridge.inner, w0, lam2, state=info1.state)
    _, cold = bl.hypergradient(ridge.outer, ridge.inner, w0, lam2)
    assert int(info2.linear_steps.max()) < int(cold.linear_steps.max())
    assert int(info2.inner_steps.max()) <= int(cold.inner_steps.max())
    g3, info3 = bl.hypergradient(ridge.outer, ridge.inner, w0, ridge.lam, state=info1.state,
                                 estimator=bl.ImplicitCG(inner_solver=bl.AsGiven()))
    assert int(info3.inner_steps.max()) == 0 and int(info3.linear_steps.max()) == 0
    assert rel(g3, ridge.hypergradient()) < 1e-8


def test_adam_safe_sqrt_has_finite_second_derivatives():
    """A feature that never varies leaves its weight's gradient exactly zero: plain sqrt
    would make the unrolled hypergradient NaN there."""
    torch.manual_seed(0)
    X = torch.randn(30, 3, dtype=torch.float64)
    X[:, 2] = 0.0
    y = X[:, 0].clone()
    inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda w, lam: 0.5 * ((X @ w - 0.8 * y) ** 2).mean()  # noqa: E731
    lam = torch.full((3,), 0.1, dtype=torch.float64)
    g, _ = bl.hypergradient(outer, inner, torch.zeros(3, dtype=torch.float64), lam,
                            estimator=bl.Unrolled(optimizer=bl.Adam(lr=0.05), steps=50))
    assert bool(torch.isfinite(g).all()) and float(g[2]) == 0.0 and float(g[0].abs()) > 0
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(bl.safe_sqrt(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    assert bool(torch.isfinite(first).all() and torch.isfinite(second).all())
    assert float(bl.safe_sqrt(torch.tensor(4.0))) == 2.0


def test_newton_lu_inner_solver_and_optimizer_solver():
    inner, outer, lam = _logistic()
    w0 = torch.zeros(4, dtype=torch.float64)
    g1, _ = bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG(inner_solver=Newton(linear_solver=LU())))
    solver = bl.OptimizerSolver(optimizer=bl.SGD(lr=2.0, momentum=0.5), max_steps=2000, rtol=1e-12)
    g2, info = bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG(inner_solver=solver))
    assert rel(g2, g1) < 1e-8 and int(info.inner_steps.max()) > 10
