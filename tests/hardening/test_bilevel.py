"""Bad-input hardening of ``dl.bilevel``: ``hypergradient`` with every estimator, the
estimator objects and ``learn_hyperparameters``. A clear exception naming the argument,
or a hypergradient with statuses, warned about (``on_unconverged="warn"``) or raised
(``"raise"``) when a solve it relies on failed; never a silent NaN."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflayers as dl
from difflayers import bilevel as bl
from difflayers import solvers as S

D = torch.float64

_g = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=_g, dtype=D)
Y = X.sum(1)


def inner(w, lam):
    """Ridge, batched over the leading dimension of w and lam (or not)."""
    return 0.5 * ((w @ X.T - Y) ** 2).mean(-1) + 0.5 * (lam * w**2).sum(-1)


def outer(w, lam):
    return 0.5 * ((w @ X.T - 0.5 * Y) ** 2).mean(-1)


ESTIMATORS = {
    "ImplicitCG": lambda: bl.ImplicitCG(),
    "ImplicitMINRES": lambda: bl.ImplicitMINRES(),
    "ImplicitGMRES": lambda: bl.ImplicitGMRES(),
    "ImplicitNeumann": lambda: bl.ImplicitNeumann(steps=20),
    "ImplicitDense": lambda: bl.ImplicitDense(),
    "Unrolled": lambda: bl.Unrolled(optimizer=bl.SGD(lr=0.2), steps=10),
    "CheckpointedUnrolled": lambda: bl.CheckpointedUnrolled(optimizer=bl.SGD(lr=0.2), steps=10),
    "TruncatedUnrolled": lambda: bl.TruncatedUnrolled(optimizer=bl.Adam(lr=0.1), steps=10, last=3),
    "ForwardMode": lambda: bl.ForwardMode(optimizer=bl.SGD(lr=0.2), steps=10),
    "OneStep": lambda: bl.OneStep(),
    "FiniteDifference": lambda: bl.FiniteDifference(),
    "Penalty": lambda: bl.Penalty(extrapolate=False),
}
# estimators whose result relies on converged inner (and adjoint) solves: statuses are checked
CHECKED = {"ImplicitCG", "ImplicitMINRES", "ImplicitGMRES", "ImplicitNeumann", "ImplicitDense", "OneStep",
           "FiniteDifference", "Penalty"}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@settings(max_examples=10, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([None, 0, 1, 2]),  # None: unbatched
    st.sampled_from([None, "w0 nan", "lam inf", "lam zero", "lam negative"]),
)
def test_hypergradient_fails_clearly_or_warns_with_statuses(name, batch, poison):
    lead = () if batch is None else (batch,)
    w0 = torch.zeros(*lead, 3, dtype=D)
    lam = torch.full((*lead, 3), 0.3, dtype=D)
    if poison == "w0 nan" and batch != 0:
        w0[..., 0] = math.nan
    if poison == "lam inf" and batch != 0:
        lam[..., -1] = math.inf
    if poison == "lam zero":
        lam = torch.zeros_like(lam)  # X has full column rank: still a strictly convex inner problem
    if poison == "lam negative":
        lam = torch.full_like(lam, -50.0)  # the inner Hessian is indefinite: no minimizer
    run = lambda policy="warn": bl.hypergradient(  # noqa: E731
        outer, inner, w0, lam, estimator=ESTIMATORS[name](), batched=batch is not None, on_unconverged=policy
    )
    if poison in ("w0 nan", "lam inf") and batch != 0:
        with pytest.raises(ValueError, match=f"hypergradient: {poison.split()[0]} contains NaN or Inf"):
            run()
        return
    if poison == "lam negative" and name in CHECKED and batch != 0:
        # an indefinite inner problem: the inner solve fails, which is warned about or raised
        with pytest.warns(RuntimeWarning, match="did not converge"):
            grad, info = run()
        assert not bool(info.converged.all())
        with pytest.raises(dl.ConvergenceError, match="did not succeed"):
            run("raise")
        return
    with warnings.catch_warnings():
        # unrolled estimators on an indefinite problem diverge into a clear ValueError instead
        warnings.simplefilter("error", RuntimeWarning)
        try:
            grad, info = run()
        except ValueError as error:
            assert poison == "lam negative" and "the hypergradient is not finite" in str(error), error
            return
    assert grad.shape == lam.shape and bool(torch.isfinite(grad).all())
    n = 1 if batch is None else batch
    assert info.inner_status.shape == (n,) and info.inner_residual.shape == (n,)
    if name in CHECKED and poison != "lam negative":
        # (ImplicitNeumann's series is a fixed budget of terms: only its inner solve must succeed)
        assert bool((info.inner_status == int(dl.Status.SUCCESS)).all())
        assert name == "ImplicitNeumann" or bool(info.converged.all())


@pytest.mark.parametrize(
    "estimator, what",
    [
        (bl.ImplicitCG(inner_solver=S.Newton(linear_solver=S.CG(), max_steps=0)), "inner solve"),
        (bl.ImplicitCG(max_steps=0), "adjoint linear solve"),
        (bl.ImplicitGMRES(max_steps=0), "adjoint linear solve"),
        (bl.OneStep(inner_solver=S.Newton(linear_solver=S.CG(), max_steps=0)), "inner solve"),
        (bl.Penalty(penalty_solver=S.Newton(linear_solver=S.CG(), max_steps=0)), "penalized inner solve"),
    ],
    ids=["inner", "CG adjoint", "GMRES adjoint", "OneStep inner", "Penalty"],
)
def test_max_steps_zero_warns_or_raises_with_max_steps_status(estimator, what):
    w0, lam = torch.zeros(3, dtype=D), torch.full((3,), 0.3, dtype=D)
    with pytest.warns(RuntimeWarning, match=f"the {what} did not converge"):
        grad, info = bl.hypergradient(outer, inner, w0, lam, estimator=estimator)
    assert bool(torch.isfinite(grad).all())
    with pytest.raises(dl.ConvergenceError, match=f"{what}: 1 of 1 samples did not succeed") as error:
        bl.hypergradient(outer, inner, w0, lam, estimator=estimator, on_unconverged="raise")
    assert error.value.statuses == [dl.Status.MAX_STEPS]


def test_zero_tolerances_are_bounded_by_max_steps():
    w0, lam = torch.zeros(3, dtype=D), torch.full((3,), 0.3, dtype=D)
    solver = S.Newton(linear_solver=S.CG(), rtol=0.0, atol=0.0, max_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nothing meets a zero tolerance but an exact root
        grad, info = bl.hypergradient(outer, inner, w0, lam,
                                      estimator=bl.ImplicitCG(inner_solver=solver, rtol=0.0, max_steps=12))
    assert int(info.inner_steps.max()) <= 8 and int(info.linear_steps.max()) <= 12
    assert set(info.inner_status.tolist()) <= {int(dl.Status.SUCCESS), int(dl.Status.MAX_STEPS)}
    assert bool(torch.isfinite(grad).all())


def test_divergent_unrolled_inner_optimizer_is_a_clear_error():
    w0, lam = torch.zeros(3, dtype=D), torch.full((3,), 0.3, dtype=D)
    with pytest.raises(ValueError, match=r"hypergradient \(Unrolled\): the hypergradient is not finite .* lower its "
                                         "learning rate"):
        bl.hypergradient(outer, inner, w0, lam, estimator=bl.Unrolled(optimizer=bl.SGD(lr=50.0), steps=200))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_empty_batch_and_batch_of_one(name):
    grad, info = bl.hypergradient(outer, inner, torch.zeros(0, 3, dtype=D), torch.zeros(0, 3, dtype=D),
                                  estimator=ESTIMATORS[name](), batched=True)
    assert grad.shape == (0, 3) and info.inner_status.shape == (0,)
    assert "outer 0" in info.describe()  # the one-line summary of an empty batch
    lam = torch.tensor([[0.3, 0.5, 0.7], [0.2, 0.2, 0.2]], dtype=D)
    both, _ = bl.hypergradient(outer, inner, torch.zeros(2, 3, dtype=D), lam, estimator=ESTIMATORS[name](),
                               batched=True)
    one, _ = bl.hypergradient(outer, inner, torch.zeros(1, 3, dtype=D), lam[1:], estimator=ESTIMATORS[name](),
                              batched=True)
    torch.testing.assert_close(one, both[1:])


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("lam dtype", TypeError, "hypergradient: lam has dtype torch.float32 but w0 has torch.float64"),
        ("lam device", ValueError, "hypergradient: lam is on meta but w0 is on cpu"),
        ("w0 shape", ValueError, r"hypergradient: evaluating the problem at \(w0, lam\) failed .* got w0 with shape \(4,\)"),
        ("batch", ValueError, "hypergradient: batched=True but w0 has batch size 2 and lam 3"),
        ("leaf batch", ValueError, "every tensor of lam must have the same leading"),
        ("0-dim batched", ValueError, "with batched=True every tensor of w0 needs a leading batch dimension"),
        ("integer", TypeError, "hypergradient: lam must be a real floating-point tensor"),
        ("tree", TypeError, "hypergradient: w0 must be a tensor or a dict of tensors"),
        ("empty dict", ValueError, "hypergradient: lam is an empty dict"),
        ("inner not scalar", ValueError, r"hypergradient: inner\(w, lam\) returned shape \(16,\); expected a scalar"),
        ("outer nan", ValueError, r"hypergradient: outer\(w0, lam\) is NaN or Inf"),
        ("inner nan", ValueError, r"hypergradient: inner\(w0, lam\) is NaN or Inf"),
        ("unused lam", ValueError, "hypergradient: lam does not reach the inner problem"),
        ("estimator class", TypeError, r"pass estimator=ImplicitCG\(...\)"),
        ("estimator type", TypeError, "hypergradient: estimator must be a dl.bilevel estimator"),
        ("policy", ValueError, "hypergradient: on_unconverged must be one of"),
        ("state", TypeError, "hypergradient: state must be the WarmStart"),
        ("symmetric estimator", TypeError, "ImplicitCG needs a symmetric Jacobian"),
    ],
)
def test_hypergradient_rejects_malformed_inputs(case, error, match):
    w0, lam = torch.zeros(3, dtype=D), torch.full((3,), 0.3, dtype=D)
    args, kwargs = [outer, inner, w0, lam], {}
    if case == "lam dtype":
        args[3] = lam.float()
    elif case == "lam device":
        args[3] = torch.empty_like(lam, device="meta")
    elif case == "w0 shape":
        args[2] = torch.zeros(4, dtype=D)
    elif case == "batch":
        args[2], args[3] = torch.zeros(2, 3, dtype=D), torch.zeros(3, 3, dtype=D)
        kwargs["batched"] = True
    elif case == "leaf batch":
        args[2] = torch.zeros(2, 3, dtype=D)
        args[3] = {"a": torch.zeros(2, 3, dtype=D), "b": torch.zeros(3, 3, dtype=D)}
        kwargs["batched"] = True
    elif case == "0-dim batched":
        args[2] = torch.zeros((), dtype=D)
        kwargs["batched"] = True
    elif case == "integer":
        args[3] = lam.long()
    elif case == "tree":
        args[2] = [w0]
    elif case == "empty dict":
        args[3] = {}
    elif case == "inner not scalar":
        args[1] = lambda w, lam: (X @ w - Y) ** 2 + (lam * w**2).sum()
    elif case == "outer nan":
        args[0] = lambda w, lam: w.sum() * math.nan
    elif case == "inner nan":
        args[1] = lambda w, lam: inner(w, lam) + math.nan
    elif case == "unused lam":
        args[1] = lambda w, lam: inner(w, torch.ones_like(lam))
    elif case == "estimator class":
        kwargs["estimator"] = bl.ImplicitCG
    elif case == "estimator type":
        kwargs["estimator"] = "cg"
    elif case == "policy":
        kwargs["on_unconverged"] = "ignore"
    elif case == "state":
        kwargs["state"] = w0
    elif case == "symmetric estimator":
        args[1] = bl.FixedPoint(lambda w, lam: 0.5 * w + lam)
        kwargs["estimator"] = bl.ImplicitCG()
    with pytest.raises(error, match=match):
        bl.hypergradient(*args, **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bl.ImplicitCG(rtol=-1.0), "CG: rtol must be a finite number >= 0"),
        (lambda: bl.ImplicitCG(max_steps=-1), "CG: max_steps must be an int >= 0"),
        (lambda: bl.ImplicitGMRES(restart=0), "GMRES: restart must be an int >= 1"),
        (lambda: bl.ImplicitNeumann(steps=0), "ImplicitNeumann: steps must be an int >= 1"),
        (lambda: bl.ImplicitNeumann(step_size=0.0), "ImplicitNeumann: step_size must be a finite number > 0"),
        (lambda: bl.ImplicitNeumann(rtol=math.nan), "ImplicitNeumann: rtol must be a finite number >= 0"),
        (lambda: bl.Unrolled(optimizer=bl.SGD(lr=0.1), steps=0), "Unrolled: steps must be an int >= 1"),
        (lambda: bl.TruncatedUnrolled(optimizer=bl.SGD(lr=0.1), steps=3, last=4), r"last \(4\) must be <= steps"),
        (lambda: bl.CheckpointedUnrolled(optimizer=bl.SGD(lr=0.1), checkpoint_every=0), "checkpoint_every must be"),
        (lambda: bl.ForwardMode(optimizer=bl.SGD(lr=0.1), chunk_size=0), "ForwardMode: chunk_size must be an int >= 1"),
        (lambda: bl.OneStep(step_size=0.0), "OneStep: step_size must be a finite number > 0"),
        (lambda: bl.OneStep(step_size=-1.0), "OneStep: step_size"),
        (lambda: bl.FiniteDifference(epsilon=0.0), "FiniteDifference: epsilon must be a finite number > 0"),
        (lambda: bl.Penalty(multiplier=-1.0), "Penalty: multiplier must be a finite number > 0"),
        (lambda: bl.Penalty(multiplier=math.inf), "Penalty: multiplier"),
        (lambda: bl.SGD(lr=0.0), r"SGD: lr must be a number in \(0.0, inf\)"),
        (lambda: bl.SGD(lr=0.1, momentum=1.0), "SGD: momentum"),
        (lambda: bl.SGD(lr=0.1, weight_decay=-1.0), "SGD: weight_decay"),
        (lambda: bl.Adam(lr=0.1, eps=0.0), "Adam: eps"),
    ],
)
def test_estimators_and_inner_optimizers_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_learn_hyperparameters_edge_cases():
    w0 = torch.zeros(3, dtype=D)
    lam = torch.full((3,), 0.3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="learn_hyperparameters: steps must be an int >= 1; got 0"):
        bl.learn_hyperparameters(outer, inner, w0, lam, torch.optim.SGD([lam], lr=0.1), steps=0, progress=False)
    with pytest.raises(ValueError, match="learn_hyperparameters: the optimizer must hold the very tensors of lam"):
        bl.learn_hyperparameters(outer, inner, w0, lam.detach().clone().requires_grad_(True),
                                 torch.optim.SGD([lam], lr=0.1), steps=1, progress=False)
    with pytest.raises(TypeError, match="learn_hyperparameters: optimizer must be a torch.optim.Optimizer"):
        bl.learn_hyperparameters(outer, inner, w0, lam, "sgd", steps=1, progress=False)
    empty = torch.zeros(0, 3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"learn_hyperparameters: lam has an empty batch \(B = 0\)"):
        bl.learn_hyperparameters(outer, inner, torch.zeros(0, 3, dtype=D), empty, torch.optim.SGD([empty], lr=0.1),
                                 steps=1, batched=True, progress=False)
    bad = torch.full((3,), math.nan, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="hypergradient: lam contains NaN or Inf"):
        bl.learn_hyperparameters(outer, inner, w0, bad, torch.optim.SGD([bad], lr=0.1), steps=1, progress=False)
    # an outer step that sends lam to NaN is caught at the next step, naming it
    lam2 = torch.full((3,), 0.3, dtype=D, requires_grad=True)
    poison = lambda step, lam, info: lam.data.fill_(math.nan)  # noqa: E731
    with pytest.raises(ValueError, match="hypergradient: lam contains NaN or Inf"):
        bl.learn_hyperparameters(outer, inner, w0, lam2, torch.optim.SGD([lam2], lr=0.1), steps=2, progress=False,
                                 callback=poison)
    # a batch of one runs and keeps the batch dimension
    one = torch.full((1, 3), 0.3, dtype=D, requires_grad=True)
    w, history = bl.learn_hyperparameters(outer, inner, torch.zeros(1, 3, dtype=D), one,
                                          torch.optim.SGD([one], lr=0.1), steps=2, batched=True, progress=False)
    assert w.shape == (1, 3) and len(history.outer_loss) == 2 and all(history.converged)
