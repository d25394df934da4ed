"""Malformed input gives a clear error; non-convergence a warning or an error per policy."""

import io

import pytest
import torch

from difflayers import bilevel as bl
from difflayers.solvers import CG, ConvergenceError, Newton

D = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=D)
    y = X.sum(1)
    inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda w, lam: 0.5 * ((X @ w - 0.5 * y) ** 2).mean()  # noqa: E731
    return inner, outer, torch.zeros(4, dtype=D), torch.full((4,), 0.3, dtype=D), X, y


def test_inner_not_scalar():
    _, outer, w0, lam, X, y = _problem()
    with pytest.raises(ValueError, match=r"returned shape \(30,\); expected a scalar"):
        bl.hypergradient(outer, lambda w, lam: (X @ w - y) ** 2 + (lam * w**2).sum(), w0, lam)


def test_hyperparameter_that_does_not_reach_the_inner_problem():
    inner, outer, w0, lam, X, y = _problem()
    with pytest.raises(ValueError, match=r"lam\['unused'\] does not reach the inner problem"):
        bl.hypergradient(outer, lambda w, lam: inner(w, lam["used"]), w0, {"used": lam, "unused": lam.clone()})
    # entering the inner objective without w (an additive constant) does not count either
    with pytest.raises(ValueError, match="does not reach"):
        bl.hypergradient(outer, lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + lam.sum(), w0, lam)


def test_dtype_device_shape_nan():
    inner, outer, w0, lam, _, _ = _problem()
    with pytest.raises(TypeError, match="dtype torch.float32 but w0 has torch.float64"):
        bl.hypergradient(outer, inner, w0, lam.float())
    with pytest.raises(ValueError, match="is on meta but w0 is on cpu"):
        bl.hypergradient(outer, inner, w0, torch.empty(4, dtype=D, device="meta"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bl.hypergradient(outer, inner, w0, torch.tensor([0.3, float("nan"), 0.3, 0.3], dtype=D))
    with pytest.raises(ValueError, match="shape"):
        bl.hypergradient(outer, inner, torch.zeros(5, dtype=D), lam)
    with pytest.raises(ValueError, match="same leading"):
        bl.hypergradient(outer, inner, torch.zeros(2, 4, dtype=D), torch.zeros(3, 4, dtype=D), batched=True)
    with pytest.raises(TypeError, match="tensor or a dict of tensors"):
        bl.hypergradient(outer, inner, [w0], lam)
    with pytest.raises(TypeError, match="floating-point"):
        bl.hypergradient(outer, inner, w0, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="outer.*NaN|NaN.*outer"):
        bl.hypergradient(lambda w, lam: (w.sum() * float("nan")), inner, w0, lam)


def test_estimator_objects_are_validated():
    inner, outer, w0, lam, _, _ = _problem()
    with pytest.raises(TypeError, match="instance"):
        bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG)
    with pytest.raises(TypeError, match="estimator"):
        bl.hypergradient(outer, inner, w0, lam, estimator="cg")
    with pytest.raises(ValueError, match="on_unconverged"):
        bl.hypergradient(outer, inner, w0, lam, on_unconverged="ignore")
    for bad in (lambda: bl.ImplicitNeumann(steps=0), lambda: bl.SGD(lr=-1.0), lambda: bl.Adam(lr=0.1, eps=0.0),
                lambda: bl.TruncatedUnrolled(optimizer=bl.SGD(lr=0.1), steps=5, last=6),
                lambda: bl.Penalty(multiplier=0.0), lambda: bl.ImplicitCG(rtol=-1.0),
                lambda: bl.CheckpointedUnrolled(optimizer=bl.SGD(lr=0.1), checkpoint_every=0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError, match="optimizer"):
        bl.Unrolled(optimizer="sgd")
    with pytest.raises(TypeError, match="inner_solver"):
        bl.ImplicitCG(inner_solver=CG())
    with pytest.raises(ValueError, match="ForwardMode needs one forward pass per hyperparameter"):
        bl.hypergradient(outer, inner, w0, lam, estimator=bl.ForwardMode(optimizer=bl.SGD(lr=0.1), max_hyperparameters=2))


def test_state_mismatch():
    inner, outer, w0, lam, _, _ = _problem()
    _, info = bl.hypergradient(outer, inner, w0, lam)
    with pytest.raises(ValueError, match="structure of w0"):
        bl.hypergradient(outer, inner, torch.zeros(3, dtype=D), torch.full((3,), 0.3, dtype=D), state=info.state)


def test_unconverged_inner_warns_or_raises():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 4, generator=g, dtype=D)
    y = (X[:, 0] > 0).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    inner = lambda w, lam: bce(X @ w, y) + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda w, lam: bce(X @ w, 1 - y)  # noqa: E731
    w0, lam = torch.zeros(4, dtype=D), torch.full((4,), 1e-2, dtype=D)
    est = bl.ImplicitCG(inner_solver=Newton(linear_solver=CG(), max_steps=1))
    with pytest.warns(RuntimeWarning, match="inner solve did not converge"):
        _, info = bl.hypergradient(outer, inner, w0, lam, estimator=est)
    assert not bool(info.converged.all()) and float(info.inner_residual) > 1e-6
    with pytest.raises(ConvergenceError, match="inner solve"):
        bl.hypergradient(outer, inner, w0, lam, estimator=est, on_unconverged="raise")
    with pytest.warns(RuntimeWarning, match="adjoint linear solve did not converge"):
        bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG(max_steps=1))
    # a solution passed as given is checked, not trusted
    with pytest.warns(RuntimeWarning, match="inner solve did not converge"):
        bl.hypergradient(outer, inner, w0, lam, estimator=bl.ImplicitCG(inner_solver=bl.AsGiven()))


def test_learn_hyperparameters_loop_and_validation():
    inner, outer, w0, _, _, _ = _problem()
    lam = torch.full((4,), 0.3, dtype=D, requires_grad=True)
    stream = io.StringIO()
    w, history = bl.learn_hyperparameters(outer, inner, w0, lam, torch.optim.Adam([lam], lr=0.05), steps=8,
                                          stream=stream, callback=lambda step, lam, info: lam.data.clamp_(min=0))
    assert len(history.outer_loss) == 8 and history.outer_loss[-1] < history.outer_loss[0]
    assert all(history.converged) and all(r < 1e-8 for r in history.inner_residual)
    assert "8/8" in stream.getvalue() and history.info is not None and w.shape == (4,)
    with pytest.raises(ValueError, match="optimizer must hold"):
        bl.learn_hyperparameters(outer, inner, w0, lam.detach().clone().requires_grad_(True),
                                 torch.optim.SGD([lam], lr=0.1), steps=2, progress=False)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        bl.learn_hyperparameters(outer, inner, w0, lam, bl.SGD(lr=0.1), steps=2, progress=False)
