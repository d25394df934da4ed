"""Memory of the implicit paths does not grow with the number of forward iterations:
the bytes autograd keeps between forward and backward (counted exactly with
saved-tensor hooks), and the peak of a whole forward + backward (from the profiler's
allocation records), are the same for short and long solves, while unrolling grows."""

import pytest
import torch

import difflayers as dl

F64 = torch.float64


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()  # the graph was usable
    return sum(seen.values())


def _equilibrium(adjoint, rtol):
    g = torch.Generator().manual_seed(0)
    W = (0.9 * torch.randn(32, 32, generator=g, dtype=F64) / 32**0.5).requires_grad_()
    x = torch.randn(64, 32, generator=g, dtype=F64)
    solver = dl.solvers.Picard(rtol=rtol, atol=0.0, max_steps=10000)
    return lambda: dl.fixed_point(lambda z, W, x: torch.tanh(z @ W.T + x), torch.zeros(64, 32, dtype=F64), W, x,
                                  solver=solver, adjoint=adjoint)


def _transport(adjoint, rtol):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 60, 2, generator=g, dtype=F64).requires_grad_()
    y = torch.rand(4, 70, 2, generator=g, dtype=F64)
    solver = dl.ot.Sinkhorn(rtol=rtol, atol=0.0, max_steps=100000)
    if isinstance(adjoint, dl.ot.Envelope):
        return lambda: dl.ot.sinkhorn(x=x, y=y, epsilon=0.02, solver=solver, adjoint=adjoint).value
    return lambda: dl.ot.sinkhorn(x=x, y=y, epsilon=0.02, solver=solver, adjoint=adjoint).plan


@pytest.mark.parametrize("case, rtols", [(_equilibrium, (1e-3, 1e-10)), (_transport, (1e-8, 1e-13))],
                         ids=["fixed_point", "sinkhorn"])
def test_implicit_memory_is_flat_in_the_iterations_and_unrolling_grows(case, rtols):
    implicit = [saved_bytes(case(dl.Implicit(), rtol)) for rtol in rtols]
    unrolled = [saved_bytes(case(dl.Unroll(), rtol)) for rtol in rtols]
    assert implicit[0] == implicit[1]
    assert unrolled[1] > 1.5 * unrolled[0]
    assert implicit[1] < unrolled[0]


def test_envelope_memory_is_flat():
    envelope = [saved_bytes(_transport(dl.ot.Envelope(), rtol)) for rtol in (1e-8, 1e-13)]
    assert envelope[0] == envelope[1]


def test_pde_layer_memory_is_flat_in_newton_steps():
    from difflayers import pde

    grid = pde.Grid((12, 12))
    bc = pde.Dirichlet()
    sizes = []
    for rtol in (1e-3, 1e-12):
        layer = pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, bc) - f, grid=grid,
                             solver=dl.solvers.Newton(rtol=rtol, atol=0.0, linear_solver=dl.solvers.GMRES()))
        f = (20.0 * torch.ones(2, 12, 12, dtype=F64)).requires_grad_()
        sizes.append(saved_bytes(lambda: layer(f)))
    assert sizes[0] == sizes[1]


# ----------------------------------------------------------------------------- peak memory
#
# Saved tensors bound what autograd keeps; the peak of a whole forward + backward also
# counts the temporaries of the solves. It is measured from the profiler's allocation
# records (net bytes per operator, in time order), which follow every CPU allocation.


def peak_bytes(fn) -> int:
    """Peak of live CPU bytes allocated while ``fn()`` runs (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _forward_backward(make):
    def run():
        out, leaf = make()
        out.sum().backward()
        assert torch.isfinite(leaf.grad).all()
    return run


def _fixed_point_run(adjoint, rtol):
    def make():
        g = torch.Generator().manual_seed(0)
        W = (0.9 * torch.randn(32, 32, generator=g, dtype=F64) / 32**0.5).requires_grad_()
        x = torch.randn(64, 32, generator=g, dtype=F64)
        solver = dl.solvers.Picard(rtol=rtol, atol=0.0, max_steps=10000)
        z = dl.fixed_point(lambda z, W, x: torch.tanh(z @ W.T + x), torch.zeros(64, 32, dtype=F64), W, x,
                           solver=solver, adjoint=adjoint)
        return z, W
    return _forward_backward(make)


def _qp_run(adjoint, rtol):
    def make():
        g = torch.Generator().manual_seed(2)
        n = 16
        M = torch.randn(4, n, n, generator=g, dtype=F64)
        P = M @ M.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=F64)
        q = torch.randn(4, n, generator=g, dtype=F64).requires_grad_()
        G = torch.randn(4, 2 * n, n, generator=g, dtype=F64)
        h = torch.rand(4, 2 * n, generator=g, dtype=F64) + 0.1
        solver = dl.conic.InteriorPoint(rtol=rtol, atol=rtol, polish=False)
        x = dl.QPLayer(solver=solver, adjoint=adjoint)(P, q, G, h)
        return x, q
    return _forward_backward(make)


def _hypergradient_run(estimator):
    from difflayers import bilevel as bl

    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 40, generator=g, dtype=F64)
    y = torch.randn(200, generator=g, dtype=F64)

    def inner(w, lam):
        return 0.5 * (X @ w - y).square().mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return (X @ w - y).square().mean()

    def run():
        grad, _ = bl.hypergradient(outer, inner, torch.zeros(40, dtype=F64), torch.zeros(40, dtype=F64),
                                   estimator=estimator)
        assert torch.isfinite(grad).all()
    return run


def test_peak_memory_of_implicit_fixed_point_is_flat_and_unrolling_grows():
    implicit = [peak_bytes(_fixed_point_run(dl.Implicit(), rtol)) for rtol in (1e-3, 1e-7)]
    unrolled = [peak_bytes(_fixed_point_run(dl.Unroll(), rtol)) for rtol in (1e-3, 1e-7)]
    assert implicit[1] <= 1.05 * implicit[0]
    assert unrolled[1] > 2 * unrolled[0]
    assert implicit[1] < unrolled[0]


def test_peak_memory_of_the_qp_layer_is_flat_in_interior_point_iterations():
    implicit = [peak_bytes(_qp_run(dl.Implicit(), rtol)) for rtol in (1e-2, 1e-7)]
    unrolled = [peak_bytes(_qp_run(dl.Unroll(), rtol)) for rtol in (1e-2, 1e-7)]
    assert implicit[1] <= 1.05 * implicit[0]
    assert unrolled[1] > 1.5 * unrolled[0]


def test_peak_memory_of_implicit_hypergradients_is_flat_in_inner_steps():
    from difflayers import bilevel as bl

    def inner_solver(rtol):
        return bl.OptimizerSolver(optimizer=bl.SGD(lr=0.5), rtol=rtol, atol=0.0, max_steps=10000)

    implicit = [peak_bytes(_hypergradient_run(bl.ImplicitCG(inner_solver=inner_solver(rtol)))) for rtol in (1e-4, 1e-12)]
    unrolled = [peak_bytes(_hypergradient_run(bl.Unrolled(optimizer=bl.SGD(lr=0.5), steps=T))) for T in (20, 200)]
    assert implicit[1] <= 1.05 * implicit[0]
    assert unrolled[1] > 4 * unrolled[0]
