"""Entropic OT (``dl.ot.sinkhorn``) against references: POT, closed forms, finite
differences, and the contracts every solve keeps (batched == loop, implicit ==
unrolled, zero weights, bad input).

Conventions checked here (the ones the public API promises):

* ``cost_fn="sqeuclidean"`` is ``||x_i - y_j||^2`` (no 1/2 factor);
* ``value = <C, P> + eps KL(P | a b^T)``, ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``;
* unbalanced (``rho_a``/``rho_b``): the plan minimises
  ``<C, P> + eps KL(P | a b^T) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)`` with the
  generalised KL ``KL(p | q) = sum p log(p / q) - p + q``; ``None`` is a hard marginal.
"""

import math

import pytest
import torch

pytest.importorskip("difflayers.ot")

import difflayers as dl  # noqa: E402

D = torch.float64
EPS = 0.1


def tight(max_steps=20_000, **kwargs):
    return dl.ot.Sinkhorn(rtol=1e-13, atol=1e-13, max_steps=max_steps, **kwargs)


def points(B, n, m, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, d, dtype=D, generator=g)
    y = torch.rand(B, m, d, dtype=D, generator=g) + 0.2
    return x, y


def weights(B, n, seed=1, mass=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, n, dtype=D, generator=g) + 0.5
    return mass * w / w.sum(-1, keepdim=True)


def sqdist(x, y):
    return (x[..., :, None, :] - y[..., None, :, :]).square().sum(-1)


def gen_kl(p, q):
    """Generalised KL sum(p log(p/q) - p + q) over the last dim, 0 log 0 = 0."""
    ratio = torch.where(p > 0, p / q, torch.ones_like(p))
    terms = torch.where(p > 0, p * ratio.log(), torch.zeros_like(p)) - p + q
    return terms.sum(-1)


def primal(C, P, a, b, eps, rho_a=None, rho_b=None):
    """<C,P> + eps KL(P|ab^T) (+ rho KL of the marginals), batched [B, n, m]."""
    ab = a[:, :, None] * b[:, None, :]
    ratio = torch.where(P > 0, P / ab, torch.ones_like(P))
    kl = (torch.where(P > 0, P * ratio.log(), torch.zeros_like(P)) - P + ab).sum((-2, -1))
    out = (C * P).sum((-2, -1)) + eps * kl
    if rho_a is not None:
        out = out + rho_a * gen_kl(P.sum(-1), a)
    if rho_b is not None:
        out = out + rho_b * gen_kl(P.sum(-2), b)
    return out


def centred(t):
    return t - t.mean(-1, keepdim=True)


# ---------------------------------------------------------------- POT references


def test_balanced_plan_and_value_match_pot():
    ot = pytest.importorskip("ot")
    B, n, m = 3, 7, 5
    x, y = points(B, n, m)
    a, b = weights(B, n, seed=1), weights(B, m, seed=2)
    C = sqdist(x, y)
    res = dl.ot.sinkhorn(C, a=a, b=b, epsilon=EPS, solver=tight())
    assert bool((res.status == dl.Status.SUCCESS).all())
    for i in range(B):
        P_pot = torch.as_tensor(ot.sinkhorn(a[i].numpy(), b[i].numpy(), C[i].numpy(), EPS, method="sinkhorn_log",
                                            numItermax=100_000, stopThr=1e-15))
        torch.testing.assert_close(res.plan[i], P_pot, rtol=0, atol=1e-8)
        # POT's sinkhorn2 reports <C, P> only; the regularised value is computed from its plan.
        value_pot = primal(C[i : i + 1], P_pot[None], a[i : i + 1], b[i : i + 1], EPS)[0]
        torch.testing.assert_close(res.value[i], value_pot, rtol=0, atol=1e-8)
    # value = <f, a> + <g, b> at convergence (balanced), and the plan is a_i b_j exp((f+g-C)/eps).
    torch.testing.assert_close(res.value, (res.f * a).sum(-1) + (res.g * b).sum(-1), rtol=0, atol=1e-10)
    P = a[:, :, None] * b[:, None, :] * torch.exp((res.f[:, :, None] + res.g[:, None, :] - C) / EPS)
    torch.testing.assert_close(res.plan, P, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "euclidean"])
def test_point_clouds_equal_dense_cost(cost_fn):
    x, y = points(2, 6, 4)
    a, b = weights(2, 6), weights(2, 4, seed=3)
    C = sqdist(x, y) if cost_fn == "sqeuclidean" else sqdist(x, y).sqrt()
    dense = dl.ot.sinkhorn(C, a=a, b=b, epsilon=EPS, solver=tight())
    cloud = dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=EPS, cost_fn=cost_fn, solver=tight())
    custom = dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=EPS, cost_fn=sqdist if cost_fn == "sqeuclidean"
                            else (lambda u, v: sqdist(u, v).sqrt()), solver=tight())
    for other in (cloud, custom):
        torch.testing.assert_close(other.value, dense.value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.plan, dense.plan, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho_a, rho_b", [(0.5, 0.5), (None, 1.0), (2.0, None)])
def test_unbalanced_plan_matches_pot(rho_a, rho_b):
    ot = pytest.importorskip("ot")
    B, n, m = 2, 7, 5
    x, y = points(B, n, m, seed=4)
    a, b = weights(B, n, seed=5), weights(B, m, seed=6, mass=1.3)
    if rho_b is None:
        a = a * 0.8  # only a relaxed: the plan's mass is that of b, a's may differ
    C = sqdist(x, y)
    res = dl.ot.sinkhorn(C, a=a, b=b, epsilon=EPS, rho_a=rho_a, rho_b=rho_b, solver=tight())
    assert bool((res.status == dl.Status.SUCCESS).all())
    reg_m = (math.inf if rho_a is None else rho_a, math.inf if rho_b is None else rho_b)
    for i in range(B):
        P_pot = torch.as_tensor(ot.unbalanced.sinkhorn_unbalanced(
            a[i].numpy(), b[i].numpy(), C[i].numpy(), EPS, reg_m, method="sinkhorn_stabilized", reg_type="kl",
            numItermax=100_000, stopThr=1e-15))
        torch.testing.assert_close(res.plan[i], P_pot, rtol=0, atol=1e-8)
    if rho_a is None:
        torch.testing.assert_close(res.plan.sum(-1), a, rtol=0, atol=1e-10)
    if rho_b is None:
        torch.testing.assert_close(res.plan.sum(-2), b, rtol=0, atol=1e-10)


def test_unbalanced_value_is_the_relaxed_primal_objective():
    """value = <C,P> + eps KL(P|ab^T) + rho_a KL(P1|a) + rho_b KL(P^T1|b) (generalised KL)."""
    x, y = points(2, 6, 5, seed=7)
    a, b = weights(2, 6, seed=8), weights(2, 5, seed=9, mass=1.5)
    C = sqdist(x, y)
    res = dl.ot.sinkhorn(C, a=a, b=b, epsilon=EPS, rho_a=0.7, rho_b=0.3, solver=tight())
    torch.testing.assert_close(res.value, primal(C, res.plan, a, b, EPS, 0.7, 0.3), rtol=1e-10, atol=1e-10)
    # the plan is optimal: perturbing it along any positive direction raises the objective
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        Q = res.plan * torch.exp(1e-3 * torch.randn(res.plan.shape, dtype=D, generator=g))
        assert bool((primal(C, Q, a, b, EPS, 0.7, 0.3) >= res.value - 1e-12).all())


# ---------------------------------------------------------------- closed forms


def _entropic_gaussian_1d(m1, s1, m2, s2, eps):
    """Entropic OT value between N(m1, s1^2) and N(m2, s2^2) for the cost |x - y|^2 and
    eps KL(pi | alpha x beta) (Janati et al. 2020, Mallasto et al. 2021), eps = 2 sigma^2."""
    sig2 = eps / 2
    A, Bv = s1**2, s2**2
    Dm = math.sqrt(4 * A * Bv + sig2**2)
    return (m1 - m2) ** 2 + A + Bv - Dm + sig2 * (1 - math.log(2 * sig2)) + sig2 * math.log(Dm + sig2)


def _gaussian_quantiles(n, mean, std):
    q = (torch.arange(n, dtype=D) + 0.5) / n
    return mean + std * math.sqrt(2) * torch.erfinv(2 * q - 1)


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_entropic_ot_between_gaussians_closed_form(eps):
    """Quantile grids of n points converge to the Gaussians with an O(1/n) error in the
    value; Richardson extrapolation over n and 2n removes it, leaving a sharp test."""
    values = []
    for n in (150, 300):
        x = _gaussian_quantiles(n, 0.0, 1.0)[:, None]
        y = _gaussian_quantiles(n, 1.0, 1.5)[:, None]
        values.append(dl.ot.sinkhorn(x=x, y=y, epsilon=eps, solver=tight()).value)
    exact = _entropic_gaussian_1d(0.0, 1.0, 1.0, 1.5, eps)
    assert values[1].shape == ()
    assert abs(float(values[1]) / exact - 1) < 3e-3
    assert abs(float(2 * values[1] - values[0]) / exact - 1) < 5e-5


def test_one_dimensional_small_epsilon_approaches_sorted_cost():
    """W <= OT_eps <= W + eps log n, and the plan tends to the sorted matching."""
    n = 12
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 1, dtype=D, generator=g)
    y = torch.rand(n, 1, dtype=D, generator=g) + 0.3
    exact = (x.sort(0).values - y.sort(0).values).square().mean()
    prev_gap = math.inf
    for eps in (1e-1, 3e-2, 1e-2):
        res = dl.ot.sinkhorn(x=x, y=y, epsilon=eps, solver=tight(epsilon_scaling=0.7))
        gap = float(res.value - exact)
        assert -1e-10 <= gap <= eps * math.log(n) + 1e-10
        assert gap < prev_gap
        prev_gap = gap
    transport = (res.plan * sqdist(x, y)).sum()
    assert -1e-10 <= float(transport - exact) <= 1e-2 * math.log(n)


# ---------------------------------------------------------------- gradients


def _tight_value(x, y, a, b, eps, adjoint=None):
    return dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, solver=tight(), adjoint=adjoint).value


def test_envelope_gradient_matches_finite_differences():
    x, y = points(2, 5, 4, seed=11)
    a, b = weights(2, 5, seed=12), weights(2, 4, seed=13)
    eps = 0.3
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_tight_value(xr, y, a, b, eps, dl.ot.Envelope()).sum(), xr)
    h = 1e-5
    fd = torch.zeros_like(x)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in x.shape)):
        e = torch.zeros_like(x)
        e[tuple(idx)] = h
        fd[tuple(idx)] = (_tight_value(x + e, y, a, b, eps).sum() - _tight_value(x - e, y, a, b, eps).sum()) / (2 * h)
    torch.testing.assert_close(gx, fd, rtol=1e-6, atol=1e-8)


def test_envelope_gradient_wrt_cost_is_the_plan():
    """Danskin: d value / d C = P."""
    x, y = points(2, 6, 5, seed=14)
    a, b = weights(2, 6, seed=15), weights(2, 5, seed=16)
    C = sqdist(x, y).requires_grad_(True)
    res = dl.ot.sinkhorn(C, a=a, b=b, epsilon=EPS, solver=tight())
    (gC,) = torch.autograd.grad(res.value.sum(), C)
    torch.testing.assert_close(gC, res.plan.detach(), rtol=0, atol=1e-11)


def test_value_gradient_same_for_envelope_implicit_and_unroll():
    x, y = points(2, 6, 5, seed=17)
    a, b = weights(2, 6, seed=18), weights(2, 5, seed=19)
    grads = []
    for adjoint in (dl.ot.Envelope(), dl.Implicit(), dl.Unroll()):
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(_tight_value(xr, y, a, b, EPS, adjoint).sum(), xr)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-8, atol=1e-10)


def _potential_loss(x, y, a, b, adjoint, wf, wg):
    res = dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=EPS, solver=tight(), adjoint=adjoint)
    return (wf * centred(res.f)).sum() + (wg * centred(res.g)).sum()


def test_implicit_equals_unrolled_for_centred_potentials():
    x, y = points(2, 6, 5, seed=20)
    a, b = weights(2, 6, seed=21), weights(2, 5, seed=22)
    g = torch.Generator().manual_seed(23)
    wf, wg = torch.randn(2, 6, dtype=D, generator=g), torch.randn(2, 5, dtype=D, generator=g)
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(_potential_loss(xr, yr, a, b, adjoint, wf, wg), (xr, yr)))
    for gi, gu in zip(*grads):
        torch.testing.assert_close(gi, gu, rtol=1e-7, atol=1e-9)
    # and against central differences of the centred potentials (x only, a few entries)
    h = 1e-5
    for idx in [(0, 0, 0), (0, 3, 1), (1, 5, 0)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (_potential_loss(x + e, y, a, b, None, wf, wg) - _potential_loss(x - e, y, a, b, None, wf, wg)) / (2 * h)
        torch.testing.assert_close(grads[0][0][idx], fd, rtol=1e-5, atol=1e-7)


def test_zero_weight_points_get_zero_finite_gradients_and_do_not_change_the_value():
    """A ragged batch padded with zero weights: the padded problem equals the small one."""
    x, y = points(2, 7, 6, seed=24)
    a, b = weights(2, 7, seed=25), weights(2, 6, seed=26)
    a[0, 5:] = 0.0
    b[1, 4:] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    x[0, 5:] = 1e3  # far-away garbage padding must not matter
    for adjoint in (dl.ot.Envelope(), dl.Implicit()):
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        res = dl.ot.sinkhorn(x=xr, y=yr, a=a, b=b, epsilon=EPS, solver=tight(), adjoint=adjoint)
        assert bool(torch.isfinite(res.value).all())
        gx, gy = torch.autograd.grad(res.value.sum(), (xr, yr))
        assert bool(torch.isfinite(gx).all() and torch.isfinite(gy).all())
        assert bool((gx[0, 5:] == 0).all()) and bool((gy[1, 4:] == 0).all())
        assert bool((res.plan[0, 5:] == 0).all()) and bool((res.plan[1, :, 4:] == 0).all())
        small0 = dl.ot.sinkhorn(x=x[0, :5], y=y[0], a=a[0, :5], b=b[0], epsilon=EPS, solver=tight())
        small1 = dl.ot.sinkhorn(x=x[1], y=y[1, :4], a=a[1], b=b[1, :4], epsilon=EPS, solver=tight())
        torch.testing.assert_close(res.value[0].detach(), small0.value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.value[1].detach(), small1.value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.plan[0, :5].detach(), small0.plan, rtol=0, atol=1e-12)


def test_batched_equals_loop():
    B = 3
    x, y = points(B, 6, 4, seed=27)
    a, b = weights(B, 6, seed=28), weights(B, 4, seed=29)
    xr = x.clone().requires_grad_(True)
    res = dl.ot.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=EPS, solver=tight())
    (gx,) = torch.autograd.grad(res.value.sum(), xr)
    for i in range(B):
        xi = x[i].clone().requires_grad_(True)
        ri = dl.ot.sinkhorn(x=xi, y=y[i], a=a[i], b=b[i], epsilon=EPS, solver=tight())
        assert ri.value.shape == () and ri.f.shape == (6,) and ri.plan.shape == (6, 4)
        (gi,) = torch.autograd.grad(ri.value, xi)
        torch.testing.assert_close(ri.value, res.value[i].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ri.plan, res.plan[i].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gi, gx[i], rtol=1e-9, atol=1e-11)


def test_warm_start_from_converged_potentials_stops_early():
    x, y = points(2, 8, 6, seed=30)
    cold = dl.ot.sinkhorn(x=x, y=y, epsilon=EPS, solver=tight())
    warm = dl.ot.sinkhorn(x=x, y=y, epsilon=EPS, solver=tight(), init=(cold.f, cold.g))
    assert bool((warm.stats["num_steps"] <= cold.stats["num_steps"]).all())
    assert int(warm.stats["num_steps"].max()) <= 10
    torch.testing.assert_close(warm.value, cold.value, rtol=1e-12, atol=1e-12)


def test_status_and_throw():
    x, y = points(2, 8, 6, seed=31)
    solver = dl.ot.Sinkhorn(rtol=1e-14, atol=1e-14, max_steps=2, check_every=1)
    with pytest.raises(dl.ConvergenceError):
        dl.ot.sinkhorn(x=x, y=y, epsilon=0.01, solver=solver)
    res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.01, solver=solver, throw=False)
    assert bool((res.status == dl.Status.MAX_STEPS).all())


# ---------------------------------------------------------------- Sinkhorn divergence


def test_sinkhorn_divergence_zero_on_diagonal_and_nonnegative():
    div = dl.ot.SinkhornDivergence(epsilon=EPS)
    x, y = points(3, 7, 5, seed=32)
    torch.testing.assert_close(div(x, x), torch.zeros(3, dtype=D), rtol=0, atol=1e-10)
    a, b = weights(3, 7, seed=33), weights(3, 5, seed=34)
    assert bool((div(x, y, a, b) >= -1e-12).all())
    assert bool((div(x, y) > 0).all())
    # S = OT(a,b) - (OT(a,a) + OT(b,b)) / 2
    ot_ = lambda u, v, p, q: dl.ot.sinkhorn(x=u, y=v, a=p, b=q, epsilon=EPS, solver=tight()).value  # noqa: E731
    expected = ot_(x, y, a, b) - 0.5 * (ot_(x, x, a, a) + ot_(y, y, b, b))
    torch.testing.assert_close(div(x, y, a, b), expected, rtol=1e-6, atol=1e-8)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(div(xr, y).sum(), xr)
    assert bool(torch.isfinite(gx).all())


# ---------------------------------------------------------------- bad input


def _good():
    x, y = points(2, 5, 4, seed=40)
    return x, y, weights(2, 5), weights(2, 4, seed=2)


@pytest.mark.parametrize("case", ["negative_a", "nan_b", "mass_mismatch", "zero_mass"])
def test_bad_marginals_raise(case):
    x, y, a, b = _good()
    if case == "negative_a":
        a[0, 0] = -0.1
        a[0, 1] += 0.1
    elif case == "nan_b":
        b[1, 2] = float("nan")
    elif case == "mass_mismatch":
        b = 1.5 * b  # balanced problems need equal masses
    else:
        a = torch.zeros_like(a)
    with pytest.raises(ValueError):
        dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=EPS)


@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan")])
def test_bad_epsilon_raises(eps):
    x, y, a, b = _good()
    with pytest.raises(ValueError):
        dl.ot.sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps)


@pytest.mark.parametrize("case", ["a_length", "b_length", "dim", "batch", "cost_and_points", "nothing",
                                  "cost_vs_a"])
def test_bad_shapes_raise(case):
    x, y, a, b = _good()
    kwargs = dict(x=x, y=y, a=a, b=b)
    if case == "a_length":
        kwargs["a"] = weights(2, 6)
    elif case == "b_length":
        kwargs["b"] = weights(2, 3)
    elif case == "dim":
        kwargs["y"] = torch.rand(2, 4, 3, dtype=D)
    elif case == "batch":
        kwargs["y"] = torch.rand(3, 4, 2, dtype=D)
        kwargs["b"] = weights(3, 4)
    elif case == "cost_and_points":
        kwargs["cost"] = sqdist(x, y)
    elif case == "nothing":
        kwargs = dict(a=a, b=b)
    else:
        kwargs = dict(cost=sqdist(x, y)[:, :4], a=a, b=b)
    with pytest.raises((ValueError, TypeError)):
        dl.ot.sinkhorn(epsilon=EPS, **kwargs)


def test_mismatched_devices_raise():
    x, y, a, b = _good()
    with pytest.raises((ValueError, TypeError)):
        dl.ot.sinkhorn(x=x, y=y.to("meta"), a=a, b=b, epsilon=EPS)


def test_bad_solver_options_raise():
    with pytest.raises((ValueError, TypeError)):
        dl.ot.Sinkhorn(max_steps=-1)
    with pytest.raises((ValueError, TypeError)):
        dl.ot.Sinkhorn(check_every=0)


def test_matches_ott_jax_value_and_gradient():
    """OTT-JAX (float64, run to 1e-12) gives the same regularized cost and d value / dx."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("ott.geometry")
    import numpy as np
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 2, dtype=torch.float64, generator=g)
    y = torch.rand(40, 2, dtype=torch.float64, generator=g)
    a = torch.rand(30, dtype=torch.float64, generator=g) + 0.1
    b = torch.rand(40, dtype=torch.float64, generator=g) + 0.1
    a, b = a / a.sum(), b / b.sum()
    with jax.enable_x64(True):
        import jax.numpy as jnp

        def cost(xj):
            geom = pointcloud.PointCloud(xj, jnp.asarray(y.numpy()), epsilon=0.05)
            problem = linear_problem.LinearProblem(geom, jnp.asarray(a.numpy()), jnp.asarray(b.numpy()))
            return ott_sinkhorn.Sinkhorn(threshold=1e-12, max_iterations=100000)(problem).reg_ot_cost

        value, grad = jax.value_and_grad(cost)(jnp.asarray(x.numpy()))
        value, grad = float(value), torch.tensor(np.array(grad))
    xr = x.clone().requires_grad_()
    res = dl.ot.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=0.05, solver=dl.ot.Sinkhorn(rtol=1e-12, atol=0.0, max_steps=100000))
    res.value.backward()
    assert abs(float(res.value.detach()) - value) < 1e-12
    torch.testing.assert_close(xr.grad, grad, rtol=1e-9, atol=1e-12)
