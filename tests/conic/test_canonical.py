"""canonicalize(): cvxpy problem -> affine map to (P, q, A, b, cones), checked against cvxpy + clarabel."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from difflayers.conic import _canonical
from difflayers.conic._canonical import canonicalize

clarabel = pytest.importorskip("clarabel")
sp = pytest.importorskip("scipy.sparse")

TOL = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9)


def clarabel_solve(P, q, A, b, cones):
    """Solve min 1/2 x'Px + q'x s.t. Ax + s = b, s in K with clarabel directly."""
    n = q.shape[0]
    P_sp = sp.csc_matrix(np.triu(P)) if P is not None else sp.csc_matrix((n, n))
    cl = []
    if cones.zero:
        cl.append(clarabel.ZeroConeT(cones.zero))
    if cones.nonneg:
        cl.append(clarabel.NonnegativeConeT(cones.nonneg))
    for d in cones.soc:
        cl.append(clarabel.SecondOrderConeT(d))
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    for key, value in TOL.items():
        setattr(settings, key, value)
    sol = clarabel.DefaultSolver(P_sp, q, sp.csc_matrix(A), b, cl, settings).solve()
    assert str(sol.status) == "Solved", sol.status
    return np.asarray(sol.x)


def cvxpy_solve(problem, parameters, values):
    for param, value in zip(parameters, values):
        param.value = value
    problem.solve(solver=cp.CLARABEL, **TOL)
    assert problem.status == cp.OPTIMAL
    return problem.value


def check_against_cvxpy(problem, parameters, variables, values, *, batched_values=None):
    """The canonical data, solved by clarabel, reproduce cvxpy's variables and value."""
    prog = canonicalize(problem, parameters, variables)
    tensors = [torch.as_tensor(v, dtype=torch.float64) for v in (batched_values or values)]
    data = prog.evaluate(*tensors)
    batch = data.q.shape[0]
    for k in range(batch):
        sample = [
            (v[k] if (batched_values is not None and np.ndim(v) == len(p.shape) + 1) else v)
            for v, p in zip(batched_values or values, parameters)
        ]
        value = cvxpy_solve(problem, parameters, sample)
        P = None if data.P is None else data.P[k].numpy()
        x = clarabel_solve(P, data.q[k].numpy(), data.A[k].numpy(), data.b[k].numpy(), prog.cones)
        got = prog.recover(torch.as_tensor(x)[None], False)
        for var, tensor in zip(variables, got):
            assert tensor.shape == var.shape
            np.testing.assert_allclose(tensor.numpy(), var.value, atol=1e-6, rtol=1e-6)
        obj = 0.5 * x @ P @ x if P is not None else 0.0
        obj = prog.objective_sign * (obj + data.q[k].numpy() @ x + data.offset[k].item())
        np.testing.assert_allclose(obj, value, atol=1e-6, rtol=1e-6)
    return prog, data


def lp():
    rng = np.random.default_rng(0)
    n, k = 4, 6
    x = cp.Variable(n, name="x")
    c, G, h = cp.Parameter(n, name="c"), cp.Parameter((k, n), name="G"), cp.Parameter(k, name="h")
    problem = cp.Problem(cp.Minimize(c @ x), [G @ x <= h, cp.sum(x) == 1, x >= -2, x <= 2])
    Gv = rng.standard_normal((k, n))
    values = [rng.standard_normal(n), Gv, Gv @ np.full(n, 0.25) + rng.uniform(0.5, 1.0, k)]
    return problem, [c, G, h], [x], values


def qp_quad_form():
    rng = np.random.default_rng(1)
    n = 4
    M = rng.standard_normal((n, n))
    Q = M @ M.T + np.eye(n)
    x = cp.Variable(n, name="x")
    c, lb = cp.Parameter(n, name="c"), cp.Parameter(n, name="lb")
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + c @ x), [x >= lb, cp.sum(x) == 1])
    return problem, [c, lb], [x], [rng.standard_normal(n), rng.uniform(-1, -0.5, n)]


def qp_sum_squares():
    rng = np.random.default_rng(2)
    n, k = 3, 5
    x = cp.Variable(n, name="x")
    A, b = cp.Parameter((k, n), name="A"), cp.Parameter(k, name="b")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
    return problem, [A, b], [x], [rng.standard_normal((k, n)), rng.standard_normal(k)]


def socp():
    rng = np.random.default_rng(3)
    n = 3
    x, t = cp.Variable(n, name="x"), cp.Variable(name="t")
    c, x0, r = cp.Parameter(n, name="c"), cp.Parameter(n, name="x0"), cp.Parameter(name="r", nonneg=True)
    F = rng.standard_normal((2, n))
    problem = cp.Problem(
        cp.Minimize(c @ x + t),
        [cp.norm(x - x0, 2) <= r, cp.norm(F @ x, 2) <= t, cp.sum(x) == cp.sum(x0)],
    )
    return problem, [c, x0, r], [x, t], [rng.standard_normal(n), rng.standard_normal(n), np.array(0.7)]


def matrix_maximize():
    rng = np.random.default_rng(4)
    X = cp.Variable((2, 3), name="X")
    C, lo = cp.Parameter((2, 3), name="C"), cp.Parameter(name="lo")
    W = rng.standard_normal((3, 2))
    problem = cp.Problem(
        cp.Maximize(-cp.sum_squares(X - C) + cp.trace(W @ X)), [X >= lo, cp.sum(X, axis=0) <= 1.0]
    )
    return problem, [C, lo], [X], [rng.standard_normal((2, 3)), np.array(-0.3)]


def parametric_quad_form():
    rng = np.random.default_rng(5)
    n = 3
    x = cp.Variable(n, name="x")
    Q, c = cp.Parameter((n, n), name="Q", PSD=True), cp.Parameter(n, name="c")
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + c @ x), [x >= -1, x <= 1])
    M = rng.standard_normal((n, n))
    return problem, [Q, c], [x], [M @ M.T + 0.1 * np.eye(n), rng.standard_normal(n)]


def symmetric_variable():
    rng = np.random.default_rng(6)
    X = cp.Variable((3, 3), name="X", symmetric=True)
    C = cp.Parameter((3, 3), name="C")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [cp.diag(X) >= 0.5])
    return problem, [C], [X], [rng.standard_normal((3, 3))]


PROBLEMS = [lp, qp_quad_form, qp_sum_squares, socp, matrix_maximize, parametric_quad_form, symmetric_variable]


@pytest.mark.parametrize("make", PROBLEMS, ids=lambda f: f.__name__)
def test_matches_cvxpy(make):
    problem, params, variables, values = make()
    prog, data = check_against_cvxpy(problem, params, variables, values)
    assert data.batched is False
    assert data.A.shape == (1, prog.m, prog.n) and data.b.shape == (1, prog.m) and data.q.shape == (1, prog.n)
    assert prog.cones.dim == prog.m


def test_structure_lp_qp_socp():
    assert canonicalize(*lp()[:3]).quadratic is False
    for make in (qp_quad_form, qp_sum_squares, parametric_quad_form):
        prog = canonicalize(*make()[:3])
        assert prog.quadratic and prog.cones.soc == (), make.__name__
    prog = canonicalize(*socp()[:3])
    assert prog.cones.soc == (4, 3)


def test_mixed_batched_and_unbatched():
    problem, params, variables, values = socp()
    rng = np.random.default_rng(7)
    batched = [np.stack([values[0], rng.standard_normal(3), -values[0]]), values[1], values[2]]
    _, data = check_against_cvxpy(problem, params, variables, values, batched_values=batched)
    assert data.batched and data.q.shape[0] == 3


def test_matrix_parameter_batched():
    problem, params, variables, values = matrix_maximize()
    batched = [np.stack([values[0], 2 * values[0]]), np.array([-0.3, 0.1])]
    check_against_cvxpy(problem, params, variables, values, batched_values=batched)


@pytest.mark.parametrize("make", [lp, socp, parametric_quad_form], ids=lambda f: f.__name__)
def test_sparse_and_dense_maps_agree(make, monkeypatch):
    problem, params, variables, values = make()
    tensors = [torch.as_tensor(v) for v in values]
    monkeypatch.setattr(_canonical, "_DENSE_MAP_MAX_ENTRIES", 1 << 30)
    dense = canonicalize(problem, params, variables)
    monkeypatch.setattr(_canonical, "_DENSE_MAP_MAX_ENTRIES", 0)
    monkeypatch.setattr(_canonical, "_DENSE_MAP_MIN_DENSITY", 2.0)
    sparse = canonicalize(problem, params, variables)
    assert dense.map_dense is not None and sparse.map_dense is None and sparse.map_values is not None
    a, b = dense.evaluate(*tensors), sparse.evaluate(*tensors)
    for u, v in zip(a[:5], b[:5]):
        if u is None:
            assert v is None
        else:
            torch.testing.assert_close(u, v)


def test_affine_map_gradient_and_broadcast():
    problem, params, variables, values = socp()
    prog = canonicalize(problem, params, variables)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x0 = torch.as_tensor(values[1]).requires_grad_()
    r = torch.as_tensor(values[2]).requires_grad_()

    def f(c, x0, r):
        d = prog.evaluate(c, x0, r)
        return d.q, d.A, d.b, d.offset

    torch.autograd.gradcheck(f, (c, x0, r))
    # The gradient of a broadcast (unbatched) parameter is the sum over the batch.
    d = prog.evaluate(c, x0, r)
    (d.b.square().sum() + d.q.sum()).backward()
    total = x0.grad.clone()
    parts = torch.zeros_like(total)
    for k in range(2):
        x0_k = x0.detach().clone().requires_grad_()
        d_k = prog.evaluate(c[k].detach(), x0_k, r.detach())
        (d_k.b.square().sum() + d_k.q.sum()).backward()
        parts += x0_k.grad
    torch.testing.assert_close(total, parts)


def test_float32_evaluation():
    problem, params, variables, values = qp_sum_squares()
    prog = canonicalize(problem, params, variables)
    d64 = prog.evaluate(*[torch.as_tensor(v) for v in values])
    d32 = prog.evaluate(*[torch.as_tensor(v, dtype=torch.float32) for v in values])
    assert d32.A.dtype == torch.float32
    torch.testing.assert_close(d32.A, d64.A.float())
    torch.testing.assert_close(d32.P, d64.P.float())


# ---------------------------------------------------------------- bad inputs


def test_not_dpp():
    x = cp.Variable(2)
    a, b = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(a * b * cp.sum(x)), [x >= 0])
    with pytest.raises(ValueError, match="not DPP"):
        canonicalize(problem, [a, b], [x])


def test_not_dcp():
    x = cp.Variable(2)
    c = cp.Parameter(2)
    problem = cp.Problem(cp.Maximize(cp.sum_squares(x) + c @ x), [x <= 1])
    with pytest.raises(ValueError, match="not DCP"):
        canonicalize(problem, [c], [x])


def test_integer_variable():
    x = cp.Variable(2, integer=True)
    c = cp.Parameter(2)
    with pytest.raises(ValueError, match="integer"):
        canonicalize(cp.Problem(cp.Minimize(c @ x), [x >= 0, x <= 3]), [c], [x])


def test_parameter_list_mismatch():
    problem, (c, G, h), variables, _ = lp()
    with pytest.raises(ValueError, match="missing: \\['h'\\]"):
        canonicalize(problem, [c, G], variables)
    other = cp.Parameter(name="other")
    with pytest.raises(ValueError, match="not in the problem: \\['other'\\]"):
        canonicalize(problem, [c, G, h, other], variables)
    with pytest.raises(ValueError, match="twice"):
        canonicalize(problem, [c, G, h, h], variables)
    with pytest.raises(TypeError, match="list or tuple"):
        canonicalize(problem, {c, G, h}, variables)
    with pytest.raises(TypeError, match="cvxpy.Parameter"):
        canonicalize(problem, [c, G, torch.zeros(3)], variables)


def test_variable_not_in_problem():
    problem, params, _, _ = lp()
    y = cp.Variable(2, name="y")
    with pytest.raises(ValueError, match="'y' does not appear"):
        canonicalize(problem, params, [y])


def test_problem_type():
    with pytest.raises(TypeError, match="cvxpy.Problem"):
        canonicalize("min x", [], [])


@pytest.mark.parametrize("kind", ["exp", "psd", "pow"])
def test_unsupported_cones(kind):
    x = cp.Variable(3)
    c = cp.Parameter(3)
    if kind == "exp":
        problem = cp.Problem(cp.Minimize(c @ x + cp.sum(cp.exp(x))))
        match = "exponential"
    elif kind == "psd":
        X = cp.Variable((2, 2), symmetric=True)
        problem = cp.Problem(cp.Minimize(c @ x + cp.trace(X)), [X >> 0, x >= 0, X[0, 1] == 1])
        match = "semidefinite"
    else:
        problem = cp.Problem(
            cp.Minimize(c @ x), [cp.constraints.PowCone3D(x[0], x[1], x[2], 0.3), x <= 1]
        )
        match = "power"
    with pytest.raises(ValueError, match=f"{match}.*CvxpyLayersBackend"):
        canonicalize(problem, [c], [x])


@pytest.fixture
def lp_program():
    problem, params, variables, values = lp()
    return canonicalize(problem, params, variables), [torch.as_tensor(v) for v in values]


def test_wrong_number_of_tensors(lp_program):
    prog, tensors = lp_program
    with pytest.raises(ValueError, match="expected 3 parameter tensors"):
        prog.evaluate(*tensors[:2])


def test_wrong_shape(lp_program):
    prog, (c, G, h) = lp_program
    with pytest.raises(ValueError, match="parameter 'G' must have shape \\(6, 4\\)"):
        prog.evaluate(c, G.T, h)
    with pytest.raises(ValueError, match="parameter 'c' must have shape"):
        prog.evaluate(c[None, None], G, h)


def test_inconsistent_batch(lp_program):
    prog, (c, G, h) = lp_program
    with pytest.raises(ValueError, match="batch size 3 but 'c' has batch size 2"):
        prog.evaluate(c.expand(2, 4), G, h.expand(3, 6))


def test_dtype_errors(lp_program):
    prog, (c, G, h) = lp_program
    with pytest.raises(TypeError, match="'c' must have a real floating dtype"):
        prog.evaluate(c.long(), G, h)
    with pytest.raises(TypeError, match="'h' must be a torch.Tensor"):
        prog.evaluate(c, G, h.numpy())
    with pytest.raises(TypeError, match="'G' has dtype torch.float32"):
        prog.evaluate(c, G.float(), h)


def test_device_errors(lp_program):
    prog, (c, G, h) = lp_program
    with pytest.raises(ValueError, match="'G' is on meta"):
        prog.evaluate(c, G.to("meta"), h)
    with pytest.raises(ValueError, match="layer.to"):
        prog.evaluate(c.to("meta"), G.to("meta"), h.to("meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(lp_program, bad):
    prog, (c, G, h) = lp_program
    h = h.clone()
    h[2] = bad
    with pytest.raises(ValueError, match="'h'.*NaN or Inf"):
        prog.evaluate(c, G, h)
