"""ConicLayer: forward vs cvxpy, gradients vs cvxpylayers and finite differences, batching."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from difflayers.conic._cvxpy_layer import ConicLayer, CvxpyLayersBackend

# cvxpylayers' diffcp interface converts torch tensors with np.array (a NumPy 2 deprecation).
_DIFFCP_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"

TOL = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9)


def _t(v, **kw):
    return torch.as_tensor(np.asarray(v, dtype=np.float64), **kw)


def qp_sum_squares():
    rng = np.random.default_rng(10)
    n, k = 3, 5
    x = cp.Variable(n, name="x")
    A, b = cp.Parameter((k, n), name="A"), cp.Parameter(k, name="b")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), [x >= -0.2, cp.sum(x) <= 1])
    return problem, [A, b], [x], [rng.standard_normal((k, n)), rng.standard_normal(k)]


def socp():
    rng = np.random.default_rng(11)
    n = 3
    x = cp.Variable(n, name="x")
    c, x0, r = cp.Parameter(n, name="c"), cp.Parameter(n, name="x0"), cp.Parameter(name="r", nonneg=True)
    problem = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [cp.norm(x - x0, 2) <= r])
    return problem, [c, x0, r], [x], [rng.standard_normal(n), 0.3 * rng.standard_normal(n), np.array(0.5)]


def lp():
    rng = np.random.default_rng(12)
    n, k = 3, 5
    x = cp.Variable(n, name="x")
    c, G, h = cp.Parameter(n, name="c"), cp.Parameter((k, n), name="G"), cp.Parameter(k, name="h")
    problem = cp.Problem(cp.Minimize(c @ x), [G @ x <= h, x >= -1, x <= 1])
    Gv = rng.standard_normal((k, n))
    return problem, [c, G, h], [x], [rng.standard_normal(n), Gv, Gv @ np.zeros(n) + rng.uniform(0.5, 1.0, k)]


def matrix_maximize():
    rng = np.random.default_rng(13)
    X, y = cp.Variable((2, 3), name="X"), cp.Variable(name="y")
    C, lo = cp.Parameter((2, 3), name="C"), cp.Parameter(name="lo")
    problem = cp.Problem(cp.Maximize(-cp.sum_squares(X - C) - cp.square(y - lo)), [X >= lo, y >= 0])
    return problem, [C, lo], [X, y], [rng.standard_normal((2, 3)), np.array(0.2)]


def parametric_quad_form():
    rng = np.random.default_rng(14)
    n = 3
    x = cp.Variable(n, name="x")
    Q, c = cp.Parameter((n, n), name="Q", PSD=True), cp.Parameter(n, name="c")
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + c @ x), [x >= -1, x <= 1])
    M = rng.standard_normal((n, n))
    return problem, [Q, c], [x], [M @ M.T + 0.5 * np.eye(n), rng.standard_normal(n)]


PROBLEMS = [qp_sum_squares, socp, lp, matrix_maximize, parametric_quad_form]
SMOOTH = [qp_sum_squares, socp, matrix_maximize, parametric_quad_form]  # unique, differentiable optima


def cvxpy_values(problem, params, variables, values):
    for p, v in zip(params, values):
        p.value = np.asarray(v)
    problem.solve(solver=cp.CLARABEL, **TOL)
    assert problem.status == cp.OPTIMAL
    return [np.asarray(v.value) for v in variables]


@pytest.mark.parametrize("make", PROBLEMS, ids=lambda f: f.__name__)
def test_forward_matches_cvxpy(make):
    problem, params, variables, values = make()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    outs = layer(*[_t(v) for v in values])
    assert isinstance(outs, tuple) and len(outs) == len(variables)
    for out, ref, var in zip(outs, cvxpy_values(problem, params, variables, values), variables):
        assert out.shape == var.shape and out.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-6, rtol=1e-6)


def test_return_solution():
    problem, params, variables, values = socp()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    x, solution = layer(*[_t(v) for v in values], return_solution=True)
    assert int(solution.status[0]) == 0
    prog = layer.program
    assert solution.z.shape == (1, prog.m) and solution.x.shape == (1, prog.n)
    torch.testing.assert_close(prog.recover(solution.x, False)[0], x)


def _loss_weights(variables, seed=0):
    rng = np.random.default_rng(seed)
    return [_t(rng.standard_normal(v.shape)) for v in variables]


def _loss(outs, weights):
    return sum((o * w).sum() for o, w in zip(outs, weights))


@pytest.mark.parametrize("make", SMOOTH, ids=lambda f: f.__name__)
def test_gradient_finite_differences(make):
    problem, params, variables, values = make()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    weights = _loss_weights(variables)
    tensors = [_t(v, ).requires_grad_() for v in values]
    _loss(layer(*tensors), weights).backward()
    rng = np.random.default_rng(1)
    directions = [_t(rng.standard_normal(np.shape(v))) for v in values]
    for d, p in zip(directions, params):
        if p.attributes.get("PSD"):
            d.copy_(0.5 * (d + d.T))  # stay in the parameter's domain (symmetric)
    analytic = sum((t.grad * d).sum() for t, d in zip(tensors, directions))
    h = 1e-5
    with torch.no_grad():
        plus = _loss(layer(*[t + h * d for t, d in zip(tensors, directions)]), weights)
        minus = _loss(layer(*[t - h * d for t, d in zip(tensors, directions)]), weights)
    numeric = (plus - minus) / (2 * h)
    torch.testing.assert_close(analytic, numeric, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings(_DIFFCP_WARNING)
@pytest.mark.parametrize("make", [qp_sum_squares, socp], ids=lambda f: f.__name__)
def test_gradient_matches_cvxpylayers(make):
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    problem, params, variables, values = make()
    weights = _loss_weights(variables)
    ours = [_t(v).requires_grad_() for v in values]
    _loss(ConicLayer(problem, parameters=params, variables=variables)(*ours), weights).backward()
    ref_layer = cvxpylayers_torch.CvxpyLayer(problem, parameters=params, variables=variables)
    theirs = [_t(v).requires_grad_() for v in values]
    outs = ref_layer(*theirs, solver_args={"eps": 1e-12, "max_iters": 100000})
    _loss(outs, weights).backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)


def _batched_values(values, params, size, seed=2):
    """Batch the first parameter; perturb it per sample; keep the others unbatched."""
    rng = np.random.default_rng(seed)
    first = np.stack([values[0] + 0.2 * rng.standard_normal(np.shape(values[0])) for _ in range(size)])
    if params[0].attributes.get("PSD"):
        first = np.stack([values[0] + 0.1 * (k + 1) * np.eye(len(values[0])) for k in range(size)])
    return [first, *values[1:]]


@pytest.mark.parametrize("make", SMOOTH, ids=lambda f: f.__name__)
def test_batched_equals_loop_and_broadcast_gradient_summed(make):
    problem, params, variables, values = make()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    weights = _loss_weights(variables)
    batched_values = _batched_values(values, params, 3)
    tensors = [_t(v).requires_grad_() for v in batched_values]
    outs = layer(*tensors)
    assert all(o.shape == (3, *v.shape) for o, v in zip(outs, variables))
    _loss(outs, weights).backward()
    summed = [torch.zeros_like(t) for t in tensors[1:]]
    for k in range(3):
        sample = [_t(batched_values[0][k]).requires_grad_()] + [_t(v).requires_grad_() for v in batched_values[1:]]
        outs_k = layer(*sample)
        for o_batch, o_k in zip(outs, outs_k):
            torch.testing.assert_close(o_batch[k], o_k, atol=1e-8, rtol=1e-7)
        _loss(outs_k, weights).backward()
        torch.testing.assert_close(tensors[0].grad[k], sample[0].grad, atol=1e-7, rtol=1e-6)
        for acc, t in zip(summed, sample[1:]):
            acc += t.grad
    for t, acc in zip(tensors[1:], summed):
        torch.testing.assert_close(t.grad, acc, atol=1e-7, rtol=1e-6)


def test_float32_layer():
    problem, params, variables, values = qp_sum_squares()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    (x64,) = layer(*[_t(v) for v in values])
    layer = layer.to(torch.float32)
    inputs = [_t(v).float().requires_grad_() for v in values]
    (x32,) = layer(*inputs)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, x64.float(), atol=1e-4, rtol=1e-3)
    x32.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in inputs)
    (x_back,) = layer.double()(*[_t(v) for v in values])
    torch.testing.assert_close(x_back, x64)


def test_no_grad_and_requires_grad_false():
    problem, params, variables, values = socp()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    with torch.no_grad():
        (a,) = layer(*[_t(v).requires_grad_() for v in values])
    (b,) = layer(*[_t(v) for v in values])
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)


def test_call_errors():
    problem, params, variables, values = socp()
    layer = ConicLayer(problem, parameters=params, variables=variables)
    tensors = [_t(v) for v in values]
    with pytest.raises(ValueError, match="expected 3 parameter tensors"):
        layer(*tensors[:2])
    with pytest.raises(ValueError, match="parameter 'x0' must have shape"):
        layer(tensors[0], tensors[1][:2], tensors[2])
    with pytest.raises(ValueError, match="'r'.*NaN or Inf"):
        layer(tensors[0], tensors[1], torch.tensor(float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="layer.to"):
        layer(*[t.to("meta") for t in tensors])


def test_construction_errors():
    problem, params, variables, _ = socp()
    with pytest.raises(ValueError, match="on_failure"):
        ConicLayer(problem, parameters=params, variables=variables, on_failure="ignore")
    with pytest.raises(ValueError, match="missing"):
        ConicLayer(problem, parameters=params[:2], variables=variables)
    x = cp.Variable(3)
    c = cp.Parameter(3)
    exp_problem = cp.Problem(cp.Minimize(c @ x + cp.sum(cp.exp(x))))
    with pytest.raises(ValueError, match="CvxpyLayersBackend"):
        ConicLayer(exp_problem, parameters=[c], variables=[x])


def test_backend_options_validated():
    with pytest.raises(TypeError, match="solver_args"):
        CvxpyLayersBackend(solver_args=[("eps", 1e-9)])
    with pytest.raises(TypeError, match="solver must be"):
        CvxpyLayersBackend(solver=3)
    backend = CvxpyLayersBackend(solver_args={"eps": 1e-9})
    with pytest.raises(TypeError):
        backend.solver_args["eps"] = 1.0  # read-only copy


def _exp_problem():
    n = 3
    x = cp.Variable(n, name="x")
    c = cp.Parameter(n, name="c")
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum(cp.exp(x)) + 0.5 * cp.sum_squares(x)), [x >= -2])
    return problem, [c], [x]


@pytest.mark.filterwarnings(_DIFFCP_WARNING)
def test_cvxpylayers_backend_exp_cone():
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    problem, params, variables = _exp_problem()
    args = {"eps": 1e-10, "max_iters": 100000}
    layer = ConicLayer(problem, parameters=params, variables=variables, solver=CvxpyLayersBackend(solver_args=args))
    ref = cvxpylayers_torch.CvxpyLayer(problem, parameters=params, variables=variables, solver_args=args)
    c = torch.tensor([[0.5, -1.0, 1.0], [1.5, 0.0, -0.5]], dtype=torch.float64, requires_grad=True)
    c_ref = c.detach().clone().requires_grad_()
    (x,) = layer(c)
    (x_ref,) = ref(c_ref)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-6)
    # closed form: c + exp(x) + x = 0 (x > -2 is inactive here)
    torch.testing.assert_close(c + torch.exp(x) + x, torch.zeros_like(c), atol=1e-5, rtol=0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (x * w).sum().backward()
    (x_ref * w).sum().backward()
    torch.testing.assert_close(c.grad, c_ref.grad, atol=1e-6, rtol=1e-5)
    # dx/dc = -1 / (exp(x) + 1), elementwise
    torch.testing.assert_close(c.grad, -w / (torch.exp(x.detach()) + 1), atol=1e-4, rtol=1e-4)


def test_cvxpylayers_backend_errors():
    pytest.importorskip("cvxpylayers.torch")
    problem, params, variables = _exp_problem()
    backend = CvxpyLayersBackend()
    with pytest.raises(ValueError, match="adjoint"):
        ConicLayer(problem, parameters=params, variables=variables, solver=backend, adjoint=object())
    with pytest.raises(ValueError, match="on_failure"):
        ConicLayer(problem, parameters=params, variables=variables, solver=backend, on_failure="nan")
    layer = ConicLayer(problem, parameters=params, variables=variables, solver=backend)
    with pytest.raises(ValueError, match="return_solution"):
        layer(torch.zeros(3, dtype=torch.float64), return_solution=True)
    with pytest.raises(ValueError, match="parameter 'c' must have shape"):
        layer(torch.zeros(4, dtype=torch.float64))
