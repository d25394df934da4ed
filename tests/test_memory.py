"""Memory of the implicit paths does not grow with the number of forward iterations:
the bytes autograd keeps between forward and backward (counted exactly with
saved-tensor hooks) are the same for short and long solves, while unrolling grows."""

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
