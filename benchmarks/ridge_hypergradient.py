"""Ridge-regression hypergradient with one penalty per feature.

Inner problem:  w*(lam) = argmin_w 1/(2n) ||X w - y||^2 + 1/2 sum_i lam_i w_i^2
Outer loss:     L(lam)  = 1/(2 n_v) ||X_v w* - y_v||^2
Closed form:    H = X^T X / n + diag(lam),  dL/dlam = -w* * H^-1 X_v^T (X_v w* - y_v) / n_v

X is built so that H has a chosen condition number. Methods compared, all on the same
data and (except the full pipelines) the same exact inner solution:

* difflayers ``dl.argmin`` end to end (Newton-CG forward, implicit CG backward);
* difflayers ``dl.custom_root`` with CG, with CG on the normal equations (the
  JAXopt/TorchOpt default, which squares the condition number), with a Neumann series;
* unrolled gradient descent (100 steps, step 1/L) through ``dl.argmin(adjoint=Unroll())``;
* ``torchopt.diff.implicit.custom_root`` with its default normal-equations CG and with
  CG at the same tolerance as ours (the anchors).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

import difflayers as dl
from difflayers.solvers import CG, KrylovSolver, LinearSolver, MatvecOperator, Neumann, Newton, Picard

from ._harness import Row, environment, format_table, measure


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormalCG(LinearSolver):
    """CG on ``A^T A x = A^T b``: what JAXopt and TorchOpt use by default. Kept here, not
    in the library, because it squares the condition number of a symmetric system."""

    cg: KrylovSolver = CG()

    def solve(self, operator, b, *, x0=None, preconditioner=None):
        At = operator.transpose()
        normal = MatvecOperator(lambda x: At.mv(operator.mv(x)), symmetric=True, positive_definite=True)
        return self.cg.solve(normal, At.mv(b))


def make_problem(n: int, d: int, cond: float, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = 0.5 + 0.1 * torch.rand(d, generator=g, dtype=torch.float64)
    spectrum = torch.logspace(0, torch.log10(torch.tensor(cond - 0.6)).item(), d, dtype=torch.float64) - 0.5
    X = n**0.5 * (U * spectrum.sqrt()) @ V.T
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, d, generator=g, dtype=torch.float64) @ (V * spectrum.sqrt()) @ V.T
    yv = Xv @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / n)
    exact = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv) / n)
    eig = torch.linalg.eigvalsh(H)
    tensors = [t.to(dtype=dtype, device=device) for t in (X, y, Xv, yv, lam)]
    return tensors, exact.to(device), float(eig[-1] / eig[0]), float(eig[-1])


def run(repeats: int = 5, device: str = "cpu", quick: bool = False) -> str:
    device = torch.device(device)
    dtype = torch.float64
    n, d = (400, 100) if quick else (2000, 500)
    tables = [f"Ridge hypergradient, n={n} samples, d={d} features, float64, {device.type}. {environment()}"]
    for cond in (10.0, 1e3):
        (X, y, Xv, yv, lam), exact, kappa, L = make_problem(n, d, cond, dtype, device)

        def inner(w, lam):
            return 0.5 * ((X @ w - y) ** 2).sum() / n + 0.5 * (lam * w**2).sum()

        def optimality(w, lam):
            return X.T @ (X @ w - y) / n + lam * w

        def outer(w):
            return 0.5 * ((Xv @ w - yv) ** 2).sum() / n

        def exact_inner(w0, lam):
            H = X.T @ X / n + torch.diag(lam)
            return torch.linalg.solve(H, X.T @ y / n)

        def hypergrad(solve):
            lam_ = lam.clone().requires_grad_(True)
            return torch.autograd.grad(outer(solve(lam_)), lam_)[0]

        w0 = torch.zeros(d, dtype=dtype, device=device)

        def ours_argmin(lam_):
            return dl.argmin(inner, w0, lam_, batched=False, solver=Newton(linear_solver=CG()))

        def ours_root(linear_solver):
            solve = dl.custom_root(optimality, linear_solver=linear_solver, symmetric=True, batched=False)(exact_inner)
            return lambda lam_: solve(w0, lam_)

        def ours_unroll(lam_):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return dl.argmin(inner, w0, lam_, batched=False, solver=Picard(damping=1.0 / L, max_steps=100),
                                 adjoint=dl.Unroll(), throw=False)

        methods = [
            ("difflayers argmin: Newton-CG + implicit CG", ours_argmin, False),
            ("difflayers custom_root + CG", ours_root(CG(atol=0.0)), False),
            ("difflayers custom_root + normal-equations CG", ours_root(NormalCG(cg=CG(max_steps=2000))), False),
            ("difflayers custom_root + Neumann(50), step 1/L",
             ours_root(Neumann(max_steps=50, step_size=1.0 / L, rtol=0.0, atol=0.0)), False),
            ("difflayers unrolled gradient descent, 100 steps", ours_unroll, False),
        ]
        try:
            import torchopt

            for label, solve in (
                ("torchopt custom_root, default normal CG", torchopt.linear_solve.solve_normal_cg()),
                ("torchopt custom_root, CG rtol=1e-10", torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=10 * d)),
            ):
                decorated = torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)(exact_inner)
                methods.append((label, (lambda dec: lambda lam_: dec(w0, lam_))(decorated), True))
        except ImportError:
            tables.append("(torchopt not installed: anchor rows skipped)")

        rows = []
        for label, solve, is_anchor in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # Neumann/unroll are inexact by design
                g = hypergrad(solve)
                seconds, peak = measure(lambda: hypergrad(solve), device, repeats)
            err = float(((g - exact).norm() / exact.norm()).detach())
            rows.append(Row(label, seconds, peak, err, anchor=is_anchor))
        tables.append(format_table(f"Hessian condition {kappa:.3g}", rows, "closed form"))
    return "\n\n".join(tables)
