"""Every estimator on per-feature ridge against the closed form, with the error it is
expected to have: tight where the estimator is exact, the truncation error where not."""

import pytest
import torch

import difflayers as dl
from difflayers import bilevel as bl


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def run(ridge, estimator, **kw):
    w0 = torch.zeros(ridge.X.shape[1], dtype=torch.float64)
    return bl.hypergradient(ridge.outer, ridge.inner, w0, ridge.lam, estimator=estimator, **kw)


def test_condition_numbers(ridge):
    assert ridge.condition() == pytest.approx(ridge.condition(), rel=0)
    assert 5 < ridge.condition() < 2e3


@pytest.mark.parametrize("estimator", [None, bl.ImplicitCG(), bl.ImplicitMINRES(), bl.ImplicitGMRES(), bl.ImplicitDense()],
                         ids=["default", "cg", "minres", "gmres", "dense"])
def test_implicit_exact(ridge, estimator):
    g, info = run(ridge, estimator)
    assert rel(g, ridge.hypergradient()) <= 1e-8
    assert bool(info.converged.all())
    assert float(info.inner_residual.max()) < 1e-9
    assert float(info.linear_residual.max()) <= 1e-9 * float(ridge.outer_grad_w(ridge.solution()).norm())
    assert info.value.shape == () and info.w.shape == ridge.lam.shape


def test_default_is_cg_and_reports(ridge):
    g, info = run(ridge, None)
    assert isinstance(info.estimator, bl.ImplicitCG)
    assert int(info.linear_steps.max()) <= 10 * ridge.X.shape[1]
    assert "ImplicitCG" in info.describe()
    torch.testing.assert_close(info.w, ridge.solution(), rtol=1e-9, atol=1e-11)


def test_neumann_is_the_truncated_series(ridge):
    L = ridge.lipschitz()
    steps = 40
    g, info = run(ridge, bl.ImplicitNeumann(steps=steps, step_size=1.0 / L))
    H = ridge.hessian()
    fw = ridge.outer_grad_w(ridge.solution())
    v, term = torch.zeros_like(fw), fw / L
    for _ in range(steps):
        v = v + term
        term = term - (H @ term) / L
    expected = -ridge.solution() * v
    assert rel(g, expected) < 1e-10
    # its distance to the exact hypergradient is the series' truncation error, not more
    bound = (1 - 1 / ridge.condition()) ** steps * float(torch.linalg.cond(H)) + 1e-12
    assert rel(g, ridge.hypergradient()) <= bound
    assert int(info.linear_steps.max()) == steps  # a budget of terms, not a failure: no warning


def test_neumann_default_step_converges_on_well_conditioned(ridge_factory):
    ridge = ridge_factory(60, 12, 10.0)
    g, _ = run(ridge, bl.ImplicitNeumann(steps=300))
    assert rel(g, ridge.hypergradient()) < 1e-8


@pytest.mark.parametrize("kind", ["unrolled", "checkpointed", "forward"])
def test_unrolled_family_is_the_derivative_of_gradient_descent(ridge_factory, kind):
    ridge = ridge_factory(60, 6, 10.0)
    lr, steps = 1.0 / ridge.lipschitz(), 60
    opt = bl.SGD(lr=lr)
    estimator = {
        "unrolled": bl.Unrolled(optimizer=opt, steps=steps),
        "checkpointed": bl.CheckpointedUnrolled(optimizer=opt, steps=steps, checkpoint_every=7),
        "forward": bl.ForwardMode(optimizer=opt, steps=steps),
    }[kind]
    g, info = run(ridge, estimator)
    assert rel(g, ridge.unrolled_hypergradient(lr, steps)) < 1e-10
    assert int(info.inner_steps.max()) == steps
    # 60 steps at condition ~10: close to, but not at, the implicit hypergradient
    assert rel(g, ridge.hypergradient()) < 1e-2


def test_truncated_differentiates_the_last_steps(ridge):
    lr = 1.0 / ridge.lipschitz()
    g, info = run(ridge, bl.TruncatedUnrolled(optimizer=bl.SGD(lr=lr), steps=80, last=20))
    assert rel(g, ridge.unrolled_hypergradient(lr, 80, last=20)) < 1e-10
    assert int(info.inner_steps.max()) == 80


def test_checkpointed_equals_unrolled_with_momentum_and_adam(ridge_factory):
    ridge = ridge_factory(60, 8, 100.0)
    for opt in (bl.SGD(lr=0.05, momentum=0.9, nesterov=True), bl.Adam(lr=0.05), bl.AdamW(lr=0.05)):
        g1, _ = run(ridge, bl.Unrolled(optimizer=opt, steps=40))
        g2, _ = run(ridge, bl.CheckpointedUnrolled(optimizer=opt, steps=40))
        assert rel(g2, g1) < 1e-12


def test_unrolled_converges_to_implicit(ridge_factory):
    ridge = ridge_factory(60, 8, 10.0)
    g, _ = run(ridge, bl.Unrolled(optimizer=bl.SGD(lr=1.0 / ridge.lipschitz()), steps=400))
    assert rel(g, ridge.hypergradient()) < 1e-9


@pytest.mark.parametrize("step_size", [1.0, 0.3])
def test_one_step_and_finite_difference(ridge, step_size):
    w = ridge.solution()
    expected = -step_size * w * ridge.outer_grad_w(w)  # dG/dlam = diag(w) for G = H w - b
    g1, _ = run(ridge, bl.OneStep(step_size=step_size))
    g2, _ = run(ridge, bl.FiniteDifference(step_size=step_size))
    assert rel(g1, expected) < 1e-9
    assert rel(g2, expected) < 1e-8  # g is quadratic in w: central differences are exact up to rounding


def test_penalty_error_order(ridge):
    exact = ridge.hypergradient()
    plain, info = run(ridge, bl.Penalty(multiplier=1e3, extrapolate=False))
    richardson, _ = run(ridge, bl.Penalty(multiplier=1e3))
    e_plain, e_rich = rel(plain, exact), rel(richardson, exact)
    assert e_plain < 10.0 / 1e3 * ridge.condition() ** 0.5
    assert e_rich < 1e-2 * e_plain or e_rich < 1e-8
    assert e_rich < 1e-3
    assert "penalized_residual" in info.extra


def test_zero_dim_hyperparameter(ridge_factory):
    """One global penalty, a 0-dim tensor: a real, nonzero gradient."""
    ridge = ridge_factory(60, 8, 100.0)
    lam = torch.tensor(0.7, dtype=torch.float64)

    def inner(w, lam):
        return 0.5 * ((ridge.X @ w - ridge.y) ** 2).sum() / ridge.n + 0.5 * lam * (w**2).sum()

    w = ridge.solution(lam)
    expected = -(w * torch.linalg.solve(ridge.hessian(lam), ridge.outer_grad_w(w))).sum()
    w0 = torch.zeros(8, dtype=torch.float64)
    opt = bl.SGD(lr=1.0 / float(torch.linalg.eigvalsh(ridge.hessian(lam))[-1]), momentum=0.9)
    for est in (bl.ImplicitCG(), bl.ImplicitDense(), bl.Unrolled(optimizer=opt, steps=400),
                bl.ForwardMode(optimizer=opt, steps=400), bl.Penalty()):
        g, _ = bl.hypergradient(ridge.outer, inner, w0, lam, estimator=est)
        assert g.shape == () and abs(float(expected)) > 1e-3
        assert abs(float(g - expected)) <= 1e-6 * abs(float(expected)), est


def test_torchopt_functional_optimizer_is_accepted(ridge_factory):
    torchopt = pytest.importorskip("torchopt")
    ridge = ridge_factory(60, 6, 10.0)
    ours, _ = run(ridge, bl.Unrolled(optimizer=bl.SGD(lr=0.1), steps=30))
    theirs, _ = run(ridge, bl.Unrolled(optimizer=torchopt.sgd(lr=0.1), steps=30))
    assert rel(theirs, ours) < 1e-12
    # the same Adam (eps outside the root); the two implementations' iterates drift apart
    # by about 1e-5 over 30 steps, and the hypergradients with them
    ours, _ = run(ridge, bl.CheckpointedUnrolled(optimizer=bl.Adam(lr=0.05), steps=30))
    theirs, _ = run(ridge, bl.ForwardMode(optimizer=torchopt.adam(0.05, moment_requires_grad=True), steps=30))
    assert rel(theirs, ours) < 1e-4


def test_inside_no_grad(ridge):
    with torch.no_grad():
        g1, _ = run(ridge, None)
        g2, _ = run(ridge, bl.Unrolled(optimizer=bl.SGD(lr=1.0 / ridge.lipschitz()), steps=20))
    assert rel(g1, ridge.hypergradient()) < 1e-8
    assert rel(g2, ridge.unrolled_hypergradient(1.0 / ridge.lipschitz(), 20)) < 1e-10


def test_comparison_with_torchopt_implicit(ridge):
    torchopt = pytest.importorskip("torchopt")
    d = ridge.X.shape[1]

    def optimality(w, lam):
        return ridge.X.T @ (ridge.X @ w - ridge.y) / ridge.n + lam * w

    solve = torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(rtol=1e-12, maxiter=10 * d)
    )(lambda w0, lam: ridge.solution(lam))
    lam = ridge.lam.clone().requires_grad_(True)
    theirs = torch.autograd.grad(ridge.outer(solve(torch.zeros(d, dtype=torch.float64), lam), lam), lam)[0]
    ours, _ = run(ridge, bl.ImplicitCG())
    assert rel(ours, theirs) < 1e-7
    assert rel(ours, ridge.hypergradient()) <= rel(theirs, ridge.hypergradient()) + 1e-9


def test_matches_dl_argmin_pipeline(ridge):
    w0 = torch.zeros(ridge.X.shape[1], dtype=torch.float64)
    lam = ridge.lam.clone().requires_grad_(True)
    w = dl.argmin(ridge.inner, w0, lam, batched=False)
    ref = torch.autograd.grad(ridge.outer(w, lam), lam)[0]
    ours, _ = run(ridge, bl.ImplicitCG())
    assert rel(ours, ref) < 1e-8


def test_diverged_inner_optimizer_raises(ridge_factory):
    ridge = ridge_factory(60, 6, 100.0)
    with pytest.raises(ValueError, match="not finite"):
        run(ridge, bl.Unrolled(optimizer=bl.SGD(lr=1.0), steps=400))
