"""Sinkhorn layers (float64): envelope, implicit and unrolled gradients, unbalanced
transport, zero weights and padding, tiles, batching, warm starts and bad input."""

import pytest
import torch

import difflayers as dl
from difflayers.ot import Sinkhorn, SinkhornDivergence, sinkhorn
from difflayers.testing import check_grad

F64 = torch.float64
TIGHT = Sinkhorn(rtol=1e-12, atol=1e-14, max_steps=20000)


def _clouds(batch=2, n=12, m=15, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, d, generator=g, dtype=F64)
    y = torch.rand(batch, m, d, generator=g, dtype=F64)
    a = torch.rand(batch, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=F64) + 0.1
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def test_envelope_gradient_matches_finite_differences():
    x, y, a, b = _clouds()
    fn = lambda x, y: sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, solver=TIGHT).value  # noqa: E731
    check_grad(fn, (x, y), rtol=1e-6, atol=1e-9, raise_exception=True)


def test_envelope_gradient_of_the_weights_is_the_potential():
    """dV/da = f, up to the gauge constant (a stays on the simplex: compare centred)."""
    x, y, a, b = _clouds(seed=1)
    a1 = a.clone().requires_grad_()
    res = sinkhorn(x=x, y=y, a=a1, b=b, epsilon=0.1, solver=TIGHT)
    res.value.sum().backward()
    torch.testing.assert_close(a1.grad - a1.grad.mean(1, keepdim=True), res.f - res.f.mean(1, keepdim=True))
    # directional derivative along a mass-preserving direction
    d = torch.randn_like(a)
    d = d - d.mean(1, keepdim=True)
    h = 1e-6
    fd = (sinkhorn(x=x, y=y, a=a + h * d, b=b, epsilon=0.1, solver=TIGHT).value
          - sinkhorn(x=x, y=y, a=a - h * d, b=b, epsilon=0.1, solver=TIGHT).value) / (2 * h)
    torch.testing.assert_close((a1.grad * d).sum(1), fd, rtol=1e-6, atol=1e-9)


def test_dense_cost_gradient_is_the_plan():
    x, y, a, b = _clouds(seed=2)
    C = torch.cdist(x, y).square().requires_grad_()
    res = sinkhorn(cost=C, a=a, b=b, epsilon=0.05, solver=TIGHT)
    res.value.sum().backward()
    torch.testing.assert_close(C.grad, res.plan, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.plan.sum(2), a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.plan.sum(1), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho", [None, 0.5])
def test_implicit_equals_unrolled_at_convergence(rho):
    x, y, a, b = _clouds(seed=3)
    w = torch.randn(a.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        xx = x.clone().requires_grad_()
        res = sinkhorn(x=xx, y=y, a=a, b=b, epsilon=0.1, rho_a=rho, rho_b=rho, solver=TIGHT, adjoint=adjoint)
        f = res.f - res.f.mean(1, keepdim=True)  # the potentials' gauge
        ((f * w).sum() + 10.0 * res.plan.square().sum() + res.value.sum()).backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rho", [None, 0.3])
def test_envelope_equals_implicit_for_the_value(rho):
    x, y, a, b = _clouds(seed=4)
    grads = []
    for adjoint in (dl.ot.Envelope(), dl.Implicit()):
        xx, aa = x.clone().requires_grad_(), a.clone().requires_grad_()
        sinkhorn(x=xx, y=y, a=aa, b=b, epsilon=0.1, rho_a=rho, rho_b=rho, solver=TIGHT, adjoint=adjoint).value.sum().backward()
        grads.append((xx.grad, aa.grad - (aa.grad.mean(1, keepdim=True) if rho is None else 0.0)))
    for e, i in zip(*grads):
        torch.testing.assert_close(e, i, rtol=1e-8, atol=1e-10)


def test_unbalanced_envelope_matches_finite_differences():
    x, y, a, b = _clouds(seed=5)
    b = 1.5 * b  # unequal masses are allowed when a marginal is relaxed
    fn = lambda x, a, b: sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, rho_a=0.7, rho_b=0.4, solver=TIGHT).value  # noqa: E731
    check_grad(fn, (x, a, b), rtol=1e-6, atol=1e-9, raise_exception=True)


@pytest.mark.parametrize("adjoint", [dl.ot.Envelope(), dl.Implicit(), dl.Unroll()], ids=lambda a: type(a).__name__)
def test_zero_weights_give_zero_finite_gradients(adjoint):
    """A ragged batch padded with zero-weight points."""
    x, y, a, b = _clouds(seed=6)
    a = a.clone()
    a[:, -4:] = 0.0
    a = a / a.sum(1, keepdim=True)
    xx = x.clone().requires_grad_()
    res = sinkhorn(x=xx, y=y, a=a, b=b, epsilon=0.1, adjoint=adjoint)
    loss = res.value.sum() if isinstance(adjoint, dl.ot.Envelope) else res.value.sum() + res.plan.sum()
    loss.backward()
    assert torch.isfinite(xx.grad).all() and torch.isfinite(res.value).all()
    assert xx.grad[:, -4:].abs().max() == 0.0
    # padding does not change the value
    trimmed = sinkhorn(x=x[:, :-4], y=y, a=a[:, :-4], b=b, epsilon=0.1).value
    torch.testing.assert_close(res.value.detach(), trimmed, rtol=1e-9, atol=1e-12)


def test_batched_equals_loop_and_tiles_equal_dense():
    x, y, a, b = _clouds(batch=3, seed=7)
    batched = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.05)
    for i in range(3):
        single = sinkhorn(x=x[i], y=y[i], a=a[i], b=b[i], epsilon=0.05)
        assert single.value.dim() == 0 and single.f.shape == (12,)
        torch.testing.assert_close(single.value, batched.value[i], rtol=1e-9, atol=1e-12)
    xx = x.clone().requires_grad_()
    tiled = sinkhorn(x=xx, y=y, a=a, b=b, epsilon=0.05, tile=5)
    tiled.value.sum().backward()
    xd = x.clone().requires_grad_()
    sinkhorn(cost=torch.cdist(xd, y).square(), a=a, b=b, epsilon=0.05).value.sum().backward()
    torch.testing.assert_close(tiled.value.detach(), batched.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(xx.grad, xd.grad, rtol=1e-8, atol=1e-10)
    v = torch.randn(3, 15, 2, dtype=F64)
    torch.testing.assert_close(tiled.apply_plan(v), tiled.plan @ v)


def test_sinkhorn_divergence():
    x, y, _, _ = _clouds(seed=8)
    loss = SinkhornDivergence(epsilon=0.1)
    torch.testing.assert_close(loss(x, x), torch.zeros(2, dtype=F64), rtol=0, atol=1e-10)
    xx = x.clone().requires_grad_()
    value = loss(xx, y)
    assert bool((value > 0).all())
    value.sum().backward()
    assert torch.isfinite(xx.grad).all()


def test_warm_start_and_epsilon_scaling():
    x, y, a, b = _clouds(seed=9)
    cold = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.02)
    warm = sinkhorn(x=x + 1e-3, y=y, a=a, b=b, epsilon=0.02, init=(cold.f, cold.g))
    again = sinkhorn(x=x + 1e-3, y=y, a=a, b=b, epsilon=0.02)
    assert bool((warm.stats["num_steps"] < again.stats["num_steps"]).all())
    torch.testing.assert_close(warm.value, again.value, rtol=1e-8, atol=1e-10)
    scaled = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.02, solver=Sinkhorn(epsilon_scaling=0.5))
    torch.testing.assert_close(scaled.value, cold.value, rtol=1e-8, atol=1e-10)


def test_non_convergence_is_reported():
    x, y, a, b = _clouds(seed=10)
    with pytest.raises(dl.ConvergenceError, match="MAX_STEPS"):
        sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.001, solver=Sinkhorn(max_steps=10))
    res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.001, solver=Sinkhorn(max_steps=10), throw=False)
    assert bool((res.status == dl.Status.MAX_STEPS).all())


def test_float32_warns_when_epsilon_is_too_small():
    x, y, _, _ = _clouds(seed=11)
    with pytest.warns(RuntimeWarning, match="float32"):
        sinkhorn(x=x.float() * 100, y=y.float() * 100, epsilon=1e-3, solver=Sinkhorn(max_steps=10), throw=False)
    res = sinkhorn(x=x.float(), y=y.float(), epsilon=0.1)
    ref = sinkhorn(x=x, y=y, epsilon=0.1)
    torch.testing.assert_close(res.value.double(), ref.value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(epsilon=0.1, a=-torch.ones(2, 12, dtype=F64) / 12), ValueError, "negative"),
        (dict(epsilon=0.1, a=torch.full((2, 12), float("nan"), dtype=F64)), ValueError, "NaN"),
        (dict(epsilon=0.1, a=torch.ones(2, 12, dtype=F64)), ValueError, "same total mass"),
        (dict(epsilon=0.1, a=torch.ones(2, 11, dtype=F64) / 11), ValueError, "12 entries"),
        (dict(epsilon=0.1, a=torch.ones(2, 12) / 12), TypeError, "dtype"),
        (dict(epsilon=0.1, cost_fn="manhattan"), ValueError, "cost_fn"),
        (dict(epsilon=0.1, rho_a=-1.0), ValueError, "rho_a"),
        (dict(epsilon=0.1, solver=dl.solvers.CG()), TypeError, "Sinkhorn"),
        (dict(epsilon=0.1, adjoint=dl.OneStep()), TypeError, "adjoint"),
    ],
)
def test_bad_input(kwargs, error, match):
    x, y, _, _ = _clouds()
    with pytest.raises(error, match=match):
        sinkhorn(x=x, y=y, **kwargs)


def test_bad_geometry():
    x, y, _, _ = _clouds()
    with pytest.raises(ValueError, match="either cost"):
        sinkhorn(cost=torch.cdist(x, y), x=x, y=y, epsilon=0.1)
    with pytest.raises(ValueError, match="either cost"):
        sinkhorn(x=x, epsilon=0.1)
    with pytest.raises(ValueError, match="dimension"):
        sinkhorn(x=x, y=torch.rand(2, 15, 3, dtype=F64), epsilon=0.1)
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(cost=torch.full((4, 5), float("nan"), dtype=F64), epsilon=0.1)


def test_over_relaxation_same_solution_fewer_iterations():
    x, y, a, b = _clouds(batch=2, n=40, m=50, seed=12)
    plain = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.01, solver=Sinkhorn(max_steps=20000))
    fast = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.01, solver=Sinkhorn(max_steps=20000, relaxation=1.6))
    torch.testing.assert_close(fast.value, plain.value, rtol=1e-9, atol=1e-12)
    assert bool((2 * fast.stats["num_steps"] <= plain.stats["num_steps"]).all())
    # unrolling through relaxed iterations still gives the gradient of the solution
    xx = x.clone().requires_grad_()
    unrolled = sinkhorn(x=xx, y=y, a=a, b=b, epsilon=0.05, adjoint=dl.Unroll(),
                        solver=Sinkhorn(rtol=1e-12, atol=1e-14, max_steps=20000, relaxation=1.5))
    unrolled.value.sum().backward()
    xe = x.clone().requires_grad_()
    sinkhorn(x=xe, y=y, a=a, b=b, epsilon=0.05, solver=TIGHT).value.sum().backward()
    torch.testing.assert_close(xx.grad, xe.grad, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="relaxation"):
        Sinkhorn(relaxation=2.0)


def test_sinkhorn_layer_returns_a_differentiable_plan():
    x, y, a, b = _clouds(seed=13)
    layer = dl.SinkhornLayer(epsilon=0.1, solver=TIGHT)
    P = layer(x, y, a, b)
    torch.testing.assert_close(P, sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, solver=TIGHT).plan)
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll()):
        xx = x.clone().requires_grad_()
        (dl.SinkhornLayer(epsilon=0.1, solver=TIGHT, adjoint=adjoint)(xx, y, a, b) @ y).square().sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    C = torch.cdist(x, y).square()
    torch.testing.assert_close(layer(cost=C, a=a, b=b), P)
    assert isinstance(dl.SinkhornLayer(epsilon=0.1, return_result=True)(x, y), dl.ot.SinkhornResult)
    with pytest.raises(TypeError, match="Implicit"):
        dl.SinkhornLayer(epsilon=0.1, adjoint=dl.ot.Envelope())


@pytest.mark.parametrize(
    "options",
    [dict(), dict(rho_a=0.5), dict(rho_a=0.3, rho_b=2.0), dict(relaxation=1.5), dict(zero_weights=True)],
)
def test_stabilized_kernel_iterations_equal_the_log_domain(options):
    """Both iterations reach the same fixed point, in about the same number of steps."""
    options = dict(options)
    relaxation = options.pop("relaxation", 1.0)
    x, y, a, b = _clouds(batch=3, n=20, m=25, seed=21)
    if options.pop("zero_weights", False):
        a = a.clone()
        a[:, -4:] = 0.0
        a = a / a.sum(1, keepdim=True)
    results = [
        sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.02, **options,
                 solver=Sinkhorn(rtol=1e-11, atol=0.0, max_steps=20000, relaxation=relaxation, kernel=kernel))
        for kernel in (True, False)
    ]
    kern, log = results
    torch.testing.assert_close(kern.value, log.value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kern.plan, log.plan, rtol=1e-8, atol=1e-12)
    # over-relaxed runs start differently (the kernel path from one plain iteration)
    assert int((kern.stats["num_steps"] - log.stats["num_steps"]).abs().max()) <= 20


@pytest.mark.parametrize("epsilon, check_every, relaxation", [(2e-3, 10, 1.8), (1e-3, 500, 1.0)])
def test_stabilized_kernel_absorbs_and_falls_back_at_tiny_epsilon(epsilon, check_every, relaxation):
    """At eps = 1e-3 x cost in float32 (exp(-C/eps) underflows) the kernel iterations
    absorb their scalings; with long blocks (check_every=500) the scalings overflow
    and those blocks are recomputed in the log domain. Same result as the log domain."""
    x, y, a, b = _clouds(batch=2, n=30, m=30, seed=22)
    x, y, a, b = (t.float() for t in (x, y, a, b))
    out = []
    for kernel in (True, False):
        solver = Sinkhorn(rtol=1e-3, atol=0.0, max_steps=50000, kernel=kernel, relaxation=relaxation,
                          check_every=check_every)
        out.append(sinkhorn(x=x, y=y, a=a, b=b, epsilon=epsilon, solver=solver))
    assert bool(torch.isfinite(out[0].f).all()) and bool((out[0].status == 0).all())
    torch.testing.assert_close(out[0].value, out[1].value, rtol=1e-5, atol=1e-7)


def test_kernel_option_is_validated():
    with pytest.raises(TypeError, match="kernel"):
        Sinkhorn(kernel="yes")


def test_pnorm_costs():
    x, y, a, b = _clouds(seed=30)
    for p, power in ((1.0, 1.0), (3.0, 2.0), (float("inf"), 1.0)):
        fn = dl.ot.pnorm_cost(p, power)
        expected = (x[:, :, None, :] - y[:, None, :, :]).abs()
        dist = expected.amax(-1) if p == float("inf") else expected.pow(p).sum(-1).pow(1 / p)
        torch.testing.assert_close(fn(x, y), dist**power)
        res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, cost_fn=fn, solver=TIGHT)
        ref = sinkhorn(cost=dist**power, a=a, b=b, epsilon=0.1, solver=TIGHT)
        torch.testing.assert_close(res.value, ref.value)
    # a smooth cost (p = 3, squared): envelope gradient against finite differences
    fn = dl.ot.pnorm_cost(3.0, 2.0)
    check_grad(lambda x: sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, cost_fn=fn, solver=TIGHT).value, (x,),
               rtol=1e-6, atol=1e-9, raise_exception=True)
    with pytest.raises(ValueError, match="p must be"):
        dl.ot.pnorm_cost(0.5)
    with pytest.raises(ValueError, match="power"):
        dl.ot.pnorm_cost(2.0, power=0.0)
