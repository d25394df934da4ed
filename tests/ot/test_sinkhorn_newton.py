"""Sinkhorn-Newton (float64): the same solution as Sinkhorn in far fewer steps at small
epsilon, sparsified Hessians, CG and dense Newton systems, gradients and bad input."""

import pytest
import torch

import difflayers as dl
from difflayers.ot import Sinkhorn, SinkhornNewton, sinkhorn

F64 = torch.float64
TIGHT = dict(rtol=1e-11, atol=0.0)


def _clouds(batch=2, n=30, m=35, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, 2, generator=g, dtype=F64)
    y = torch.rand(batch, m, 2, generator=g, dtype=F64)
    a = torch.rand(batch, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=F64) + 0.1
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("options", [dict(), dict(rho_a=0.5), dict(rho_a=0.2, rho_b=1.0), dict(zero_weights=True)])
def test_same_solution_as_sinkhorn_in_fewer_steps(options):
    options = dict(options)
    x, y, a, b = _clouds(seed=1)
    if options.pop("zero_weights", False):
        a = a.clone()
        a[:, :5] = 0.0
        a = a / a.sum(1, keepdim=True)
    eps = 0.003
    plain = sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, solver=Sinkhorn(**TIGHT, max_steps=200000), **options)
    newton = sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, solver=SinkhornNewton(**TIGHT, warmup=50), **options)
    torch.testing.assert_close(newton.value, plain.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(newton.plan, plain.plan, rtol=1e-6, atol=1e-10)
    assert bool((newton.stats["num_steps"] <= 50 + 30).all())
    assert bool((plain.stats["num_steps"] > 5 * newton.stats["num_steps"]).all())


@pytest.mark.parametrize("linear_solver", [None, dl.solvers.CG(rtol=1e-2, atol=0.0)], ids=["dense", "cg"])
@pytest.mark.parametrize("truncation", [0.0, 1e-3])
def test_sparsified_hessian_and_linear_solvers_reach_the_same_point(linear_solver, truncation):
    x, y, a, b = _clouds(batch=3, n=50, m=40, seed=2)
    ref = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.005, solver=Sinkhorn(**TIGHT, max_steps=200000))
    solver = SinkhornNewton(**TIGHT, warmup=20, truncation=truncation, linear_solver=linear_solver)
    res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.005, solver=solver)
    torch.testing.assert_close(res.value, ref.value, rtol=1e-9, atol=1e-12)
    P = res.plan
    torch.testing.assert_close(P.sum(2), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(P.sum(1), b, rtol=0, atol=1e-9)


def test_converged_warmup_skips_newton_and_gradients_flow():
    x, y, a, b = _clouds(seed=3)
    # large eps: Sinkhorn converges within the warm-up
    res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.5, solver=SinkhornNewton(warmup=1000))
    ref = sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.5)
    torch.testing.assert_close(res.stats["num_steps"], ref.stats["num_steps"])
    grads = []
    for solver in (Sinkhorn(**TIGHT, max_steps=200000), SinkhornNewton(**TIGHT, warmup=30)):
        for adjoint in (dl.ot.Envelope(), dl.Implicit()):
            x1 = x.clone().requires_grad_()
            out = sinkhorn(x=x1, y=y, a=a, b=b, epsilon=0.01, solver=solver, adjoint=adjoint)
            (out.value.sum() if isinstance(adjoint, dl.ot.Envelope) else out.plan.square().sum()).backward()
            grads.append(x1.grad)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grads[3], grads[1], rtol=1e-6, atol=1e-9)


def test_unroll_and_bad_options_are_refused():
    x, y, a, b = _clouds(seed=4)
    x.requires_grad_()
    with pytest.raises(TypeError, match="cannot be unrolled"):
        sinkhorn(x=x, y=y, epsilon=0.01, solver=SinkhornNewton(), adjoint=dl.Unroll())
    for kwargs, error in [(dict(warmup=-1), ValueError), (dict(newton_steps=1.5), ValueError),
                          (dict(truncation=1.0), ValueError), (dict(linear_solver="cg"), TypeError),
                          (dict(shift=0.0), ValueError), (dict(armijo=0.5), ValueError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            SinkhornNewton(**kwargs)


def test_non_convergence_reports_max_steps():
    x, y, a, b = _clouds(seed=5)
    solver = SinkhornNewton(**TIGHT, warmup=2, newton_steps=1)
    with pytest.raises(dl.ConvergenceError, match="MAX_STEPS"):
        sinkhorn(x=x, y=y, epsilon=0.001, solver=solver)
    res = sinkhorn(x=x, y=y, epsilon=0.001, solver=solver, throw=False)
    assert bool((res.status == int(dl.Status.MAX_STEPS)).all())
    assert bool((res.stats["num_steps"] == 3).all())
