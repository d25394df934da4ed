"""Implicit differentiation against closed forms, and every strategy against each other."""

import pytest
import torch

import difflayers as dl
from difflayers.solvers import CG, GMRES, LU, Anderson, Broyden, MINRES, Neumann, Newton, Picard

D = torch.float64


def linear_fixed_point_data(B=3, n=6, rho=0.6):
    A = torch.randn(B, n, n, dtype=D)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(B, n, dtype=D)
    return A, b


def T_linear(z, A, b):
    return torch.einsum("bij,bj->bi", A, z) + b


def closed_form_linear(A, b, u):
    """z = (I - A)^-1 b;  d<u,z>/db = (I - A)^-T u;  d<u,z>/dA = (I - A)^-T u z^T."""
    eye = torch.eye(A.shape[-1], dtype=D)
    z = torch.linalg.solve(eye - A, b)
    gb = torch.linalg.solve((eye - A).transpose(1, 2), u)
    return z, gb, gb[:, :, None] * z[:, None, :]


@pytest.mark.parametrize(
    "adjoint",
    [
        dl.Implicit(),
        dl.Implicit(linear_solver=Neumann(max_steps=500)),
        dl.Implicit(linear_solver=LU()),
        dl.Implicit(linear_solver=GMRES()),
        dl.Unroll(),
        dl.CheckpointedUnroll(),
        dl.Truncated(steps=80),
    ],
    ids=lambda a: repr(a),
)
@pytest.mark.parametrize("solver", [Picard(max_steps=500), Anderson(), Broyden()], ids=lambda s: type(s).__name__)
def test_linear_fixed_point_gradients(solver, adjoint):
    A, b = linear_fixed_point_data()
    u = torch.randn_like(b)
    z_ref, gb_ref, gA_ref = closed_form_linear(A, b, u)
    A.requires_grad_(True)
    b.requires_grad_(True)
    z = dl.fixed_point(T_linear, torch.zeros_like(b), A, b, solver=solver, adjoint=adjoint)
    torch.testing.assert_close(z, z_ref, rtol=1e-8, atol=1e-9)
    gA, gb = torch.autograd.grad((u * z).sum(), (A, b))
    # Truncated(80) of a contraction with rate <= 0.6 has error 0.6^80 ~ 1e-18.
    torch.testing.assert_close(gb, gb_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gA, gA_ref, rtol=1e-7, atol=1e-8)


def test_one_step_is_jacobian_free_backprop():
    """OneStep returns (dT/db)^T u = u at the fixed point, not (I - A)^-T u."""
    A, b = linear_fixed_point_data()
    u = torch.randn_like(b)
    b.requires_grad_(True)
    z = dl.fixed_point(T_linear, torch.zeros_like(b), A, b, adjoint=dl.OneStep())
    (gb,) = torch.autograd.grad((u * z).sum(), b)
    torch.testing.assert_close(gb, u)


def ridge_data(n=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = X @ torch.randn(d, generator=g, dtype=D) + 0.1 * torch.randn(n, generator=g, dtype=D)
    Xv = torch.randn(n, d, generator=g, dtype=D)
    yv = Xv @ torch.randn(d, generator=g, dtype=D)
    lam = torch.rand(d, generator=g, dtype=D) + 0.1
    return X, y, Xv, yv, lam


def ridge_objective(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() / X.shape[0] + 0.5 * (lam * w**2).sum()


def ridge_closed_form(X, y, Xv, yv, lam):
    """w* = H^-1 X^T y / n with H = X^T X / n + diag(lam); validation loss
    L = 1/2 ||Xv w* - yv||^2 has dL/dlam = -w* (H^-1 Xv^T (Xv w* - yv))."""
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / n)
    v = torch.linalg.solve(H, Xv.T @ (Xv @ w - yv))
    return w, -w * v


@pytest.mark.parametrize(
    "solver,adjoint",
    [
        (Newton(linear_solver=CG()), dl.Implicit()),
        (Newton(linear_solver=LU()), dl.Implicit(linear_solver=MINRES())),
        (Newton(linear_solver=CG()), dl.OneStep()),  # one Newton step at the solution is the IFT
        (Newton(linear_solver=LU()), dl.Unroll()),
    ],
    ids=["newton-cg/implicit-cg", "newton-lu/implicit-minres", "newton/onestep", "newton-lu/unroll"],
)
def test_ridge_hypergradient(solver, adjoint):
    X, y, Xv, yv, lam = ridge_data()
    w_ref, g_ref = ridge_closed_form(X, y, Xv, yv, lam)
    lam.requires_grad_(True)
    w = dl.argmin(ridge_objective, torch.zeros(X.shape[1], dtype=D), lam, X, y,
                  solver=solver, adjoint=adjoint, batched=False)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).sum(), lam)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_scalar_root_zero_dim():
    """z^2 = c: z = sqrt(c), dz/dc = 1 / (2 sqrt(c)); 0-dim tensors throughout."""
    c = torch.tensor(3.0, dtype=D, requires_grad=True)
    z = dl.root_find(lambda z, c: z**2 - c, torch.tensor(1.0, dtype=D), c, batched=False)
    assert z.shape == ()
    torch.testing.assert_close(z, c.detach().sqrt())
    z.backward()
    torch.testing.assert_close(c.grad, 0.5 / c.detach().sqrt())


def test_forward_mode_matches_closed_form():
    A, b = linear_fixed_point_data()
    db = torch.randn_like(b)
    eye = torch.eye(A.shape[-1], dtype=D)
    _, dz = torch.func.jvp(lambda b: dl.fixed_point(T_linear, torch.zeros_like(b), A, b), (b,), (db,))
    torch.testing.assert_close(dz, torch.linalg.solve(eye - A, db), rtol=1e-8, atol=1e-10)


def test_broadcast_parameter_gradient_is_summed():
    """An unbatched b [n] broadcast over B samples gets the SUM of per-sample gradients."""
    A, b = linear_fixed_point_data()
    u = torch.randn_like(b)
    _, gb_ref, _ = closed_form_linear(A, b[0].expand_as(b), u)
    b0 = b[0].clone().requires_grad_(True)
    z = dl.fixed_point(T_linear, torch.zeros_like(b), A, b0)
    (g,) = torch.autograd.grad((u * z).sum(), b0)
    torch.testing.assert_close(g, gb_ref.sum(0), rtol=1e-8, atol=1e-10)


def test_least_squares_fit_and_gradient():
    """Exponential fit: at zero residual dp/dy = -(J^T J)^-1 J^T (closed form)."""
    t = torch.linspace(0, 1, 15, dtype=D)
    p_true = torch.tensor([2.0, 0.7], dtype=D)
    y = (p_true[0] * torch.exp(-p_true[1] * t)).requires_grad_(True)
    fit = lambda p, y: p[0] * torch.exp(-p[1] * t) - y  # noqa: E731
    p = dl.least_squares(fit, torch.tensor([1.0, 0.1], dtype=D), y, batched=False)
    torch.testing.assert_close(p, p_true, rtol=1e-9, atol=1e-10)
    u = torch.randn(2, dtype=D)
    (gy,) = torch.autograd.grad((u * p).sum(), y)
    J = torch.stack([torch.exp(-p_true[1] * t), -p_true[0] * t * torch.exp(-p_true[1] * t)], dim=1)
    torch.testing.assert_close(gy, J @ torch.linalg.solve(J.T @ J, u), rtol=1e-8, atol=1e-10)


def test_custom_root_closed_form():
    F = lambda z, c: z**3 - c  # noqa: E731
    cbrt = dl.custom_root(F)(lambda z0, c: c.sign() * c.abs() ** (1.0 / 3.0))
    c = torch.tensor([8.0, -27.0, 2.0], dtype=D, requires_grad=True)
    z = cbrt(torch.ones(3, dtype=D), c)
    (g,) = torch.autograd.grad(z.sum(), c)
    torch.testing.assert_close(g, 1.0 / (3.0 * z.detach() ** 2))


def test_custom_root_warns_on_non_root():
    F = lambda z, c: z**3 - c  # noqa: E731
    wrong = dl.custom_root(F)(lambda z0, c: c)
    c = torch.tensor([8.0], dtype=D, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="not a root"):
        wrong(torch.ones(1, dtype=D), c)
