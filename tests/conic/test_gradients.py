"""Gradients of the conic layers (float64): finite differences, unrolling, the
central path, forward mode, and the algebra underneath (cones, KKT solves)."""

import pytest
import torch

import difflayers as dl
from difflayers.conic import Cones, InteriorPoint, QPLayer, Smoothed, solve_conic, spo_plus_loss
from difflayers.conic._cone_algebra import ConeLayout
from difflayers.conic._kkt import DualKKTFactorization, DualPrecomputation, KKTFactorization
from difflayers.testing import check_grad, dot_product_test

F64 = torch.float64


def _qp(batch=3, n=6, m=5, p=1, seed=0, active=True):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(batch, n, n, generator=g, dtype=F64)
    P = L @ L.mT / n + 0.5 * torch.eye(n, dtype=F64)
    q = torch.randn(batch, n, generator=g, dtype=F64)
    G = torch.randn(batch, m, n, generator=g, dtype=F64)
    x0 = torch.randn(batch, n, generator=g, dtype=F64)
    h = (G @ x0[..., None])[..., 0] + torch.rand(batch, m, generator=g, dtype=F64)
    if active:  # pull the unconstrained optimum outside so that some rows bind
        q = q - 0.5 * G[:, :2].sum(1)
    A = torch.randn(batch, p, n, generator=g, dtype=F64)
    b = (A @ x0[..., None])[..., 0]
    return P, q, G, h, A, b


def _socp(batch=2, n=4, seed=3):
    """minimize q'x + 1/2 ||x||^2 s.t. ||x - c|| <= r (active: both s and z on the boundary)."""
    g = torch.Generator().manual_seed(seed)
    q = 3.0 * torch.randn(batch, n, generator=g, dtype=F64)
    c = torch.randn(batch, n, generator=g, dtype=F64)
    A = torch.zeros(batch, n + 1, n, dtype=F64)
    A[:, 1:] = -torch.eye(n, dtype=F64)
    b = torch.cat([torch.ones(batch, 1, dtype=F64), -c], 1)
    P = torch.eye(n, dtype=F64).expand(batch, n, n).clone()
    return P, q, A, b, Cones(soc=(n + 1,))


# ----------------------------------------------------------------------------- exact


def test_qp_gradients_match_finite_differences():
    P, q, G, h, A, b = _qp()
    layer = QPLayer()
    x, lam, _ = layer(P, q, G, h, A, b, return_duals=True)
    assert bool((lam > 1e-6).any()), "the test problem should have active rows"
    check_grad(lambda *t: layer(*t), (P, q, G, h, A, b), rtol=1e-5, atol=1e-7, directions=2, raise_exception=True)


def test_lp_gradients_match_finite_differences():
    """x* of an LP is piecewise affine in (G, h, A, b) and constant in q."""
    _, q, G, h, A, b = _qp(n=4, m=8, p=1, seed=5)
    lb = torch.full_like(q, -3.0)
    ub = torch.full_like(q, 3.0)
    layer = QPLayer()
    check_grad(lambda *t: layer(None, *t, lb=lb, ub=ub), (q, G, h, A, b), rtol=1e-5, atol=1e-7, directions=2, raise_exception=True)
    q1 = q.clone().requires_grad_()
    (layer(None, q1, G, h, A, b, lb=lb, ub=ub) * torch.randn_like(q)).sum().backward()
    assert q1.grad.abs().max() < 1e-8


def _project_soc(v):
    v0, v1 = v[0], v[1:]
    r = torch.linalg.vector_norm(v1)
    if r <= v0:
        return v
    if r <= -v0:
        return torch.zeros_like(v)
    return 0.5 * (1.0 + v0 / r) * torch.cat([r[None], v1])


def test_socp_derivative_matches_the_dense_implicit_function_theorem():
    """Reference: the IFT on the residual map of Busseti et al. in (x, v = z - s), with
    z = Pi_K(v) and s = Pi_K(v) - v, differentiated densely by torch.func."""
    P, q, A, b, cones = _socp()
    sol = solve_conic(P, q, A, b, cones)
    # both s and z nonzero on the boundary: the hardest case for the derivative
    assert bool((sol.z[:, 0] > 1e-3).all()) and bool((sol.s[:, 0] > 1e-3).all())
    n = q.shape[1]
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(t.shape, generator=g, dtype=F64) for t in (P, q, A, b)]
    _, tangent = torch.func.jvp(lambda *t: solve_conic(*t, cones).value, (P, q, A, b), tuple(dirs))
    for i in range(q.shape[0]):

        def residual(u, Pi, qi, Ai, bi):
            x, z = u[:n], _project_soc(u[n:])
            return torch.cat([0.5 * (Pi + Pi.T) @ x + qi + Ai.T @ z, Ai @ x + (z - u[n:]) - bi])

        u0 = torch.cat([sol.value[i].detach(), sol.z[i] - sol.s[i].detach()])
        data = (P[i], q[i], A[i], b[i])
        J = torch.func.jacrev(residual, argnums=(0, 1, 2, 3, 4))(u0, *data)
        rhs = sum((Jk.reshape(u0.numel(), -1) @ dk[i].reshape(-1)) for Jk, dk in zip(J[1:], dirs))
        du = -torch.linalg.solve(J[0], rhs)
        torch.testing.assert_close(tangent[i], du[:n], rtol=1e-7, atol=1e-9)
    # and reverse mode agrees with forward mode (the same factorization, transposed)
    dot_product_test(lambda *t: solve_conic(*t, cones).value, (P, q, A, b), rtol=1e-8, raise_exception=True)


def _project_dual(v, cones):
    """z = Pi_{K*}(v) for K = {0}^p x R_+^l x SOC(d_1) x ...: free on the zero rows."""
    p, l = cones.zero, cones.nonneg
    parts, start = [v[:p], v[p : p + l].clamp_min(0.0)], p + l
    for d in cones.soc:
        parts.append(_project_soc(v[start : start + d]))
        start += d
    return torch.cat(parts)


def test_mixed_cone_derivative_matches_the_dense_implicit_function_theorem():
    """Equality rows, orthant rows and second-order cones of sizes 2, 1, 6 and 3 (some
    with s and z on the boundary). Second-order-cone solutions are not refined on an
    active set, so both sides carry the forward solve's error (~1e-5 on such cones)."""
    from difflayers.testing import random_socp

    P, q, A, b, cones = random_socp(3, 20, (2, 1, 6, 3), m_ineq=4, m_eq=2, quadratic=True, seed=17)
    sol = solve_conic(P, q, A, b, cones)
    n, p = q.shape[1], cones.zero
    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(t.shape, generator=g, dtype=F64) for t in (P, q, A, b)]
    _, tangent = torch.func.jvp(lambda *t: solve_conic(*t, cones).value, (P, q, A, b), tuple(dirs))
    for i in range(q.shape[0]):

        def residual(u, Pi, qi, Ai, bi):
            x, v = u[:n], u[n:]
            z = _project_dual(v, cones)
            s = torch.cat([torch.zeros(p, dtype=F64), (z - v)[p:]])
            return torch.cat([0.5 * (Pi + Pi.T) @ x + qi + Ai.T @ z, Ai @ x + s - bi])

        v0 = sol.z[i] - sol.s[i].detach()
        v0 = torch.cat([sol.z[i][:p], v0[p:]])
        u0 = torch.cat([sol.value[i].detach(), v0])
        J = torch.func.jacrev(residual, argnums=(0, 1, 2, 3, 4))(u0, P[i], q[i], A[i], b[i])
        rhs = sum((Jk.reshape(u0.numel(), -1) @ dk[i].reshape(-1)) for Jk, dk in zip(J[1:], dirs))
        du = -torch.linalg.solve(J[0], rhs)
        assert (tangent[i] - du[:n]).norm() <= 1e-3 * du[:n].norm()


def test_duals_and_slacks_are_differentiable():
    P, q, G, h, A, b = _qp(seed=2)
    layer = QPLayer()
    check_grad(lambda *t: layer(*t, return_duals=True), (P, q, G, h, A, b), rtol=1e-5, atol=1e-7, directions=2, raise_exception=True)


def test_implicit_equals_unrolled_at_convergence():
    P, q, G, h, A, b = _qp(seed=4)
    w = torch.randn(q.shape, dtype=F64)
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        args = [t.clone().requires_grad_() for t in (P, q, G, h, A, b)]
        layer = QPLayer(solver=InteriorPoint(rtol=1e-10, atol=1e-10, polish=False), adjoint=adjoint)
        grads.append(torch.autograd.grad((layer(*args) * w).sum(), args))
    for a, u in zip(*grads):
        assert (a - u).norm() <= 1e-5 * u.norm() + 1e-9


def test_forward_mode_and_dot_product():
    P, q, G, h, A, b = _qp(seed=6)
    layer = QPLayer()
    dot_product_test(lambda *t: layer(*t), (P, q, G, h, A, b), rtol=1e-8, raise_exception=True)
    d = torch.randn_like(q)
    _, tangent = torch.func.jvp(lambda qq: layer(P, qq, G, h, A, b), (q,), (d,))
    eps = 1e-6
    fd = (layer(P, q + eps * d, G, h, A, b) - layer(P, q - eps * d, G, h, A, b)) / (2 * eps)
    assert fd.norm() > 1e-3
    assert (tangent - fd).norm() <= 1e-6 * fd.norm()


def test_broadcast_gradient_is_the_sum_over_the_batch():
    P, q, G, h, A, b = _qp(batch=4, seed=7)
    G0 = G[0]
    x0 = torch.randn(4, G0.shape[1], dtype=F64)
    h = x0 @ G0.T + 0.1  # feasible for the shared G
    b = (A @ x0[..., None])[..., 0]
    G1 = G0.clone().requires_grad_()
    (QPLayer()(P, q, G1, h, A, b).square().sum()).backward()  # G1 unbatched: broadcast
    total = torch.zeros_like(G1)
    for i in range(4):
        Gi = G0.clone().requires_grad_()
        QPLayer()(P[i], q[i], Gi, h[i], A[i], b[i]).square().sum().backward()
        total += Gi.grad
    assert total.abs().max() > 1e-3
    torch.testing.assert_close(G1.grad, total, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- smoothed


def test_smoothed_gradient_is_the_derivative_of_the_smoothed_solution():
    P, q, G, h, A, b = _qp(seed=8)
    layer = QPLayer(adjoint=Smoothed(barrier=1e-2))
    check_grad(lambda *t: layer(*t), (P, q, G, h, A, b), rtol=1e-5, atol=1e-7, directions=2, raise_exception=True)


def test_smoothed_socp_gradient():
    P, q, A, b, cones = _socp(seed=9)
    fn = lambda *t: solve_conic(*t, cones, adjoint=Smoothed(barrier=1e-2)).value  # noqa: E731
    check_grad(fn, (P, q, A, b), rtol=1e-5, atol=1e-7, directions=2, raise_exception=True)


def test_smoothed_converges_to_exact():
    P, q, G, h, A, b = _qp(seed=10)
    w = torch.randn(q.shape, dtype=F64)

    def grad(adjoint):
        q1 = q.clone().requires_grad_()
        (QPLayer(adjoint=adjoint)(P, q1, G, h, A, b) * w).sum().backward()
        return q1.grad

    exact = grad(dl.Implicit())
    errors = [float((grad(Smoothed(barrier=mu)) - exact).norm() / exact.norm()) for mu in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[-1] < 1e-2 * errors[0], errors


def test_smoothed_lp_gradient_is_informative():
    """An LP's exact derivative in q is zero; the smoothed one is not, and is a descent direction."""
    _, q, G, h, _, _ = _qp(batch=1, n=3, m=6, p=1, seed=11)
    lb, ub = torch.zeros_like(q), torch.ones_like(q)
    q1 = q.clone().requires_grad_()
    x = QPLayer(adjoint=Smoothed(barrier=1e-2))(None, q1, G, h, lb=lb, ub=ub)
    (x * q).sum().backward()  # the cost of the decision under the true q
    assert q1.grad.abs().max() > 1e-3
    with torch.no_grad():
        x_next = QPLayer(adjoint=Smoothed(barrier=1e-2))(None, q - 1e-2 * q1.grad, G, h, lb=lb, ub=ub)
    assert (x_next * q).sum().item() <= (x.detach() * q).sum().item() + 1e-12


# ----------------------------------------------------------------------------- modes


def test_no_grad_and_requires_grad_false():
    P, q, G, h, A, b = _qp(seed=12)
    with torch.no_grad():
        x = QPLayer()(P, q, G, h, A, b)
    assert x.grad_fn is None
    y = QPLayer()(P, q, G, h, A, b)
    torch.testing.assert_close(x, y.detach())


def test_warm_start_reaches_the_same_solution():
    P, q, G, h, A, b = _qp(seed=13)
    cones = Cones(zero=A.shape[1], nonneg=G.shape[1])
    AA, bb = torch.cat([A, G], 1), torch.cat([b, h], 1)
    sol = solve_conic(P, q, AA, bb, cones)
    q2 = q + 1e-3 * torch.randn_like(q)
    cold = solve_conic(P, q2, AA, bb, cones)
    warm = solve_conic(P, q2, AA, bb, cones, warm_start=sol)
    assert bool((warm.status == 0).all())
    torch.testing.assert_close(warm.value, cold.value, rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="warm_start"):
        solve_conic(P, q2, AA, bb, cones, warm_start=(q,))


def test_float32_gradient_close_to_float64():
    P, q, G, h, A, b = _qp(seed=14)
    w = torch.randn(q.shape, dtype=F64)
    grads = []
    for dtype in (F64, torch.float32):
        args = [t.to(dtype).requires_grad_() for t in (P, q, G, h, A, b)]
        grads.append(torch.autograd.grad((QPLayer()(*args) * w.to(dtype)).sum(), args))
    for g64, g32 in zip(*grads):
        assert (g32.double() - g64).norm() <= 1e-3 * g64.norm()


def test_adjoint_options_are_validated():
    with pytest.raises(ValueError, match="barrier"):
        Smoothed(barrier=0.0)
    P, q, G, h, A, b = _qp()
    with pytest.raises(ValueError, match="linear_solver"):
        QPLayer(adjoint=dl.Implicit(linear_solver=dl.solvers.CG()))(P, q, G, h, A, b)
    with pytest.raises(TypeError, match="adjoint"):
        QPLayer(adjoint=dl.OneStep())(P, q, G, h, A, b)


# ------------------------------------------------------------------------------ SPO+


def test_spo_plus_value_and_subgradient():
    G = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    h = torch.ones(1, dtype=F64)
    lb = torch.zeros(3, dtype=F64)
    c = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]], dtype=F64)
    c_hat = torch.tensor([[-2.0, -1.0, -0.2], [-1.0, -0.5, -3.0]], dtype=F64, requires_grad=True)
    loss = spo_plus_loss(c_hat, c, G, h, lb=lb, reduction="none")
    # on the simplex the LP picks the vertex of the smallest cost
    eye = torch.eye(3, dtype=F64)
    w_true = eye[c.argmin(1)]
    w_tilde = eye[(2 * c_hat.detach() - c).argmin(1)]
    expected = -((2 * c_hat.detach() - c) * w_tilde).sum(1) + 2 * (c_hat.detach() * w_true).sum(1) - (c * w_true).sum(1)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-7, atol=1e-7)
    loss.sum().backward()
    torch.testing.assert_close(c_hat.grad, 2 * (w_true - w_tilde), rtol=1e-6, atol=1e-6)
    # SPO+ bounds the regret of the predicted decision
    w_hat = eye[c_hat.detach().argmin(1)]
    regret = (c * w_hat).sum(1) - (c * w_true).sum(1)
    assert bool((loss.detach() >= regret - 1e-7).all())


def test_spo_plus_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        spo_plus_loss(torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), reduction="max")
    with pytest.raises(ValueError, match="shape"):
        spo_plus_loss(torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64))


# ---------------------------------------------------------------------- cone algebra

CONES = [Cones(nonneg=3), Cones(nonneg=2, soc=(3, 4, 3)), Cones(soc=(1, 2, 5)), Cones(zero=2, nonneg=1, soc=(3,))]


def _interior(layout, batch, g):
    u = torch.randn(batch, layout.mi, generator=g, dtype=F64)
    shift = (1.0 - layout.min_eigenvalue(u)).clamp_min(0.0)
    return u + shift[:, None] * layout.identity(batch, F64, "cpu")


@pytest.mark.parametrize("cones", CONES, ids=str)
def test_scaling_and_jordan_algebra(cones):
    g = torch.Generator().manual_seed(0)
    layout = ConeLayout(cones)
    s, z, v = _interior(layout, 4, g), _interior(layout, 4, g), torch.randn(4, layout.mi, generator=g, dtype=F64)
    W = layout.scaling(s, z)
    torch.testing.assert_close(W.apply(z), W.apply_inverse(s))  # W z = W^-1 s = lambda
    torch.testing.assert_close(W.apply(W.apply_inverse(v)), v)
    torch.testing.assert_close(layout.product(s, layout.divide(s, v)), v)
    M = torch.randn(4, layout.mi, 3, generator=g, dtype=F64)
    torch.testing.assert_close(W.apply(M)[..., 1], W.apply(M[..., 1]))
    eye = torch.eye(layout.mi, dtype=F64).expand(4, -1, -1)
    Wm = W.apply(eye)
    torch.testing.assert_close(Wm, Wm.mT)  # symmetric
    alpha = layout.max_step(s, v)
    finite = torch.isfinite(alpha)
    boundary = layout.min_eigenvalue(s + torch.where(finite, alpha, 0.0)[:, None] * v)
    assert bool((boundary[finite].abs() < 1e-9).all())
    assert bool((layout.min_eigenvalue(s + 10.0 * v)[~finite] >= 0).all())


@pytest.mark.parametrize("cones", CONES, ids=str)
def test_kkt_solves_match_a_dense_solve(cones):
    g = torch.Generator().manual_seed(1)
    layout = ConeLayout(Cones(nonneg=cones.nonneg, soc=cones.soc))
    B, n, p = 3, 12, cones.zero
    s, z = _interior(layout, B, g), _interior(layout, B, g)
    W = layout.scaling(s, z)
    A = torch.randn(B, cones.dim, n, generator=g, dtype=F64)
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    P = L @ L.mT + torch.eye(n, dtype=F64)
    H = torch.zeros(B, cones.dim, cones.dim, dtype=F64)
    Wm = W.apply(torch.eye(layout.mi, dtype=F64).expand(B, -1, -1))
    H[:, p:, p:] = Wm @ Wm
    K = torch.cat([torch.cat([P, A.mT], 2), torch.cat([A, -H], 2)], 1)
    rx = torch.randn(B, 2, n, generator=g, dtype=F64)
    rz = torch.randn(B, 2, cones.dim, generator=g, dtype=F64)
    expected = torch.linalg.solve(K, torch.cat([rx, rz], 2).mT).mT
    primal = KKTFactorization(P, A, p, W, refine_steps=1, regularization=1e-13)
    dual = DualKKTFactorization(DualPrecomputation.try_build(P, A), p, W, refine_steps=1, regularization=1e-13)
    for kkt in (primal, dual):
        dx, dz = kkt.solve(rx, rz)
        torch.testing.assert_close(torch.cat([dx, dz], 2), expected, rtol=1e-8, atol=1e-9)
        dx1, dz1 = kkt.solve(rx[:, 0], rz[:, 0])
        torch.testing.assert_close(dx1, dx[:, 0])


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cuda_matches_cpu(dtype):
    P, q, G, h, A, b = _qp(batch=8, seed=15)
    w = torch.randn(q.shape, dtype=F64)
    results = []
    for device in ("cpu", "cuda"):
        args = [t.to(device=device, dtype=dtype).requires_grad_() for t in (P, q, G, h, A, b)]
        x = QPLayer()(*args)
        grads = torch.autograd.grad((x * w.to(x)).sum(), args)
        assert x.device.type == device
        results.append([x.detach().cpu().double()] + [g.cpu().double() for g in grads])
    tol = 1e-7 if dtype == F64 else 1e-3
    for c, g in zip(*results):
        torch.testing.assert_close(g, c, rtol=tol, atol=tol)
    # a second-order-cone problem on the device
    Ps, qs, As, bs, cones = _socp()
    sol = solve_conic(Ps.cuda(), qs.cuda(), As.cuda(), bs.cuda(), cones)
    torch.testing.assert_close(sol.value.cpu(), solve_conic(Ps, qs, As, bs, cones).value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("point", [(2.0, 0.0), (0.0, -2.0), (2.0, 1e-12), (0.3, 0.0)])
def test_projection_on_a_ball_with_data_on_an_axis(point):
    """Starting points that land exactly on a cone's boundary are moved inside."""
    a = torch.tensor([point], dtype=F64)
    A = torch.tensor([[[0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]], dtype=F64)
    b = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    sol = solve_conic(torch.eye(2, dtype=F64)[None], -a, A, b, Cones(soc=(3,)))
    expected = a / a.norm().clamp_min(1.0)
    torch.testing.assert_close(sol.value, expected, rtol=1e-7, atol=1e-7)


def test_failure_message_names_the_policy():
    _, q, G, h, _, _ = _qp(batch=2, n=3, m=4, p=1, seed=16)
    h = h.clone()
    G = torch.cat([G, -G[:, :1]], 1)
    h = torch.cat([h, -h[:, :1] - 1.0], 1)  # g'x <= h0 and g'x >= h0 + 1: infeasible
    with pytest.raises(dl.ConvergenceError, match="on_failure") as info:
        QPLayer()(None, q, G, h, lb=torch.zeros_like(q), ub=torch.ones_like(q))
    assert info.value.indices == [0, 1]
    assert "residual" not in str(info.value)


def test_unconstrained_and_equality_only_qps():
    P = 2.0 * torch.eye(3, dtype=F64)
    q = torch.tensor([1.0, -2.0, 3.0], dtype=F64, requires_grad=True)
    x = QPLayer()(P, q)  # no constraints: x = -P^-1 q
    torch.testing.assert_close(x, -q.detach() / 2)
    A, b = torch.ones(1, 3, dtype=F64), torch.ones(1, dtype=F64)
    check_grad(lambda q, b: QPLayer()(P, q, A=A, b=b), (q.detach(), b), raise_exception=True)
    x = QPLayer()(P, q, A=A, b=b)
    torch.testing.assert_close(A @ x, b)
