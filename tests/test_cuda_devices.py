"""CUDA runs of the transport, bilevel and PDE layers equal their CPU runs (skipped
where no CUDA device is present)."""

import pytest
import torch

import difflayers as dl

F64 = torch.float64
CUDA = torch.device("cuda")


def _clouds(seed=0, batch=3, n=40, m=50):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, 2, generator=g, dtype=F64), torch.rand(batch, m, 2, generator=g, dtype=F64)


@pytest.mark.cuda
@pytest.mark.parametrize("solver", [dl.ot.Sinkhorn(rtol=1e-11, atol=0.0, max_steps=20000),
                                    dl.ot.Sinkhorn(rtol=1e-11, atol=0.0, max_steps=20000, kernel=False),
                                    dl.ot.SinkhornNewton(rtol=1e-11, atol=0.0, warmup=20)],
                         ids=["kernel", "log", "newton"])
def test_sinkhorn_on_cuda_equals_cpu(solver):
    x, y = _clouds()
    out = []
    for device in ("cpu", CUDA):
        xd = x.to(device).requires_grad_()
        res = dl.ot.sinkhorn(x=xd, y=y.to(device), epsilon=0.01, solver=solver, adjoint=dl.Implicit())
        res.plan.square().sum().backward()
        out.append((res.value.cpu(), xd.grad.cpu()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("linear_solver", [None, dl.solvers.CG(rtol=1e-2, atol=0.0)], ids=["dense", "cg-csr"])
def test_quadratic_ot_on_cuda_equals_cpu(linear_solver):
    x, y = _clouds(seed=1)
    solver = dl.ot.SemismoothNewton(rtol=1e-12, atol=0.0, linear_solver=linear_solver)
    out = []
    for device in ("cpu", CUDA):
        xd = x.to(device).requires_grad_()
        res = dl.ot.quadratic_ot(x=xd, y=y.to(device), epsilon=1e-3, solver=solver, adjoint=dl.Implicit())
        res.plan.square().sum().backward()
        out.append((res.plan.detach().cpu(), xd.grad.cpu()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
def test_hypergradient_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(50, 6, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    out = []
    for device in ("cpu", CUDA):
        Xd, yd = X.to(device), y.to(device)
        inner = lambda w, lam: 0.5 * ((Xd @ w - yd) ** 2).mean() + 0.5 * (lam * w**2).sum()  # noqa: E731
        outer = lambda w, lam: (w**2).sum()  # noqa: E731
        grad, _ = dl.bilevel.hypergradient(outer, inner, torch.zeros(6, dtype=F64, device=device),
                                           torch.full((6,), 0.1, dtype=F64, device=device))
        out.append(grad.cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-8, atol=1e-12)


@pytest.mark.cuda
def test_pde_layer_on_cuda_equals_cpu():
    from difflayers import pde

    grid = pde.Grid((16, 16))
    bc = pde.Dirichlet()
    out = []
    for device in ("cpu", CUDA):
        layer = pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, bc) - f, grid=grid)
        f = torch.ones(2, 16, 16, dtype=F64, device=device).requires_grad_()
        layer(f).square().sum().backward()
        out.append(f.grad.cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-7, atol=1e-10)
