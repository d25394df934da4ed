"""Contracts every differentiable solve keeps: batched == loop, gradcheck, adjoint
consistency, grad-mode paths, several parameters, and honest failures."""

import warnings

import pytest
import torch

import difflayers as dl
from difflayers.solvers import LU, Newton, Picard, Status

D = torch.float64


def F_nonlinear(z, W, c):
    """A batched nonlinear system with a unique root: z + 0.3 tanh(W z) - c = 0."""
    return z + 0.3 * torch.tanh(torch.einsum("bij,bj->bi", W, z)) - c


def data(B=4, n=5):
    W = torch.randn(B, n, n, dtype=D) / n**0.5
    c = torch.randn(B, n, dtype=D)
    return W, c


def test_batched_equals_loop():
    W, c = data()
    W.requires_grad_(True)
    c.requires_grad_(True)
    z = dl.root_find(F_nonlinear, torch.zeros_like(c), W, c)
    gW, gc = torch.autograd.grad(z.square().sum(), (W, c))
    for i in range(c.shape[0]):
        Wi, ci = W[i : i + 1].detach().requires_grad_(True), c[i : i + 1].detach().requires_grad_(True)
        zi = dl.root_find(F_nonlinear, torch.zeros_like(ci), Wi, ci)
        gWi, gci = torch.autograd.grad(zi.square().sum(), (Wi, ci))
        torch.testing.assert_close(zi[0], z[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gWi[0], gW[i], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gci[0], gc[i], rtol=1e-9, atol=1e-11)


def test_gradcheck_root_find():
    W, c = data(B=2, n=3)
    W.requires_grad_(True)
    c.requires_grad_(True)
    solver = Newton(linear_solver=LU(), rtol=1e-14, atol=1e-14)
    fn = lambda W, c: dl.root_find(F_nonlinear, torch.zeros_like(c), W, c, solver=solver)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (W, c))
    assert torch.autograd.gradcheck(fn, (W, c), check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


def test_jvp_vjp_dot_product():
    """<u, J v> from forward mode equals <J^T u, v> from reverse mode."""
    W, c = data()
    fn = lambda W, c: dl.root_find(F_nonlinear, torch.zeros_like(c), W, c)  # noqa: E731
    vW, vc = torch.randn_like(W), torch.randn_like(c)
    z, Jv = torch.func.jvp(fn, (W, c), (vW, vc))
    u = torch.randn_like(z)
    _, pullback = torch.func.vjp(fn, W, c)
    uW, uc = pullback(u)
    lhs = (u * Jv).sum()
    rhs = (uW * vW).sum() + (uc * vc).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


def test_implicit_equals_unrolled_at_convergence():
    W, c = data()
    W.requires_grad_(True)
    grads = []
    for adjoint in (dl.Implicit(), dl.Unroll(), dl.CheckpointedUnroll()):
        z = dl.fixed_point(lambda z, W, c: z - F_nonlinear(z, W, c), torch.zeros_like(c), W, c,
                           solver=Picard(max_steps=2000, rtol=1e-14, atol=1e-15), adjoint=adjoint)
        grads.append(torch.autograd.grad(z.sum(), W)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[2], grads[1], rtol=1e-12, atol=1e-14)


def test_several_parameters_and_zero_dim_parameter():
    """Three parameters, one of them 0-dim and broadcast: d z / d s for z = s * c / (1 + a)."""
    c = torch.randn(3, 4, dtype=D, requires_grad=True)
    a = torch.tensor(0.5, dtype=D, requires_grad=True)
    s = torch.tensor(2.0, dtype=D, requires_grad=True)
    z = dl.root_find(lambda z, c, a, s: (1 + a) * z - s * c, torch.zeros(3, 4, dtype=D), c, a, s)
    gc, ga, gs = torch.autograd.grad(z.sum(), (c, a, s))
    cd = c.detach()
    torch.testing.assert_close(gc, torch.full_like(cd, 2.0 / 1.5))
    torch.testing.assert_close(ga, -(2.0 * cd).sum() / 1.5**2)
    torch.testing.assert_close(gs, cd.sum() / 1.5)


class CountingF:
    def __init__(self):
        self.calls = 0

    def __call__(self, z, c):
        self.calls += 1
        return z**3 + z - c


@pytest.mark.parametrize("mode", ["no_grad", "requires_grad_false"])
def test_no_gradient_paths_skip_backward_work(mode):
    F = CountingF()
    c = torch.randn(3, 2, dtype=D, requires_grad=(mode == "no_grad"))
    if mode == "no_grad":
        with torch.no_grad():
            z = dl.root_find(F, torch.zeros_like(c), c)
    else:
        z = dl.root_find(F, torch.zeros_like(c), c)
    assert z.grad_fn is None and not z.requires_grad
    calls_solve = F.calls
    F2 = CountingF()
    c2 = c.detach().requires_grad_(True)
    dl.root_find(F2, torch.zeros_like(c2), c2)
    # With gradients requested there is exactly one extra evaluation (the closure check).
    assert F2.calls == calls_solve + 1


def test_create_graph_gives_first_order_gradient():
    c = torch.tensor([2.0], dtype=D, requires_grad=True)
    z = dl.root_find(lambda z, c: z**2 - c, torch.ones(1, dtype=D), c)
    (g,) = torch.autograd.grad(z.square().sum(), c, create_graph=True)
    torch.testing.assert_close(g, torch.ones(1, dtype=D))  # d(z^2)/dc = d c / dc


# ----------------------------------------------------------------------------- failures


def test_captured_differentiable_tensor_is_rejected():
    W = torch.randn(3, 3, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="pass that tensor after z0"):
        dl.root_find(lambda z, c: z + 0.1 * torch.tanh(z @ W.T) - c, torch.zeros_like(c), c)


def test_max_steps_throw_true_names_the_sample():
    c = torch.tensor([[0.5], [1e6]], dtype=D)
    T = lambda z, c: 0.999 * z + c * 1e-3  # noqa: E731  (slow contraction)
    with pytest.raises(dl.ConvergenceError, match="MAX_STEPS") as info:
        dl.fixed_point(T, torch.zeros_like(c), c, solver=Picard(max_steps=10))
    assert info.value.indices == [0, 1]
    assert info.value.solution.value.shape == c.shape


def test_max_steps_throw_false_returns_status_and_warns_on_differentiation():
    c = torch.tensor([[0.5], [0.25]], dtype=D, requires_grad=True)
    T = lambda z, c: 0.999 * z + c  # noqa: E731
    with pytest.warns(RuntimeWarning, match="did not converge for samples \\[0, 1\\]"):
        sol = dl.fixed_point(T, torch.zeros_like(c), c, solver=Picard(max_steps=10), throw=False,
                             return_solution=True)
    assert sol.status.tolist() == [Status.MAX_STEPS] * 2
    assert sol.stats["num_steps"].tolist() == [10, 10]


def test_nan_in_one_sample_spoils_only_that_sample():
    c = torch.tensor([[1.0], [float("nan")], [2.0]], dtype=D)
    F = lambda z, c: z**3 + z - c  # noqa: E731
    sol = dl.root_find(F, torch.zeros_like(c), c, throw=False, return_solution=True)
    assert sol.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert torch.allclose(F(sol.value[[0, 2]], c[[0, 2]]), torch.zeros(2, 1, dtype=D), atol=1e-12)
    with pytest.raises(dl.ConvergenceError, match="sample 1: NONFINITE"):
        dl.root_find(F, torch.zeros_like(c), c)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: dl.fixed_point("not callable", torch.zeros(2, 3)), TypeError, "callable"),
        (lambda: dl.fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: dl.fixed_point(lambda z: z, [1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: dl.fixed_point(lambda z, p: z, torch.zeros(2, 3, dtype=D), torch.ones(3, dtype=torch.float32)),
         TypeError, "dtype"),
        (lambda: dl.fixed_point(lambda z, p: z, torch.zeros(2, 3, dtype=D), torch.ones(3, dtype=D, device="meta")),
         ValueError, "device"),
        (lambda: dl.fixed_point(lambda z, p: z, torch.zeros(2, 3, dtype=D), 3.0), TypeError, "functools.partial"),
        (lambda: dl.fixed_point(lambda z: z[:, :2], torch.zeros(2, 3, dtype=D)), ValueError, "returned shape"),
        (lambda: dl.argmin(lambda z: z.sum(), torch.zeros(2, 3, dtype=D)), ValueError, "one value per sample"),
        (lambda: dl.root_find(lambda z: z, torch.tensor(1.0, dtype=D)), ValueError, "batched=False"),
        (lambda: dl.fixed_point(lambda z: z, torch.zeros(2, 3, dtype=D), solver="anderson"), TypeError, "solver"),
        (lambda: dl.fixed_point(lambda z: z, torch.zeros(2, 3, dtype=D), adjoint="implicit"), TypeError, "adjoint"),
        (lambda: dl.Truncated(steps=0), ValueError, "steps"),
        (lambda: dl.Implicit(linear_solver="cg"), TypeError, "LinearSolver"),
        (lambda: Picard(damping=1.5), ValueError, "damping"),
        (lambda: Picard(max_steps=-1), ValueError, "max_steps"),
        (lambda: Picard(rtol=float("nan")), ValueError, "rtol"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_warnings_free_on_success():
    W, c = data()
    c.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = dl.root_find(F_nonlinear, torch.zeros_like(c), W, c)
        z.sum().backward()
