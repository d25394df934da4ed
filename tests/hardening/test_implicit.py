"""Bad-input hardening of ``dl.fixed_point``, ``dl.root_find``, ``dl.argmin``,
``dl.least_squares`` and ``dl.custom_root``: a clear exception, or per-sample statuses
whose failures explain every non-finite value, and gradients that stay finite on the
samples that succeeded."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflayers as dl
from difflayers import solvers as S

D = torch.float64
STATUSES = {int(s) for s in dl.Status}
FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# entry point -> (function, problem, solver factory); every problem is solved by z* = c-ish
ENTRY = {
    "fixed_point": (dl.fixed_point, lambda z, c: 0.5 * torch.cos(z) + c, S.Anderson),
    "root_find": (dl.root_find, lambda z, c: z**3 + z - c, S.Newton),
    "argmin": (dl.argmin, lambda z, c: 0.5 * ((z - c) ** 2).sum(-1) + 0.1 * (z**4).sum(-1),
               lambda **kw: S.Newton(linear_solver=S.CG(), **kw)),
    "least_squares": (dl.least_squares, lambda z, c: torch.cat([z - c, 0.1 * z**2], -1), S.LevenbergMarquardt),
}
ADJOINTS = {"Implicit": dl.Implicit, "Unroll": dl.Unroll, "OneStep": dl.OneStep}


def _run(entry, z0, *params, **kwargs):
    fn, problem, make = ENTRY[entry]
    return fn(problem, z0, *params, **kwargs)


@FAST
@given(
    st.sampled_from(sorted(ENTRY)),
    st.integers(0, 3),
    st.integers(1, 3),
    st.sampled_from([None, "param nan", "param inf", "z0 nan", "z0 -inf"]),
    st.sampled_from(sorted(ADJOINTS)),
    st.sampled_from(["default", "max_steps=0", "zero_tol"]),
)
def test_entry_points_report_per_sample_status_and_keep_gradients_finite(entry, batch, n, poison, adjoint, budget):
    fn, problem, make = ENTRY[entry]
    max_steps = {"default": 60, "max_steps=0": 0, "zero_tol": 10}[budget]
    solver = make(max_steps=max_steps, **(dict(rtol=0.0, atol=0.0) if budget == "zero_tol" else {}))
    z0 = torch.zeros(batch, n, dtype=D)
    c = torch.linspace(0.5, 1.0, batch * n, dtype=D).reshape(batch, n)
    if batch and poison is not None:
        what, bad = poison.split()
        (c if what == "param" else z0)[0, 0] = float(bad)
    c.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = fn(problem, z0, c, solver=solver, adjoint=ADJOINTS[adjoint](), throw=False, return_solution=True)
        sol.value.sum().backward()
    assert sol.value.shape == (batch, n) and sol.status.shape == (batch,)
    assert set(sol.status.tolist()) <= STATUSES
    assert bool((sol.stats["num_steps"] <= max_steps).all())
    ok = sol.converged
    assert bool(torch.isfinite(sol.value[ok]).all())
    assert c.grad is not None and c.grad.shape == (batch, n)
    poisoned = batch > 0 and poison is not None
    if poisoned:
        assert int(sol.status[0]) == int(dl.Status.NONFINITE)
    rest = slice(1, None) if poisoned else slice(None)
    # one bad sample never spoils the others, not even their gradients
    assert bool(torch.isfinite(c.grad[rest]).all())
    if budget == "default":
        assert bool(ok[rest].all()), sol.status
    elif budget == "max_steps=0":
        assert set(sol.status[rest].tolist()) <= {int(dl.Status.MAX_STEPS)}
        if adjoint != "OneStep":  # OneStep returns one more (differentiable) step from z0
            torch.testing.assert_close(sol.value[rest].detach(), z0[rest])
    else:
        assert bool(torch.isfinite(sol.value[rest]).all())
    # differentiating an unconverged solution warns, naming it
    if not bool(ok.all()):
        assert any("did not converge" in str(w.message) for w in caught)


@pytest.mark.parametrize("entry", sorted(ENTRY))
@pytest.mark.parametrize("adjoint", sorted(ADJOINTS) + ["CheckpointedUnroll", "Truncated"])
def test_empty_batch_gives_an_empty_result_and_empty_gradient(entry, adjoint):
    make_adjoint = {"CheckpointedUnroll": dl.CheckpointedUnroll, "Truncated": lambda: dl.Truncated(steps=2)}
    adj = (ADJOINTS.get(adjoint) or make_adjoint[adjoint])()
    c = torch.ones(0, 3, dtype=D, requires_grad=True)
    sol = _run(entry, torch.zeros(0, 3, dtype=D), c, adjoint=adj, return_solution=True)
    assert sol.value.shape == (0, 3) and sol.status.shape == (0,)
    sol.value.sum().backward()
    assert c.grad is not None and c.grad.shape == (0, 3)


@pytest.mark.parametrize("entry", sorted(ENTRY))
def test_batch_of_one_equals_its_row_of_a_batch(entry):
    c = torch.tensor([[0.7, 1.1], [0.9, 0.6]], dtype=D)
    both = _run(entry, torch.zeros(2, 2, dtype=D), c)
    one = _run(entry, torch.zeros(1, 2, dtype=D), c[1:])
    torch.testing.assert_close(one, both[1:])


def test_unroll_from_a_converged_start_is_differentiable():
    # no step is taken, so the unrolled derivative is exactly zero (it used to have no graph)
    c = torch.ones(2, 3, dtype=D, requires_grad=True)
    z0 = 2.0 * c.detach()  # the fixed point of z = z / 2 + c
    for adjoint in (dl.Unroll(), dl.CheckpointedUnroll()):
        z = dl.fixed_point(lambda z, c: 0.5 * z + c, z0, c, solver=S.Picard(), adjoint=adjoint)
        (grad,) = torch.autograd.grad(z.sum(), c)
        assert torch.equal(grad, torch.zeros_like(c))


@pytest.mark.parametrize("entry", sorted(ENTRY))
def test_non_convergence_with_throw_raises_convergence_error(entry):
    fn, problem, make = ENTRY[entry]
    c = torch.full((2, 3), 2.0, dtype=D)
    with pytest.raises(dl.ConvergenceError, match=f"{entry}: 2 of 2 samples did not succeed") as info:
        fn(problem, torch.zeros(2, 3, dtype=D), c, solver=make(max_steps=1))
    assert info.value.indices == [0, 1]
    assert info.value.solution.value.shape == (2, 3)


@pytest.mark.parametrize("entry", sorted(ENTRY))
@pytest.mark.parametrize(
    "case, error, match",
    [
        ("param shape", ValueError, r".\(z, \*params\) failed on its first evaluation, with z of shape \(2, 3\) and params of shapes "
                                    r"\[\(3, 3\)\]"),
        ("param dtype", TypeError, "params\\[0\\] has dtype torch.float32 but z0 has torch.float64"),
        ("param device", ValueError, "params\\[0\\] is on meta but z0 is on cpu"),
        ("param type", TypeError, "params\\[0\\] is a float"),
        ("z0 integer", TypeError, "z0 must be a real floating-point tensor"),
        ("z0 0-dim", ValueError, "z0 is 0-dim but batched=True"),
        ("z0 type", TypeError, "z0 must be a torch.Tensor"),
        ("fn type", TypeError, "the problem function must be callable"),
        ("solver class", TypeError, "solver must be a difflayers.solvers solver object"),
        ("adjoint type", TypeError, "adjoint must be a differentiation strategy"),
        ("output shape", ValueError, ". returned shape"),
    ],
)
def test_malformed_inputs_raise_naming_the_argument(entry, case, error, match):
    fn, problem, make = ENTRY[entry]
    z0, c = torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
    args, kwargs = [problem, z0, c], {}
    if case == "param shape":
        args[2] = torch.ones(3, 3, dtype=D)
    elif case == "param dtype":
        args[2] = c.float()
    elif case == "param device":
        args[2] = torch.empty_like(c, device="meta")
    elif case == "param type":
        args[2] = 1.0
    elif case == "z0 integer":
        args[1] = z0.long()
    elif case == "z0 0-dim":
        args[1] = torch.zeros((), dtype=D)
    elif case == "z0 type":
        args[1] = [0.0, 0.0]
    elif case == "fn type":
        args[0] = "f"
    elif case == "solver class":
        kwargs["solver"] = S.Newton
    elif case == "adjoint type":
        kwargs["adjoint"] = "implicit"
    elif case == "output shape":
        args[0] = (lambda z, c: problem(z, c)[:1]) if entry != "argmin" else (lambda z, c: z * c)
    with pytest.raises(error, match=f"{entry}: {match}"):
        fn(*args, **kwargs)


def test_a_solver_for_another_problem_kind_is_refused():
    with pytest.raises(TypeError, match="LevenbergMarquardt solves LeastSquaresProblem only"):
        dl.root_find(lambda z: z, torch.zeros(2, 1, dtype=D), solver=S.LevenbergMarquardt())


@pytest.mark.parametrize(
    "entry, problem, status",
    [
        ("root_find", lambda z, c: z**2 + c, dl.Status.BREAKDOWN),  # no real root: Newton meets J = 0
        ("argmin", lambda z, c: (z * c).sum(-1), dl.Status.BREAKDOWN),  # unbounded linear objective
        ("fixed_point", lambda z, c: 2.0 * z + c, dl.Status.NONFINITE),  # expansive map under Picard
    ],
)
def test_problems_without_a_solution_end_with_a_failure_status(entry, problem, status):
    fn = ENTRY[entry][0]
    solver = S.Picard(max_steps=2000) if entry == "fixed_point" else None
    sol = fn(problem, torch.ones(2, 3, dtype=D), torch.ones(2, 3, dtype=D), solver=solver, throw=False,
             return_solution=True)
    assert sol.status.tolist() == [int(status)] * 2
    assert int(sol.stats["num_steps"].max()) <= (solver.max_steps if solver else 2000)


# --------------------------------------------------------------------- custom_root

def _cbrt(z0, c):
    return c.sign() * c.abs() ** (1 / 3)


CBRT = dl.custom_root(lambda z, c: z**3 - c)


def test_custom_root_empty_batch_and_batch_of_one():
    c = torch.ones(0, 3, dtype=D, requires_grad=True)
    z = CBRT(_cbrt)(torch.ones(0, 3, dtype=D), c)
    assert z.shape == (0, 3)
    z.sum().backward()
    assert c.grad.shape == (0, 3)
    c1 = torch.full((1, 2), 8.0, dtype=D, requires_grad=True)
    z1 = CBRT(_cbrt)(torch.ones(1, 2, dtype=D), c1)
    z1.sum().backward()
    torch.testing.assert_close(c1.grad, torch.full((1, 2), 1 / 12, dtype=D))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_custom_root_warns_when_the_solver_returns_non_finite_points(bad):
    # a NaN residual used to pass the root check (NaN > tol is False) and go unreported
    c = torch.full((2, 3), 8.0, dtype=D)
    c[0, 1] = bad
    c.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"not a root of F for samples \[0\].*NaN/Inf"):
        z = CBRT(_cbrt)(torch.ones(2, 3, dtype=D), c)
    with pytest.warns(RuntimeWarning, match=r"custom_root backward: the linear solve did not converge for samples \[0\]"):
        z.sum().backward()
    assert bool(torch.isfinite(c.grad[1]).all())
    # without gradients the solver's output is returned as computed, with no check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CBRT(_cbrt)(torch.ones(2, 3, dtype=D), c.detach())


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("solver shape", ValueError, r"custom_root: the decorated solver must return a tensor shaped like z0 \(2, 3\)"),
        ("solver type", ValueError, "custom_root: the decorated solver must return a tensor"),
        ("param dtype", TypeError, "custom_root: params\\[0\\] has dtype torch.float32"),
        ("param device", ValueError, "custom_root: params\\[0\\] is on meta"),
        ("F type", TypeError, "custom_root: F must be callable"),
        ("solve type", TypeError, "custom_root: the decorated solver must be callable"),
        ("linear_solver", TypeError, "Implicit: linear_solver must be"),
        ("z0 0-dim", ValueError, "custom_root: z0 is 0-dim"),
    ],
)
def test_custom_root_malformed_inputs(case, error, match):
    c = torch.full((2, 3), 8.0, dtype=D, requires_grad=True)
    z0 = torch.ones(2, 3, dtype=D)
    with pytest.raises(error, match=match):
        if case == "solver shape":
            CBRT(lambda z0, c: z0[:, :2])(z0, c)
        elif case == "solver type":
            CBRT(lambda z0, c: z0.tolist())(z0, c)
        elif case == "param dtype":
            CBRT(_cbrt)(z0, c.float())
        elif case == "param device":
            CBRT(_cbrt)(z0, torch.empty_like(c, device="meta"))
        elif case == "F type":
            dl.custom_root(3)
        elif case == "solve type":
            CBRT(3)
        elif case == "linear_solver":
            dl.custom_root(lambda z: z, linear_solver="gmres")
        elif case == "z0 0-dim":
            CBRT(_cbrt)(torch.ones((), dtype=D), c)
