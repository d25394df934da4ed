"""Bad-input hardening of ``dl.solvers.linear_solve`` and the solver objects.

Every case ends in a clear exception or in per-sample statuses; no loop runs past
``max_steps`` and no non-finite value comes back with a ``SUCCESS`` status.
"""

import dataclasses
import math

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

# name -> factory(max_steps, rtol, atol); None tolerances mean the dtype default
ITERATIVE = {
    "CG": lambda **kw: S.CG(**kw),
    "MINRES": lambda **kw: S.MINRES(**kw),
    "GMRES": lambda **kw: S.GMRES(restart=3, **kw),
    "BiCGStab": lambda **kw: S.BiCGStab(**kw),
    "Neumann": lambda **kw: S.Neumann(**kw),
    "Auto": lambda **kw: S.Auto(**kw),
}
DIRECT = {"LU": S.LU, "Cholesky": S.Cholesky, "LSTSQ": S.LSTSQ}


def check_outcome(sol, batch, max_steps=None):
    """The invariants every batched solve keeps, whatever its input."""
    assert sol.status.shape == (batch,) and sol.status.dtype == torch.int64
    assert set(sol.status.tolist()) <= STATUSES
    assert sol.stats["num_steps"].shape == (batch,)
    if max_steps is not None:
        assert bool((sol.stats["num_steps"] <= max_steps).all())
    # a non-finite value is always explained by a failure status
    assert bool(torch.isfinite(sol.value[sol.converged]).all()), "a SUCCESS sample holds NaN/Inf"


@st.composite
def linear_systems(draw):
    batch = draw(st.integers(0, 3))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=g, dtype=D)
    A = torch.eye(n, dtype=D) + 0.1 * (M + M.mT) / 2  # symmetric, eigenvalues near 1
    b = torch.randn(batch, n, generator=g, dtype=D) + 0.5
    return A, b, draw(st.booleans())  # dense or matrix-free


@FAST
@given(
    linear_systems(),
    st.sampled_from(sorted(ITERATIVE) + sorted(DIRECT)),
    st.sampled_from([None, "b", "A", "x0", "matvec"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from(["default", "zero_tol", "max_steps=0", "max_steps=1"]),
)
def test_linear_solve_fails_clearly_or_reports_status(system, name, poison, bad, budget):
    A, b, dense = system
    batch, n = b.shape
    x0 = torch.zeros_like(b)
    if name in DIRECT:
        solver, max_steps = DIRECT[name](), None
    else:
        max_steps = {"default": 200, "zero_tol": 30, "max_steps=0": 0, "max_steps=1": 1}[budget]
        tol = dict(rtol=0.0, atol=0.0) if budget == "zero_tol" else {}
        solver = ITERATIVE[name](max_steps=max_steps, **tol)
    if poison == "b" and batch:
        b[0, 0] = bad
    if poison == "A" and batch:
        A[0, 0, 0] = bad
    if poison == "x0" and batch:
        x0[0, -1] = bad
    operator = A if dense or poison == "A" else (lambda x: torch.einsum("bij,bj->bi", A, x))
    if poison == "matvec":
        operator = lambda x: torch.einsum("bij,bj->bi", A, x) * torch.tensor(  # noqa: E731
            [bad] + [1.0] * (batch - 1), dtype=D
        )[:, None]
    run = lambda: dl.linear_solve(  # noqa: E731
        operator, b, solver, x0=x0, symmetric=True, positive_definite=True, throw=False
    )
    if poison in ("b", "A", "x0") and batch:
        with pytest.raises(ValueError, match=f"linear_solve: {poison} contains NaN or Inf"):
            run()
        return
    sol = run()
    check_outcome(sol, batch, max_steps)
    assert sol.value.shape == (batch, n)
    if poison == "matvec" and batch:
        # the sample whose operator produces NaN says so; the others are untouched
        assert int(sol.status[0]) in (int(dl.Status.NONFINITE), int(dl.Status.BREAKDOWN))
        clean = dl.linear_solve(lambda x: torch.einsum("bij,bj->bi", A[1:], x), b[1:], solver, x0=x0[1:],
                                symmetric=True, positive_definite=True, throw=False)
        assert sol.status[1:].tolist() == clean.status.tolist()
        torch.testing.assert_close(sol.value[1:], clean.value)
        return
    if budget == "max_steps=0" and name not in DIRECT:
        assert bool((sol.stats["num_steps"] == 0).all())
        assert bool((sol.status == int(dl.Status.MAX_STEPS)).all())  # b != 0: x0 = 0 is not a solution
        assert torch.equal(sol.value, x0)
    elif budget == "zero_tol" and name not in DIRECT:
        # nothing meets a zero tolerance but an exact solve: the loop stops at max_steps
        assert set(sol.status.tolist()) <= {int(dl.Status.SUCCESS), int(dl.Status.MAX_STEPS), int(dl.Status.BREAKDOWN)}
    elif budget == "default" or name in DIRECT:
        assert bool(sol.converged.all()), sol.status
        expected = torch.linalg.solve(A, b) if batch else b
        torch.testing.assert_close(sol.value, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ITERATIVE) + sorted(DIRECT))
def test_linear_solve_batch_of_one_and_empty_batch(name):
    solver = ITERATIVE[name](max_steps=100) if name in ITERATIVE else DIRECT[name]()
    A = torch.tensor([[1.2, 0.1], [0.1, 0.9]], dtype=D)  # close to I: Neumann converges too
    for operator in (A, lambda x: x @ A.mT):
        sol = dl.linear_solve(operator, torch.ones(1, 2, dtype=D), solver, symmetric=True, positive_definite=True)
        torch.testing.assert_close(sol.value, torch.linalg.solve(A, torch.ones(2, dtype=D))[None])
        empty = dl.linear_solve(operator, torch.ones(0, 2, dtype=D), solver, symmetric=True, positive_definite=True)
        assert empty.value.shape == (0, 2) and empty.status.shape == (0,)
        assert empty.stats["residual"].shape == (0,)


@pytest.mark.parametrize("name", sorted(ITERATIVE))
def test_non_convergence_with_throw_raises_convergence_error(name):
    A = torch.diag(torch.arange(1.0, 9.0, dtype=D))
    b = torch.ones(2, 8, dtype=D)
    with pytest.raises(dl.ConvergenceError, match=r"linear_solve: 2 of 2 samples did not succeed") as info:
        dl.linear_solve(lambda x: x @ A, b, ITERATIVE[name](max_steps=1), symmetric=True, positive_definite=True)
    assert info.value.indices == [0, 1] and set(info.value.statuses) == {dl.Status.MAX_STEPS}


def test_singular_and_indefinite_operators_report_breakdown_not_nan():
    singular = torch.zeros(2, 2, dtype=D)
    b = torch.ones(2, 2, dtype=D)
    for solver in (S.LU(), S.Cholesky(), S.CG(), S.MINRES(), S.GMRES(), S.BiCGStab()):
        sol = dl.linear_solve(singular, b, solver, symmetric=True, positive_definite=True, throw=False)
        check_outcome(sol, 2)
        assert set(sol.status.tolist()) == {int(dl.Status.BREAKDOWN)}, (solver, sol.status)
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    sol = dl.linear_solve(lambda x: x @ indefinite, b, S.CG(), symmetric=True, positive_definite=True, throw=False)
    assert set(sol.status.tolist()) == {int(dl.Status.BREAKDOWN)}
    # Neumann does not converge for a spectral radius >= 1: MAX_STEPS, never SUCCESS
    sol = dl.linear_solve(singular, b, S.Neumann(max_steps=20), throw=False)
    assert set(sol.status.tolist()) == {int(dl.Status.MAX_STEPS)}


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_dense_solvers_flag_an_infinite_operator(name):
    # [[inf]] x = b "solves" to x = 0, a finite value: only the NaN residual tells
    scale = torch.tensor([[math.inf], [1.0]], dtype=D)
    sol = dl.linear_solve(lambda x: 2.0 * x * scale, torch.ones(2, 1, dtype=D), DIRECT[name](), symmetric=True,
                          positive_definite=True, throw=False)
    assert int(sol.status[0]) in (int(dl.Status.NONFINITE), int(dl.Status.BREAKDOWN))
    assert int(sol.status[1]) == int(dl.Status.SUCCESS)
    torch.testing.assert_close(sol.value[1], torch.full((1,), 0.5, dtype=D))


def test_lstsq_with_a_non_finite_matvec_reports_nonfinite():
    # LAPACK rejects non-finite input with an internal error; the sample is NONFINITE instead
    A = torch.eye(2, dtype=D)
    scale = torch.tensor([[math.nan], [1.0]], dtype=D)
    sol = dl.linear_solve(lambda x: x @ A * scale, torch.ones(2, 2, dtype=D), S.LSTSQ(), throw=False)
    assert sol.status.tolist() == [int(dl.Status.NONFINITE), int(dl.Status.SUCCESS)]
    torch.testing.assert_close(sol.value[1], torch.ones(2, dtype=D))


def _meta(t):
    return torch.empty_like(t, device="meta")


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("A size", ValueError, r"A has shape \(3, 3\), which acts on vectors of size 3"),
        ("A batch", ValueError, "A has batch size 3 but b has batch size 2"),
        ("A not square", ValueError, "square matrix"),
        ("b 1-D", ValueError, r"b must have shape \[B, n\]"),
        ("x0 shape", ValueError, "x0 must match b"),
        ("preconditioner size", ValueError, "preconditioner has shape"),
        ("matvec shape", ValueError, r"the matvec A returned shape \(2, 4\) for x of shape \(2, 2\)"),
        ("matvec type", ValueError, "the matvec A returned a list"),
        ("A dtype", TypeError, "A has dtype torch.float32 but b has dtype torch.float64"),
        ("preconditioner dtype", TypeError, "preconditioner has dtype torch.float32"),
        ("x0 dtype", TypeError, "x0 has dtype torch.float32 but b has dtype torch.float64"),
        ("b integer", TypeError, "b must be a floating-point tensor"),
        ("A integer", TypeError, "A must be a floating-point tensor"),
        ("A device", ValueError, "A is on device meta but b is on cpu"),
        ("b device", ValueError, "A is on device cpu but b is on meta"),
        ("x0 device", ValueError, "x0 is on device meta but b is on cpu"),
        ("preconditioner device", ValueError, "preconditioner is on device meta"),
        ("A type", TypeError, "A must be a LinearOperator"),
        ("solver class", TypeError, r"Pass an instance: solver=CG\(\)"),
        ("solver type", TypeError, "solver must be a LinearSolver instance"),
    ],
)
def test_linear_solve_rejects_mismatched_inputs(case, error, match):
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    b = torch.ones(2, 2, dtype=D)
    args, kwargs = [A, b], {}
    if case == "A size":
        args[0] = torch.eye(3, dtype=D)
    elif case == "A batch":
        args[0] = A.expand(3, 2, 2)
    elif case == "A not square":
        args[0] = torch.ones(2, 2, 3, dtype=D)
    elif case == "b 1-D":
        args[1] = b[0]
    elif case == "x0 shape":
        kwargs["x0"] = torch.zeros(2, 3, dtype=D)
    elif case == "preconditioner size":
        kwargs.update(solver=S.GMRES(), preconditioner=torch.eye(3, dtype=D))
    elif case == "matvec shape":
        args[0] = lambda x: torch.cat([x, x], 1)
    elif case == "matvec type":
        args[0] = lambda x: [x]
    elif case == "A dtype":
        args[0] = A.float()
    elif case == "preconditioner dtype":
        kwargs.update(solver=S.GMRES(), preconditioner=A.float())
    elif case == "x0 dtype":
        kwargs["x0"] = b.float()
    elif case == "b integer":
        args[1] = b.long()
    elif case == "A integer":
        args[0] = A.long()
    elif case == "A device":
        args[0] = _meta(A)
    elif case == "b device":
        args[1] = _meta(b)
    elif case == "x0 device":
        kwargs["x0"] = _meta(b)
    elif case == "preconditioner device":
        kwargs.update(solver=S.GMRES(), preconditioner=_meta(A))
    elif case == "A type":
        args[0] = "A"
    elif case == "solver class":
        kwargs["solver"] = S.CG
    elif case == "solver type":
        kwargs["solver"] = "cg"
    with pytest.raises(error, match=match):
        dl.linear_solve(*args, **kwargs)


# --------------------------------------------------------------------- solver objects

ALL_ITERATIVE_CLASSES = [S.CG, S.MINRES, S.GMRES, S.BiCGStab, S.Neumann, S.Auto, S.Picard, S.Anderson, S.Broyden,
                         S.Newton, S.GaussNewton, S.LevenbergMarquardt]


@pytest.mark.parametrize("cls", ALL_ITERATIVE_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kwargs",
    [dict(rtol=-1e-3), dict(rtol=math.nan), dict(atol=math.inf), dict(max_steps=-1), dict(max_steps=2.5),
     dict(check_every=0)],
    ids=["negative rtol", "nan rtol", "inf atol", "negative max_steps", "float max_steps", "check_every 0"],
)
def test_solver_hyperparameters_are_validated(cls, kwargs):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {next(iter(kwargs))} must be"):
        cls(**kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: S.GMRES(restart=0), ValueError, "GMRES: restart must be an int >= 1"),
        (lambda: S.Neumann(step_size=0.0), ValueError, "Neumann: step_size must be a finite number > 0"),
        (lambda: S.Neumann(step_size=-1.0), ValueError, "Neumann: step_size"),
        (lambda: S.Picard(damping=0.0), ValueError, r"Picard: damping must be in \(0, 1\]"),
        (lambda: S.Picard(damping=1.5), ValueError, "Picard: damping"),
        (lambda: S.Anderson(memory=0), ValueError, "Anderson: memory must be an int >= 1"),
        (lambda: S.Anderson(regularization=-1.0), ValueError, "Anderson: regularization must be >= 0"),
        (lambda: S.Anderson(max_coefficient=1.0), ValueError, "Anderson: max_coefficient must be > 1"),
        (lambda: S.Broyden(memory=0), ValueError, "Broyden: memory must be an int >= 1"),
        (lambda: S.Broyden(damping=-0.5), ValueError, "Broyden: damping"),
        (lambda: S.Newton(armijo=0.0), ValueError, r"Newton: armijo must be in \(0, 0.5\)"),
        (lambda: S.Newton(min_step=0.0), ValueError, r"Newton: min_step must be in \(0, 1\)"),
        (lambda: S.Newton(linear_solver="lu"), TypeError, "Newton: linear_solver must be"),
        (lambda: S.Newton(line_search=1), TypeError, "Newton: line_search must be True or False"),
        (lambda: S.GaussNewton(armijo=0.5), ValueError, "GaussNewton: armijo"),
        (lambda: S.LevenbergMarquardt(initial_damping=0.0), ValueError, "LevenbergMarquardt: initial_damping"),
        (lambda: S.LevenbergMarquardt(initial_damping=math.inf), ValueError, "LevenbergMarquardt: initial_damping"),
        (lambda: S.LSTSQ(rcond=-1.0), ValueError, r"LSTSQ: rcond must be None or in \[0, 1\)"),
    ],
)
def test_method_specific_hyperparameters_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _fixed_point_problem():
    return S.FixedPointProblem(lambda z, c: 0.5 * torch.cos(z) + c)


def _least_squares_problem():
    return S.LeastSquaresProblem(lambda z, c: torch.cat([z - c, 0.1 * z**2], dim=1))


NONLINEAR = {
    "Picard": (S.Picard, _fixed_point_problem),
    "Anderson": (S.Anderson, _fixed_point_problem),
    "Broyden": (S.Broyden, _fixed_point_problem),
    "Newton": (S.Newton, _fixed_point_problem),
    "Newton-GMRES": (lambda **kw: S.Newton(linear_solver=S.GMRES(), **kw), _fixed_point_problem),
    "GaussNewton": (S.GaussNewton, _least_squares_problem),
    "LevenbergMarquardt": (S.LevenbergMarquardt, _least_squares_problem),
    "LevenbergMarquardt-CG": (lambda **kw: S.LevenbergMarquardt(linear_solver=S.CG(), **kw), _least_squares_problem),
}


@FAST
@given(
    st.sampled_from(sorted(NONLINEAR)),
    st.integers(0, 3),
    st.integers(1, 3),
    st.sampled_from([None, "z0", "param"]),
    st.sampled_from([math.nan, math.inf]),
    st.sampled_from(["default", "zero_tol", "max_steps=0"]),
)
def test_nonlinear_solvers_report_statuses(name, batch, n, poison, bad, budget):
    make, problem = NONLINEAR[name]
    max_steps = {"default": 80, "zero_tol": 12, "max_steps=0": 0}[budget]
    tol = dict(rtol=0.0, atol=0.0) if budget == "zero_tol" else {}
    solver = make(max_steps=max_steps, **tol)
    z0 = torch.zeros(batch, n, dtype=D)
    c = torch.linspace(0.5, 1.5, batch * n, dtype=D).reshape(batch, n)
    if batch and poison == "z0":
        z0[0, 0] = bad
    if batch and poison == "param":
        c[0, -1] = bad
    sol = solver.solve(problem(), z0, (c,))
    check_outcome(sol, batch, max_steps)
    assert sol.value.shape == (batch, n)
    poisoned = batch > 0 and poison is not None
    if poisoned:
        assert int(sol.status[0]) == int(dl.Status.NONFINITE)
    rest = sol.status[1:] if poisoned else sol.status
    if budget == "max_steps=0":
        assert bool((sol.stats["num_steps"] == 0).all()) and torch.equal(sol.value[1:], z0[1:])
        assert set(rest.tolist()) <= {int(dl.Status.MAX_STEPS)}
    elif budget == "default":
        assert set(rest.tolist()) <= {int(dl.Status.SUCCESS)}
    else:  # zero tolerances: stops at max_steps (or earlier on an exact root or a stalled line search)
        assert set(rest.tolist()) <= {int(s) for s in (dl.Status.SUCCESS, dl.Status.MAX_STEPS,
                                                        dl.Status.LINE_SEARCH_FAILED)}
        assert bool(torch.isfinite(sol.value[1:] if poisoned else sol.value).all())


def test_least_squares_solvers_refuse_other_problems():
    for solver in (S.GaussNewton(), S.LevenbergMarquardt()):
        with pytest.raises(TypeError, match="solves LeastSquaresProblem only"):
            solver.solve(_fixed_point_problem(), torch.zeros(1, 2, dtype=D), (torch.ones(1, 2, dtype=D),))


def test_max_steps_zero_is_documented():
    # the documented outcome of max_steps=0: the initial guess with MAX_STEPS
    assert "max_steps=0" in dl.linear_solve.__doc__ and "MAX_STEPS" in dl.linear_solve.__doc__
    assert "max_steps=0" in S.IterativeSolver.__doc__


def test_replace_keeps_validation():
    # solvers are frozen dataclasses: dataclasses.replace re-validates
    with pytest.raises(ValueError, match="CG: max_steps"):
        dataclasses.replace(S.CG(), max_steps=-3)


def test_describe_an_empty_batch():
    sol = dl.linear_solve(torch.eye(2, dtype=D), torch.ones(0, 2, dtype=D), S.CG())
    assert sol.describe() == "0/0 converged"
    assert dl.linear_solve(torch.eye(2, dtype=D), torch.ones(1, 2, dtype=D), S.CG()).describe().startswith("1/1")
