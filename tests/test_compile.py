"""``torch.compile`` on the fixed-iteration paths (see docs/compile.md).

With ``check_every >= max_steps`` a solve reads nothing from the device, so Dynamo
captures it whole (``fullgraph=True``). Each test compiles with a backend that skips
C++ code generation (``"aot_eager"``: Dynamo and AOTAutograd, the tracing inductor
also does; ``"eager"``: Dynamo's capture alone, for the longest traces) and compares
with the eager result in float64. What cannot be one graph is asserted to fail with
its documented reason, so the table in docs/compile.md stays true:

* ``Implicit()`` adjoints (checked for ``fixed_point`` and ``QPLayer``; ``sinkhorn``'s
  goes through the same Function): Dynamo in torch 2.13 does not trace an
  ``autograd.Function`` that defines ``jvp`` (forward mode); with ``fullgraph=False``
  the solve compiles and the Function runs eagerly.
* ``Sinkhorn(kernel=...)`` stabilized-kernel iterations: re-absorbing the scalings and
  the log-domain fallback after an overflow are host decisions on the data.
"""

import pytest
import torch
import torch._dynamo

import difflayers as dl
from difflayers.solvers import Anderson, Picard, iterate

DT = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager", fullgraph=True):
    return torch.compile(fn, fullgraph=fullgraph, backend=backend)


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


# ----------------------------------------------------------------------------- driver


def test_fixed_iterations_read_nothing_from_the_device(monkeypatch):
    """``check_every >= max_steps``: no host read; converged samples are frozen and
    counted as such, the others take exactly ``max_steps`` steps."""
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=DT)

    def step(state):
        return {"x": 0.5 * state["x"]}

    def residual(state):
        return state["x"].abs()[:, 0], torch.zeros(3, dtype=DT)

    def no_host_read(*args):
        raise AssertionError("host read inside the fixed-iteration loop")

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    state, status, num_steps, err = iterate(step, residual, {"x": x}, rtol=0.0, atol=1e-3, max_steps=5, check_every=5)
    monkeypatch.undo()
    assert status.tolist() == [int(dl.Status.SUCCESS), int(dl.Status.MAX_STEPS), int(dl.Status.MAX_STEPS)]
    assert num_steps.tolist() == [0, 5, 5]
    _close(state["x"], torch.tensor([[0.0], [1 / 32], [2 / 32]], dtype=DT))


# ----------------------------------------------------------------------------- fixed point

B, N = 4, 6


def _contraction():
    g = torch.Generator().manual_seed(0)
    W = 0.1 * torch.randn(N, N, dtype=DT, generator=g) / N**0.5
    x = torch.randn(B, N, dtype=DT, generator=g)
    return W, x


def _T(z, W, x):
    return torch.tanh(z @ W.T + x)


@pytest.mark.parametrize("solver", [Picard(max_steps=8, check_every=8), Anderson(max_steps=4, check_every=4)],
                         ids=["picard", "anderson"])
def test_fixed_point_forward_fullgraph(solver):
    W, x = _contraction()

    def solve(W, x):
        sol = dl.fixed_point(_T, torch.zeros(B, N, dtype=DT), W, x, solver=solver, throw=False,
                             return_solution=True)
        return sol.value, sol.status, sol.stats["num_steps"]

    with torch.no_grad():
        eager = solve(W, x)
        compiled = _compiled(solve)(W, x)
    for e, c in zip(eager, compiled):
        _close(c, e)
    assert (compiled[2] == solver.max_steps).all()


@pytest.mark.parametrize(
    "solver, adjoint, backend",
    [(Picard(max_steps=8, check_every=8, rtol=1e-6), dl.Unroll(), "aot_eager"),
     (Anderson(max_steps=6, check_every=6, rtol=1e-6), dl.OneStep(), "eager")],
    ids=["picard-unroll", "anderson-onestep"],
)
def test_fixed_point_backward_fullgraph(solver, adjoint, backend):
    W, x = _contraction()

    def loss(W, x):
        z = dl.fixed_point(_T, torch.zeros(B, N, dtype=DT), W, x, solver=solver, adjoint=adjoint, throw=False)
        return (z * torch.linspace(-1, 1, N, dtype=DT)).sum()

    def value_and_grads(fn):
        Wr, xr = W.clone().requires_grad_(), x.clone().requires_grad_()
        value = fn(Wr, xr)
        return (value, *torch.autograd.grad(value, (Wr, xr)))

    for e, c in zip(value_and_grads(loss), value_and_grads(_compiled(loss, backend))):
        _close(c, e)


# Dynamo's own warning when it resumes a frame after a graph break
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_fixed_point_implicit_breaks_the_graph_at_the_implicit_function():
    W, x = _contraction()
    adjoint = dl.Implicit(linear_solver=dl.solvers.LU())
    solver = Picard(max_steps=1, check_every=1)

    def loss(W, x):
        return dl.fixed_point(_T, torch.zeros(B, N, dtype=DT), W, x, solver=solver, adjoint=adjoint,
                              throw=False).square().sum()

    Wr = W.clone().requires_grad_()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="custom jvp"):
        _compiled(loss, "eager")(Wr, x)
    torch._dynamo.reset()
    # without fullgraph: the solve is compiled, the implicit Function runs eagerly
    solver = Picard(max_steps=14, check_every=14)  # converged: no warning
    eager = torch.autograd.grad(loss(Wr, x), Wr)[0]
    compiled = torch.autograd.grad(_compiled(loss, "eager", fullgraph=False)(Wr, x), Wr)[0]
    _close(compiled, eager)


# ----------------------------------------------------------------------------- Sinkhorn


def _clouds():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 12, 2, dtype=DT, generator=g)
    y = torch.rand(2, 15, 2, dtype=DT, generator=g)
    return x, y


LOG_DOMAIN = dl.ot.Sinkhorn(max_steps=10, check_every=10, kernel=False)


def test_sinkhorn_dense_forward_fullgraph():
    x, y = _clouds()
    C = torch.cdist(x, y) ** 2

    def solve(C):
        res = dl.ot.sinkhorn(cost=C, epsilon=0.1, solver=LOG_DOMAIN, throw=False)
        return res.value, res.f, res.g, res.status

    with torch.no_grad():
        for e, c in zip(solve(C), _compiled(solve)(C)):
            _close(c, e)


@pytest.mark.parametrize("adjoint, backend", [(None, "aot_eager"), (dl.Unroll(), "eager")], ids=["envelope", "unroll"])
def test_sinkhorn_point_clouds_backward_fullgraph(adjoint, backend):
    x, y = _clouds()

    def loss(x, y):
        return dl.ot.sinkhorn(x=x, y=y, epsilon=0.1, solver=LOG_DOMAIN, adjoint=adjoint, throw=False).value.sum()

    def value_and_grad(fn):
        xr = x.clone().requires_grad_()
        value = fn(xr, y)
        return value, torch.autograd.grad(value, xr)[0]

    for e, c in zip(value_and_grad(loss), value_and_grad(_compiled(loss, backend))):
        _close(c, e)


def test_sinkhorn_stabilized_kernel_is_not_one_graph():
    """The kernel iterations decide on the host when to re-absorb the scalings and
    whether a block overflowed; they compile in pieces, not as one graph."""
    x, y = _clouds()
    C = torch.cdist(x, y) ** 2
    solver = dl.ot.Sinkhorn(max_steps=10, check_every=10)  # kernel=None: the kernel for a dense cost

    def solve(C):
        return dl.ot.sinkhorn(cost=C, epsilon=0.1, solver=solver, throw=False).value

    with torch.no_grad():
        with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError), match="data-dependent"):
            _compiled(solve, "eager")(C)


def test_boundary_validation_is_checked_on_the_device_when_compiled():
    x, y = _clouds()
    C = torch.cdist(x, y) ** 2
    C[1, 2, 3] = float("nan")

    def solve(C):
        return dl.ot.sinkhorn(cost=C, epsilon=0.1, solver=LOG_DOMAIN, throw=False).value

    with pytest.raises(ValueError, match="contains NaN or Inf"):
        solve(C)
    with torch.no_grad(), pytest.raises(RuntimeError, match="contains NaN or Inf"):
        _compiled(solve, "eager")(C)


# ----------------------------------------------------------------------------- QP (interior point)


def _box_qp():
    # 2n bound rows > n variables: eager also factorizes the n x n system (see docs/compile.md)
    g = torch.Generator().manual_seed(2)
    n = 4
    L = torch.randn(3, n, n, dtype=DT, generator=g)
    P = L @ L.mT / n + torch.eye(n, dtype=DT)
    q = 2.0 * torch.randn(3, n, dtype=DT, generator=g)
    return P, q, -torch.ones(n, dtype=DT), torch.ones(n, dtype=DT)


@pytest.mark.parametrize("polish", [False, True], ids=["iterates", "polished"])
def test_qp_forward_fullgraph(polish):
    P, q, lb, ub = _box_qp()
    solver = dl.conic.InteriorPoint(max_steps=4, check_every=4, rtol=1e-3, atol=1e-3, polish=polish)
    layer = dl.QPLayer(solver=solver, on_failure="mask")

    def solve(P, q):
        x, sol = layer(P, q, lb=lb, ub=ub, return_solution=True)
        return x, sol.status, sol.stats["num_steps"]

    with torch.no_grad():
        eager = solve(P, q)
        compiled = _compiled(solve, "aot_eager" if not polish else "eager")(P, q)
    assert (eager[1] == int(dl.Status.SUCCESS)).all()
    for e, c in zip(eager, compiled):
        _close(c, e, tol=1e-10)


def test_qp_unroll_backward_fullgraph():
    P, q, lb, ub = _box_qp()
    solver = dl.conic.InteriorPoint(max_steps=4, check_every=4, rtol=1e-3, atol=1e-3, polish=False)
    layer = dl.QPLayer(solver=solver, adjoint=dl.Unroll(), on_failure="mask")

    def loss(P, q):
        return (layer(P, q, lb=lb, ub=ub) * torch.arange(4, dtype=DT)).sum()

    def value_and_grad(fn):
        qr = q.clone().requires_grad_()
        value = fn(P, qr)
        return value, torch.autograd.grad(value, qr)[0]

    for e, c in zip(value_and_grad(loss), value_and_grad(_compiled(loss, "eager"))):
        _close(c, e, tol=1e-10)


def test_qp_implicit_breaks_the_graph_at_the_kkt_function():
    P, q, lb, ub = _box_qp()
    # one step, no polish: the trace fails at the Function anyway
    layer = dl.QPLayer(solver=dl.conic.InteriorPoint(max_steps=1, check_every=1, polish=False))
    with pytest.raises(torch._dynamo.exc.Unsupported, match="custom jvp"):
        _compiled(lambda P, q: layer(P, q, lb=lb, ub=ub).sum(), "eager")(P, q.clone().requires_grad_())


# ------------------------------------------------------- Newton-type, linear, cvxpy, PDE


def test_statuses_compare_as_ints_under_compile():
    # Dynamo (torch 2.13) folds ``tensor == IntEnum`` to a Python bool: the library
    # compares statuses with int(Status.X), so a Newton breakdown stays visible.
    def solve(c):
        # F(z) = z^2 - c: the Jacobian 2z is singular at the start z = 0 for every sample
        sol = dl.root_find(lambda z, c: z * z - c, torch.zeros_like(c), c,
                           solver=dl.solvers.Newton(max_steps=3, check_every=3), throw=False, return_solution=True)
        return sol.status, sol.converged

    c = torch.tensor([[2.0], [3.0]], dtype=DT)
    with torch.no_grad():
        eager = solve(c)
        compiled = _compiled(solve, "eager")(c)
    assert (eager[0] == int(dl.Status.BREAKDOWN)).all()
    for e, k in zip(eager, compiled):
        assert isinstance(k, torch.Tensor) and torch.equal(k, e)


@pytest.mark.parametrize("api", ["root_find", "least_squares"])
def test_newton_type_unroll_backward_fullgraph(api):
    W = 0.3 * torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    if api == "root_find":
        fn, solver = dl.root_find, dl.solvers.Newton(max_steps=6, check_every=6)
        problem = lambda z, x: z + torch.tanh(z @ W.T) - x  # noqa: E731
    else:
        fn, solver = dl.least_squares, dl.solvers.LevenbergMarquardt(max_steps=20, check_every=20)
        problem = lambda z, x: torch.cat([z - x, 0.1 * z.square()], -1)  # noqa: E731

    def loss(x):
        return (fn(problem, torch.zeros_like(x), x, solver=solver, adjoint=dl.Unroll(), throw=False) ** 2).sum()

    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(4))

    def value_and_grad(f):
        xr = x.clone().requires_grad_()
        value = f(xr)
        return value, torch.autograd.grad(value, xr)[0]

    for e, c in zip(value_and_grad(loss), value_and_grad(_compiled(loss))):
        _close(c, e, tol=1e-10)


@pytest.mark.parametrize("solver", [dl.solvers.CG(max_steps=6, check_every=6), dl.solvers.Cholesky()],
                         ids=["cg", "cholesky"])
def test_linear_solve_backward_fullgraph(solver):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 6, 6, dtype=DT, generator=g)
    A = A @ A.mT + 6 * torch.eye(6, dtype=DT)
    b = torch.randn(3, 6, dtype=DT, generator=g)

    def loss(A, b):
        return (dl.linear_solve(A, b, solver, throw=False).value * torch.arange(6, dtype=DT)).sum()

    def value_and_grads(f):
        Ar, br = A.clone().requires_grad_(), b.clone().requires_grad_()
        value = f(Ar, br)
        return (value, *torch.autograd.grad(value, (Ar, br)))

    for e, c in zip(value_and_grads(loss), value_and_grads(_compiled(loss))):
        _close(c, e, tol=1e-10)


def test_conic_layer_forward_fullgraph():
    cp = pytest.importorskip("cvxpy")
    x, c, h = cp.Variable(3), cp.Parameter(3), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [x >= 0, cp.sum(x) <= h])
    layer = dl.ConicLayer(problem, [c, h], [x], solver=dl.conic.InteriorPoint(max_steps=10, check_every=10),
                          on_failure="mask")
    cc = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(6))
    hh = torch.ones(4, 1, dtype=DT)
    with torch.no_grad():
        eager = layer(cc, hh)[0]
        compiled = _compiled(lambda cc, hh: layer(cc, hh)[0], "eager")(cc, hh)
    _close(compiled, eager)


def test_pde_layer_forward_fullgraph():
    from difflayers import pde

    grid = pde.Grid((8, 8))
    bc = pde.Dirichlet()
    newton = dl.solvers.Newton(max_steps=1, check_every=1, line_search=False,
                               linear_solver=dl.solvers.CG(max_steps=30, check_every=30))
    layer = pde.PDELayer(lambda u, k, f: pde.diffusion(u, k, grid, bc) - f, grid=grid, symmetric=True, linear=True,
                         solver=newton, preconditioner=lambda u, k, f: pde.Multigrid(grid, k, bc), throw=False)
    k = 1.0 + 0.5 * torch.rand(2, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(7))
    f = torch.ones(8, 8, dtype=DT)
    with torch.no_grad():
        eager = layer(k, f, return_solution=True)
        compiled = _compiled(lambda k, f: layer(k, f, return_solution=True), "eager")(k, f)
    assert bool(eager.converged.all())
    _close(compiled.value, eager.value)
    assert torch.equal(compiled.status, eager.status)
