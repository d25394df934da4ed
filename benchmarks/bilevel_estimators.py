"""Every ``dl.bilevel`` estimator on per-feature ridge, against TorchOpt and unrolling.

Inner problem:  w*(lam) = argmin_w 1/(2n) ||X w - y||^2 + 1/2 sum_i lam_i w_i^2
Outer loss:     F(lam)  = 1/(2 n_v) ||X_v w* - y_v||^2
Closed form:    dF/dlam = -w* * H^-1 X_v^T (X_v w* - y_v) / n_v,   H = X^T X / n + diag(lam)

Data from ``ridge_hypergradient.make_problem`` (the Hessian's condition number is
chosen). All estimators that work at a solved inner problem start from the exact
solution (``inner_solver=AsGiven()``, as TorchOpt's ``custom_root`` is given an exact
solver), so the times compare the hypergradient computations themselves; one row also
times the full pipeline (Newton-CG inner solve from zero + CG). Unrolled estimators run
100 gradient-descent steps (step 1/L) from zero. Anchors, same process and data:
``torchopt.diff.implicit.custom_root`` with its default normal-equations CG and with CG at
rtol 1e-10, and plain PyTorch reverse-mode unrolling of the same 100 steps.
"""

from __future__ import annotations

import warnings

import torch

from difflayers import bilevel as bl

from ._harness import Row, environment, format_table, measure
from .ridge_hypergradient import make_problem


def run(repeats: int = 5, device: str = "cpu", quick: bool = False) -> str:
    device = torch.device(device)
    dtype = torch.float64
    n, d = (200, 50) if quick else (2000, 500)
    steps = 100
    conditions = (10.0, 1e3) if quick else (10.0, 1e2, 1e3)
    tables = [
        f"Bilevel estimators on per-feature ridge, n={n} samples, d={d} hyperparameters, float64, "
        f"{device.type}. {environment()}"
    ]
    for cond in conditions:
        (X, y, Xv, yv, lam), exact, kappa, L = make_problem(n, d, cond, dtype, device)

        def inner(w, lam):
            return 0.5 * ((X @ w - y) ** 2).sum() / n + 0.5 * (lam * w**2).sum()

        def outer(w, lam):
            return 0.5 * ((Xv @ w - yv) ** 2).sum() / n

        H = X.T @ X / n + torch.diag(lam)
        w_star = torch.linalg.solve(H, X.T @ y / n)
        w0 = torch.zeros(d, dtype=dtype, device=device)
        given = bl.AsGiven()
        gd = bl.SGD(lr=1.0 / L)

        def ours(estimator, start):
            return lambda: bl.hypergradient(outer, inner, start, lam, estimator=estimator)[0]

        methods = [
            ("ImplicitCG, full pipeline (Newton-CG inner from 0)", ours(bl.ImplicitCG(), w0), False),
            ("ImplicitCG", ours(bl.ImplicitCG(inner_solver=given), w_star), False),
            ("ImplicitMINRES", ours(bl.ImplicitMINRES(inner_solver=given), w_star), False),
            ("ImplicitGMRES(restart=50)", ours(bl.ImplicitGMRES(inner_solver=given, restart=50), w_star), False),
            ("ImplicitDense (Cholesky)", ours(bl.ImplicitDense(inner_solver=given), w_star), False),
            ("ImplicitNeumann(50)", ours(bl.ImplicitNeumann(inner_solver=given, steps=50), w_star), False),
            ("OneStep(1/L)", ours(bl.OneStep(inner_solver=given, step_size=1.0 / L), w_star), False),
            ("FiniteDifference(1/L)", ours(bl.FiniteDifference(inner_solver=given, step_size=1.0 / L), w_star), False),
            ("Penalty(1e3, extrapolated; Newton-CG penalized solves)", ours(bl.Penalty(inner_solver=given), w_star),
             False),
            (f"Unrolled(T={steps})", ours(bl.Unrolled(optimizer=gd, steps=steps), w0), False),
            (f"CheckpointedUnrolled(T={steps})", ours(bl.CheckpointedUnrolled(optimizer=gd, steps=steps), w0), False),
            (f"TruncatedUnrolled(T={steps}, K=20)",
             ours(bl.TruncatedUnrolled(optimizer=gd, steps=steps, last=20), w0), False),
        ]

        def unrolled_baseline():
            lam_ = lam.clone().requires_grad_(True)
            w = w0.clone()
            for _ in range(steps):
                w = w - (X.T @ (X @ w - y) / n + lam_ * w) / L
            return torch.autograd.grad(outer(w, lam_), lam_)[0]

        methods.append((f"plain PyTorch unrolled GD (T={steps})", unrolled_baseline, True))
        try:
            import torchopt

            def optimality(w, lam):
                return X.T @ (X @ w - y) / n + lam * w

            def exact_inner(w0_, lam_):
                return torch.linalg.solve(X.T @ X / n + torch.diag(lam_), X.T @ y / n)

            for label, solve in (
                ("torchopt custom_root, default normal CG", torchopt.linear_solve.solve_normal_cg()),
                ("torchopt custom_root, CG rtol=1e-10", torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=10 * d)),
            ):
                decorated = torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)(exact_inner)

                def anchor(decorated=decorated):
                    lam_ = lam.clone().requires_grad_(True)
                    return torch.autograd.grad(outer(decorated(w0, lam_), lam_), lam_)[0]

                methods.append((label, anchor, True))
        except ImportError:
            tables.append("(torchopt not installed: its anchor rows are skipped)")

        rows = []
        for label, fn, is_anchor in methods:
            with warnings.catch_warnings():
                # Neumann, one-step, unrolled: inexact by design; their error column says how much
                warnings.simplefilter("ignore", RuntimeWarning)
                g = fn()
                seconds, peak = measure(fn, device, repeats)
            err = float(((g - exact).norm() / exact.norm()).detach())
            rows.append(Row(label, seconds, peak, err, anchor=is_anchor))
        tables.append(format_table(f"Hessian condition {kappa:.3g}", rows, "closed form"))
    return "\n\n".join(tables)
