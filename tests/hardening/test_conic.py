"""Bad-input hardening of ``dl.QPLayer``, ``dl.ConicLayer``, ``dl.conic.solve_conic`` and
``dl.conic.spo_plus_loss``: a clear exception naming the argument, or per-element statuses
(``PRIMAL_INFEASIBLE``/``DUAL_INFEASIBLE`` for infeasible/unbounded programs) under the
documented ``on_failure`` policy; no NaN leaves without a status saying so."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflayers as dl
from difflayers.conic import Cones, InteriorPoint, Smoothed, solve_conic, spo_plus_loss
from difflayers.testing import dual_infeasible_lp, primal_infeasible_lp

D = torch.float64
STATUSES = {int(s) for s in dl.Status}
USABLE = {int(dl.Status.SUCCESS), int(dl.Status.INACCURATE)}
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def check_policy(x, sol, policy):
    """``on_failure``: usable elements are finite, failed ones NaN or zero, as documented."""
    assert set(sol.status.tolist()) <= STATUSES
    usable = sol.converged
    assert bool(torch.isfinite(x[usable]).all())
    failed = x[~usable]
    if policy == "nan":
        assert bool(torch.isnan(failed).all())
    else:
        assert bool((failed == 0).all())


@st.composite
def box_qps(draw):
    """Strictly convex QPs over a box intersected with a half-space: feasible and bounded."""
    batch, n = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    L = torch.randn(batch, n, n, generator=g, dtype=D)
    P = L @ L.mT / n + 0.1 * torch.eye(n, dtype=D)
    q = torch.randn(batch, n, generator=g, dtype=D)
    G = torch.randn(batch, 1, n, generator=g, dtype=D)
    h = torch.rand(batch, 1, generator=g, dtype=D) + 0.5  # x = 0 is strictly feasible
    lb, ub = -torch.ones(n, dtype=D), torch.ones(n, dtype=D)
    return P, q, G, h, lb, ub


@FAST
@given(
    box_qps(),
    st.sampled_from([None, "P", "q", "G", "h", "lb", "indefinite P"]),
    st.sampled_from([math.nan, math.inf]),
    st.sampled_from(["nan", "mask"]),
    st.sampled_from(["default", "max_steps=0", "zero_tol"]),
)
def test_qp_layer_fails_clearly_or_reports_status(qp, poison, bad, policy, budget):
    P, q, G, h, lb, ub = qp
    batch = q.shape[0]
    if batch and poison in ("P", "q", "G", "h"):
        {"P": P, "q": q, "G": G, "h": h}[poison].view(batch, -1)[0, 0] = bad
    if poison == "lb":
        lb = lb.clone()
        lb[0] = math.nan  # an infinite bound is legal (no bound); NaN is not
    if batch and poison == "indefinite P":
        P[0] = P[0] - 10.0 * torch.eye(P.shape[-1], dtype=D)
    solver = {"default": InteriorPoint(), "max_steps=0": InteriorPoint(max_steps=0),
              "zero_tol": InteriorPoint(rtol=0.0, atol=0.0, max_steps=25, polish=False)}[budget]
    layer = dl.QPLayer(solver=solver, on_failure=policy)
    q.requires_grad_(True)
    run = lambda: layer(P, q, G, h, lb=lb, ub=ub, return_solution=True)  # noqa: E731
    if poison == "lb":  # the shared bound is checked as passed, also for an empty batch
        with pytest.raises(ValueError, match="QPLayer: lb contains NaN"):
            run()
        return
    if batch and poison == "indefinite P":
        with pytest.raises(ValueError, match=r"solve_conic: P is not positive semi-definite in batch elements \[0\]"):
            run()
        return
    if batch and poison is not None:
        with pytest.raises(ValueError, match=f"QPLayer: {poison} contains NaN or Inf"):
            run()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, sol = run()
        x.sum().backward()
    assert x.shape == q.shape and sol.status.shape == (batch,)
    check_policy(x.detach(), sol, policy)
    assert bool(torch.isfinite(q.grad).all())  # failed elements get zero, never NaN, gradients
    assert bool((sol.stats["num_steps"] <= solver.max_steps).all())
    if budget == "default":
        assert bool(sol.converged.all()), sol.status
    elif budget == "max_steps=0":
        assert bool((sol.stats["num_steps"] == 0).all())
        assert set(sol.status.tolist()) <= {int(dl.Status.MAX_STEPS)} | USABLE
    else:  # zero tolerances: the loop runs to max_steps or to an exact solution, never divides by zero
        assert int(dl.Status.NONFINITE) not in sol.status.tolist()
    if not bool(sol.converged.all()):
        assert any("failed" in str(w.message) for w in caught)


def test_infeasible_and_unbounded_programs_get_certificate_statuses():
    primal = primal_infeasible_lp(2, 4, 6, seed=0)  # (other seeds can be dual infeasible as well)
    dual = dual_infeasible_lp(2, 4, 6, seed=2)
    for batch, status in ((primal, dl.Status.PRIMAL_INFEASIBLE), (dual, dl.Status.DUAL_INFEASIBLE)):
        P, q, A, b, cones = batch
        with pytest.warns(RuntimeWarning, match=f"failed \\({status.name}\\)"):
            sol = solve_conic(P, q, A, b, cones, on_failure="nan")
        assert sol.status.tolist() == [int(status)] * 2
        assert bool(torch.isnan(sol.x).all())
        with pytest.raises(dl.ConvergenceError, match=status.name) as info:
            solve_conic(P, q, A, b, cones)
        assert info.value.indices == [0, 1]
        # the certificate itself, for a caller who asks for it, is finite
        assert bool(torch.isfinite(info.value.solution.x).all())


def test_one_infeasible_element_does_not_spoil_the_batch():
    P = torch.eye(2, dtype=D)
    q = torch.ones(3, 2, dtype=D, requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    h = torch.tensor([[1.0, 1.0], [1.0, -2.0], [0.5, 0.5]], dtype=D)  # element 1: x_1 <= 1 and x_1 >= 2
    with pytest.warns(RuntimeWarning, match=r"batch elements \[1\] failed \(PRIMAL_INFEASIBLE\)"):
        x, sol = dl.QPLayer(on_failure="mask")(P, q, G, h, return_solution=True)
    assert sol.status.tolist() == [0, int(dl.Status.PRIMAL_INFEASIBLE), 0]
    alone = dl.QPLayer()(P, q[[0, 2]].detach(), G, h[[0, 2]])
    torch.testing.assert_close(x[[0, 2]].detach(), alone)
    x.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros(2, dtype=D))


@pytest.mark.parametrize("adjoint", [None, Smoothed(barrier=1e-2), dl.Unroll()], ids=["Implicit", "Smoothed", "Unroll"])
def test_empty_batch_and_batch_of_one(adjoint):
    P = torch.eye(2, dtype=D)
    G, h = torch.ones(1, 2, dtype=D), torch.ones(1, dtype=D)
    layer = dl.QPLayer(adjoint=adjoint)
    q0 = torch.zeros(0, 2, dtype=D, requires_grad=True)
    x0, sol0 = layer(P, q0, G, h, return_solution=True)
    assert x0.shape == (0, 2) and sol0.status.shape == (0,)
    x0.sum().backward()
    assert q0.grad.shape == (0, 2)
    # shared data is checked as passed, also when the batch is empty
    with pytest.raises(ValueError, match="QPLayer: lb contains NaN"):
        layer(P, q0, G, h, lb=torch.tensor([float("nan"), 0.0], dtype=D))
    with pytest.raises(ValueError, match="QPLayer: G contains NaN or Inf"):
        layer(P, q0, G * float("inf"), h)
    q1 = torch.tensor([[-1.0, -1.0]], dtype=D)
    tol = 2e-2 if isinstance(adjoint, Smoothed) else 1e-6  # Smoothed returns a central-path point
    torch.testing.assert_close(layer(P, q1, G, h), torch.full((1, 2), 0.5, dtype=D), rtol=tol, atol=tol)


def test_zero_tolerances_do_not_read_as_a_non_finite_iterate():
    # rtol = atol = 0 used to divide the residuals by zero and stop every element NONFINITE at step 0
    P, q, A, b, cones = primal_infeasible_lp(2, 3, 5, seed=3)
    q = torch.randn(2, 3, dtype=D)
    b = b.abs() + 1.0  # x = 0 strictly feasible on the inequality rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "failed (MAX_STEPS)" where nothing is exact
        sol = solve_conic(torch.eye(3, dtype=D).expand(2, 3, 3), q, A, b, cones,
                          solver=InteriorPoint(rtol=0.0, atol=0.0, max_steps=15, polish=False), on_failure="mask")
    assert int(dl.Status.NONFINITE) not in sol.status.tolist()
    assert bool((sol.stats["num_steps"] >= 1).all())


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("P shape", ValueError, r"solve_conic: P must have shape \[2, 2, 2\]"),
        ("A rows", ValueError, r"solve_conic: A must have shape \[2, 2, 2\] \(\[B, n\] from q, m = cones.dim = 2\)"),
        ("b shape", ValueError, r"solve_conic: b must have shape \[2, 2\]"),
        ("q 1-D", ValueError, r"solve_conic: q must have shape \[B, n\]"),
        ("no variables", ValueError, r"solve_conic: the problem has no variables"),
        ("A dtype", TypeError, "solve_conic: A has dtype torch.float32 but q has torch.float64"),
        ("q integer", TypeError, "solve_conic: q must be a floating-point tensor"),
        ("b device", ValueError, "solve_conic: b is on meta but q is on cpu"),
        ("A type", TypeError, "solve_conic: A must be a torch.Tensor"),
        ("cones", TypeError, "solve_conic: cones must be a difflayers.conic.Cones"),
        ("solver", TypeError, "solve_conic: solver must be a difflayers.conic.InteriorPoint"),
        ("adjoint", TypeError, "solve_conic: adjoint must be Implicit"),
        ("adjoint linear solver", ValueError, "pass Implicit\\(\\) without a linear_solver"),
        ("on_failure", ValueError, "solve_conic: on_failure must be one of"),
        ("warm_start", ValueError, "solve_conic: warm_start must be a ConicSolution"),
        ("indefinite P", ValueError, r"solve_conic: P is not positive semi-definite in batch elements \[1\]"),
        ("nan A", ValueError, r"solve_conic: A contains NaN or Inf in batch elements \[1\]"),
    ],
)
def test_solve_conic_rejects_malformed_inputs(case, error, match):
    P = torch.eye(2, dtype=D).expand(2, 2, 2).clone()
    q = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=D)
    A = -torch.eye(2, dtype=D).expand(2, 2, 2).clone()
    b = torch.zeros(2, 2, dtype=D)
    cones = Cones(nonneg=2)
    args, kwargs = [P, q, A, b, cones], {}
    if case == "P shape":
        args[0] = P[:, :1]
    elif case == "A rows":
        args[2] = A[:, :1]
    elif case == "b shape":
        args[3] = b[:, :1]
    elif case == "q 1-D":
        args[1] = q[0]
    elif case == "no variables":
        args = [None, q[:, :0], A[:, :, :0], b, cones]
    elif case == "A dtype":
        args[2] = A.float()
    elif case == "q integer":
        args[1] = q.long()
    elif case == "b device":
        args[3] = torch.empty_like(b, device="meta")
    elif case == "A type":
        args[2] = A.tolist()
    elif case == "cones":
        args[4] = 2
    elif case == "solver":
        kwargs["solver"] = dl.solvers.Newton()
    elif case == "adjoint":
        kwargs["adjoint"] = dl.OneStep()
    elif case == "adjoint linear solver":
        kwargs["adjoint"] = dl.Implicit(linear_solver=dl.solvers.CG())
    elif case == "on_failure":
        kwargs["on_failure"] = "ignore"
    elif case == "warm_start":
        kwargs["warm_start"] = (q, b, b[:, :1])
    elif case == "indefinite P":
        P[1] = -P[1]
    elif case == "nan A":
        A[1, 0, 1] = math.nan
    with pytest.raises(error, match=match):
        solve_conic(*args, **kwargs)


def test_positive_semi_definite_but_singular_P_is_accepted():
    P = torch.zeros(1, 2, 2, dtype=D)
    P[0, 0, 0] = 1.0  # PSD, rank one
    x = dl.QPLayer()(P, torch.tensor([[-1.0, 1.0]], dtype=D), lb=torch.zeros(2, dtype=D), ub=torch.ones(2, dtype=D))
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.0]], dtype=D), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("G columns", ValueError, r"QPLayer: G must have n = 2 columns \(from q\)"),
        ("h rows", ValueError, r"QPLayer: h must have 1 entries \(the rows of G\)"),
        ("batch", ValueError, "QPLayer: q has batch size 2 but another argument has 3"),
        ("G without h", ValueError, "QPLayer: pass G and h together"),
        ("P dtype", TypeError, "QPLayer: P has dtype torch.float32 but q has torch.float64"),
        ("P device", ValueError, "QPLayer: P is on meta but q is on cpu"),
        ("P type", TypeError, "QPLayer: P must be a torch.Tensor or None"),
        ("q type", TypeError, "QPLayer: q must be a torch.Tensor"),
        ("q 3-D", ValueError, r"QPLayer: q must have shape \[n\] or \[B, n\]"),
        ("on_failure", ValueError, "QPLayer: on_failure must be one of"),
        ("solver", TypeError, "QPLayer: solver must be an InteriorPoint"),
    ],
)
def test_qp_layer_rejects_malformed_inputs(case, error, match):
    P, q = torch.eye(2, dtype=D), torch.ones(2, 2, dtype=D)
    G, h = torch.ones(1, 2, dtype=D), torch.ones(1, dtype=D)
    args, layer = [P, q, G, h], {}
    if case == "G columns":
        args[2] = torch.ones(1, 3, dtype=D)
    elif case == "h rows":
        args[3] = torch.ones(2, dtype=D)
    elif case == "batch":
        args[0] = P.expand(3, 2, 2)
    elif case == "G without h":
        args = args[:3]
    elif case == "P dtype":
        args[0] = P.float()
    elif case == "P device":
        args[0] = torch.empty_like(P, device="meta")
    elif case == "P type":
        args[0] = P.tolist()
    elif case == "q type":
        args[1] = 1.0
    elif case == "q 3-D":
        args[1] = q[None]
    elif case == "on_failure":
        layer["on_failure"] = "warn"
    elif case == "solver":
        layer["solver"] = dl.solvers.Newton()
    with pytest.raises(error, match=match):
        dl.QPLayer(**layer)(*args)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Cones(nonneg=-1), "Cones: nonneg must be an int >= 0"),
        (lambda: Cones(soc=(0,)), "Cones: soc must list cone dimensions"),
        (lambda: InteriorPoint(max_steps=-1), "InteriorPoint: max_steps must be an int >= 0"),
        (lambda: InteriorPoint(max_steps=None), "InteriorPoint: max_steps must be an int >= 0"),
        (lambda: InteriorPoint(rtol=math.nan), "InteriorPoint: rtol must be a finite number >= 0"),
        (lambda: InteriorPoint(infeasibility_tol=0.0), r"InteriorPoint: infeasibility_tol must be in \(0, 1\)"),
        (lambda: InteriorPoint(step_fraction=1.0), r"InteriorPoint: step_fraction must be in \(0, 1\)"),
        (lambda: InteriorPoint(regularization=-1.0), r"InteriorPoint: regularization must be in \[0, 1\)"),
        (lambda: Smoothed(barrier=0.0), "Smoothed: barrier must be a finite number > 0"),
        (lambda: Smoothed(barrier=math.inf), "Smoothed: barrier"),
    ],
)
def test_conic_hyperparameters_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------- ConicLayer


@pytest.fixture(scope="module")
def conic_layer_parts():
    cp = pytest.importorskip("cvxpy")
    x, c, h = cp.Variable(2), cp.Parameter(2), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [x >= 0, cp.sum(x) <= h])
    return problem, [c, h], [x]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("nan", ValueError, "parameter\\(s\\) 'param\\d+' contain NaN or Inf"),
        ("inf", ValueError, "contain NaN or Inf"),
        ("dtype", TypeError, "ConicLayer: parameter 'param\\d+' has dtype torch.float32 but 'param\\d+' has torch.float64"),
        ("integer", TypeError, "must have a real floating dtype, got torch.int64"),
        ("device", ValueError, "is on meta but 'param\\d+' is on cpu"),
        ("all on another device", ValueError, "the parameter tensors are on meta but the canonical maps are on cpu"),
        ("shape", ValueError, r"must have shape \(2,\) or \(batch, \*\(2,\)\), got \(2, 3\)"),
        ("batch", ValueError, "has batch size 3 but 'param\\d+' has batch size 2"),
        ("count", ValueError, "expected 2 parameter tensors"),
        ("type", TypeError, "must be a torch.Tensor, got list"),
    ],
)
def test_conic_layer_rejects_malformed_parameters(conic_layer_parts, case, error, match):
    layer = dl.ConicLayer(*conic_layer_parts)
    c = torch.tensor([[-1.0, 1.0], [1.0, -2.0]], dtype=D)
    h = torch.ones(2, 1, dtype=D)
    args = [c, h]
    if case == "nan":
        args[0] = c.clone().fill_(math.nan)
    elif case == "inf":
        args[1] = h * math.inf
    elif case == "dtype":
        args[1] = h.float()
    elif case == "integer":
        args[0] = c.long()
    elif case == "device":
        args[1] = torch.empty_like(h, device="meta")
    elif case == "all on another device":
        args = [torch.empty_like(t, device="meta") for t in args]
    elif case == "shape":
        args[0] = torch.ones(2, 3, dtype=D)
    elif case == "batch":
        args[1] = torch.ones(3, 1, dtype=D)
    elif case == "count":
        args = args[:1]
    elif case == "type":
        args[0] = c.tolist()
    with pytest.raises(error, match=match):
        layer(*args)


def test_conic_layer_statuses_batches_and_budgets(conic_layer_parts):
    problem, params, variables = conic_layer_parts
    c = torch.tensor([[-1.0, 1.0], [1.0, -2.0]], dtype=D)
    h = torch.ones(2, 1, dtype=D)
    layer = dl.ConicLayer(problem, params, variables)
    # empty batch: an empty result, an empty gradient
    c0 = c[:0].clone().requires_grad_(True)
    (x0,) = layer(c0, h[:0])
    assert x0.shape == (0, 2)
    x0.sum().backward()
    assert c0.grad.shape == (0, 2)
    # batch of one equals its row of the batch
    (both,) = layer(c, h)
    (one,) = layer(c[1:], h[1:])
    torch.testing.assert_close(one, both[1:])
    # infeasible (sum(x) <= -1 with x >= 0): raise, or NaN under on_failure="nan"
    with pytest.raises(dl.ConvergenceError, match="PRIMAL_INFEASIBLE"):
        layer(c, -h)
    with pytest.warns(RuntimeWarning, match="failed \\(PRIMAL_INFEASIBLE\\)"):
        x, sol = dl.ConicLayer(problem, params, variables, on_failure="nan")(c, -h, return_solution=True)
    assert sol.status.tolist() == [int(dl.Status.PRIMAL_INFEASIBLE)] * 2 and bool(torch.isnan(x).all())
    # max_steps=0 and zero tolerances stop within the budget with a status
    for solver, budget in ((InteriorPoint(max_steps=0), 0), (InteriorPoint(rtol=0.0, atol=0.0, max_steps=20), 20)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            x, sol = dl.ConicLayer(problem, params, variables, solver=solver, on_failure="mask")(c, h, return_solution=True)
        assert bool((sol.stats["num_steps"] <= budget).all())
        assert int(dl.Status.NONFINITE) not in sol.status.tolist()
        check_policy(x, sol, "mask")
    with pytest.raises(ValueError, match="on_failure must be one of"):
        dl.ConicLayer(problem, params, variables, on_failure="ignore")


def test_conic_layer_unbounded_program_is_dual_infeasible():
    cp = pytest.importorskip("cvxpy")
    y, d = cp.Variable(2), cp.Parameter(2)
    layer = dl.ConicLayer(cp.Problem(cp.Minimize(d @ y), [y <= 1]), [d], [y], on_failure="nan")
    with pytest.warns(RuntimeWarning, match="DUAL_INFEASIBLE"):
        (x, sol) = layer(torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=D), return_solution=True)
    assert sol.status.tolist() == [int(dl.Status.DUAL_INFEASIBLE), int(dl.Status.SUCCESS)]
    assert bool(torch.isnan(x[0]).all()) and torch.allclose(x[1], torch.ones(2, dtype=D))


# --------------------------------------------------------------------- spo_plus_loss


def _spo_data():
    G = torch.tensor([[1.0, 1.0]], dtype=D)  # w1 + w2 <= 1, w >= 0
    h = torch.ones(1, dtype=D)
    lb = torch.zeros(2, dtype=D)
    c = torch.tensor([[-1.0, -2.0], [-2.0, -0.5]], dtype=D)
    c_hat = torch.tensor([[-2.0, -1.0], [-1.0, -1.0]], dtype=D, requires_grad=True)
    return c_hat, c, G, h, lb


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("c_hat nan", ValueError, "spo_plus_loss: c_hat contains NaN or Inf"),
        ("c inf", ValueError, "spo_plus_loss: c contains NaN or Inf"),
        ("w_true nan", ValueError, "spo_plus_loss: w_true contains NaN or Inf"),
        ("shape", ValueError, r"spo_plus_loss: c_hat \[2, 2\] and c \[2, 1\] must have one shape"),
        ("w_true shape", ValueError, r"spo_plus_loss: w_true must have the shape of c \[2, 2\]; got \[2, 3\]"),
        ("3-D", ValueError, r"spo_plus_loss: c_hat and c must have shape \[B, n\] or \[n\]"),
        ("dtype", TypeError, "spo_plus_loss: c has dtype torch.float32 but c_hat has torch.float64"),
        ("device", ValueError, "spo_plus_loss: c is on meta but c_hat is on cpu"),
        ("type", TypeError, "spo_plus_loss: c_hat and c must be tensors"),
        ("reduction", ValueError, "spo_plus_loss: reduction must be"),
        ("empty mean", ValueError, r"spo_plus_loss: the batch is empty \(B = 0\), so its mean is undefined"),
        ("unbounded", dl.ConvergenceError, "solve_conic: 1 of 1 samples did not succeed.\n  sample 0: DUAL_INFEASIBLE"),
    ],
)
def test_spo_plus_loss_rejects_malformed_inputs(case, error, match):
    c_hat, c, G, h, lb = _spo_data()
    args, kwargs = [c_hat, c, G, h], {"lb": lb}
    if case == "c_hat nan":
        args[0] = c_hat.detach().clone().fill_(math.nan)
    elif case == "c inf":
        args[1] = c * math.inf
    elif case == "w_true nan":
        kwargs["w_true"] = torch.full_like(c, math.nan)
    elif case == "shape":
        args[1] = c[:, :1]
    elif case == "w_true shape":
        kwargs["w_true"] = torch.zeros(2, 3, dtype=D)
    elif case == "3-D":
        args[0], args[1] = c_hat[None], c[None]
    elif case == "dtype":
        args[1] = c.float()
    elif case == "device":
        args[1] = torch.empty_like(c, device="meta")
    elif case == "type":
        args[1] = c.tolist()
    elif case == "reduction":
        kwargs["reduction"] = "max"
    elif case == "empty mean":
        args[0], args[1] = c_hat[:0], c[:0]
    elif case == "unbounded":
        kwargs = {}  # no lower bound: c'w -> -inf along w = -t (1, 1), with G w < 0
        args[0], args[1] = c_hat[:1], torch.ones(1, 2, dtype=D)
    with pytest.raises(error, match=match):
        spo_plus_loss(*args, **kwargs)


def test_spo_plus_loss_empty_batch_and_batch_of_one():
    c_hat, c, G, h, lb = _spo_data()
    empty = spo_plus_loss(c_hat[:0], c[:0], G, h, lb=lb, reduction="none")
    assert empty.shape == (0,)
    total = spo_plus_loss(c_hat[:0], c[:0], G, h, lb=lb, reduction="sum")
    assert float(total.detach()) == 0.0
    total.backward()
    per = spo_plus_loss(c_hat, c, G, h, lb=lb, reduction="none")
    one = spo_plus_loss(c_hat[1:], c[1:], G, h, lb=lb, reduction="none")
    torch.testing.assert_close(one, per[1:])
    assert bool(torch.isfinite(per).all()) and bool((per >= -1e-8).all())  # SPO+ >= 0 (up to solver tolerance)
