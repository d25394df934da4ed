"""difflayers quickstart: batched solves with checked gradients, end to end on CPU.

Run ``python examples/quickstart.py`` (``--quick`` for a smaller version without the
workflow examples; ``examples/conic_layers.py`` tours the QP/LP/cvxpy layers further).
Each section solves a batch of problems of one layer family, differentiates the
solution and compares the gradient with an independent reference (closed form or
finite differences); then the quick version of one example per workflow runs and
writes its plot under ``build/demo/``.
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import time

import torch

import difflayers as dl
from difflayers.solvers import CG, GMRES, Anderson, DenseOperator, LevenbergMarquardt, Newton
from difflayers.testing import check_grad

D = torch.float64
EXAMPLES = pathlib.Path(__file__).resolve().parent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def linear_solves(B: int, n: int) -> dict:
    """Batched SPD and nonsymmetric systems, matrix-free, against torch.linalg.solve."""
    Q = torch.randn(B, n, n, dtype=D)
    spd = Q @ Q.transpose(1, 2) / n + torch.eye(n, dtype=D)
    gen = torch.eye(n, dtype=D) + 0.5 * torch.randn(B, n, n, dtype=D) / n**0.5
    b = torch.randn(B, n, dtype=D)
    sol_cg = dl.linear_solve(DenseOperator(spd, symmetric=True, positive_definite=True), b, CG())
    sol_gm = dl.linear_solve(lambda x: torch.einsum("bij,bj->bi", gen, x), b, GMRES())
    return {
        "what": f"linear_solve: {B} SPD systems (CG) + {B} nonsymmetric matrix-free (GMRES), n={n}",
        "solution error": max(rel_err(sol_cg.value, torch.linalg.solve(spd, b)),
                              rel_err(sol_gm.value, torch.linalg.solve(gen, b))),
        "gradient error": float("nan"),
        "steps": int(max(sol_cg.stats["num_steps"].max(), sol_gm.stats["num_steps"].max())),
    }


def equilibrium_layer(B: int, n: int) -> dict:
    """A deep-equilibrium layer z = tanh(W z + U x): Anderson forward, implicit backward,
    gradient checked against central finite differences and against unrolling."""
    W = (0.6 * torch.randn(n, n, dtype=D) / n**0.5).requires_grad_(True)
    U = torch.randn(n, n, dtype=D).requires_grad_(True)
    x = torch.randn(B, n, dtype=D)

    def T(z, W, U):
        return torch.tanh(z @ W.T + x @ U.T)

    def layer(W, U, adjoint=dl.Implicit()):
        return dl.fixed_point(T, torch.zeros(B, n, dtype=D), W, U, solver=Anderson(), adjoint=adjoint)

    z = layer(W, U)
    g_impl = torch.autograd.grad(z.square().sum(), W)[0]
    g_unroll = torch.autograd.grad(layer(W, U, dl.Unroll()).square().sum(), W)[0]
    fd = check_grad(lambda W, U: layer(W, U).square().sum(), (W, U), raise_exception=False)
    return {
        "what": f"fixed_point: equilibrium layer z = tanh(Wz + Ux), batch {B}, width {n}",
        "solution error": float(((z - T(z, W, U)).norm() / z.norm()).detach()),
        "gradient error": max(fd.max_error, rel_err(g_impl, g_unroll)),
        "steps": None,
    }


def ridge_hyperparameters(n: int, d: int, outer_steps: int) -> dict:
    """Learn one ridge penalty per feature by gradient descent on validation loss;
    every hypergradient comes from dl.argmin's implicit backward (Hessian CG)."""
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(d, generator=g, dtype=D) * (torch.rand(d, generator=g, dtype=D) > 0.5)
    X, Xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, d, generator=g, dtype=D)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D)
    yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D)
    log_lam = torch.zeros(d, dtype=D, requires_grad=True)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() / n + 0.5 * (lam * w**2).sum()

    def val_loss(log_lam):
        w = dl.argmin(inner, torch.zeros(d, dtype=D), log_lam.exp(), batched=False,
                      solver=Newton(linear_solver=CG()))
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    # hypergradient vs closed form dL/dlam = -w * H^-1 dL/dw
    lam = log_lam.detach().exp()
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / n)
    closed = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv) / n) * lam
    hyper = torch.autograd.grad(val_loss(log_lam), log_lam)[0]
    first = float(val_loss(log_lam).detach())
    opt = torch.optim.Adam([log_lam], lr=0.2)
    for _ in range(outer_steps):
        opt.zero_grad()
        val_loss(log_lam).backward()
        opt.step()
    last = float(val_loss(log_lam).detach())
    return {
        "what": f"argmin: ridge with {d} learned penalties, validation loss {first:.4f} -> {last:.4f}",
        "solution error": float("nan"),
        "gradient error": rel_err(hyper, closed),
        "steps": outer_steps,
    }


def curve_fits(B: int) -> dict:
    """Batched exponential fits by Levenberg-Marquardt; d(params)/d(data) through the
    exact Hessian, checked by finite differences."""
    t = torch.linspace(0, 2, 25, dtype=D)
    p_true = torch.stack([1 + torch.rand(B, dtype=D), 0.2 + torch.rand(B, dtype=D)], dim=1)
    y = p_true[:, :1] * torch.exp(-p_true[:, 1:] * t) + 0.01 * torch.randn(B, t.numel(), dtype=D)
    y.requires_grad_(True)

    def resid(p, y):
        return p[:, :1] * torch.exp(-p[:, 1:] * t) - y

    def fit(y):
        return dl.least_squares(resid, torch.ones(B, 2, dtype=D), y, solver=LevenbergMarquardt())

    p = fit(y)
    # noisy data: the fit is checked by stationarity of the cost, ||J^T r|| / ||J^T r(p0)||
    cost_grad = torch.func.grad(lambda p: 0.5 * resid(p, y.detach()).square().sum())
    stationarity = float(cost_grad(p.detach()).norm() / cost_grad(torch.ones(B, 2, dtype=D)).norm())
    fd = check_grad(lambda y: fit(y).square().sum(), (y,), raise_exception=False)
    return {
        "what": f"least_squares: {B} noisy exponential fits (Levenberg-Marquardt), "
                f"parameters within {rel_err(p, p_true):.1e} of the truth",
        "solution error": stationarity,
        "gradient error": fd.max_error,
        "steps": None,
    }


def qp_layer(B: int, n: int) -> dict:
    """A batch of QPs min 1/2 x'Px + q'x s.t. Gx <= h, Ax = b as a layer: interior point
    forward, exact KKT backward reusing its factorization, checked by finite differences."""
    m, p = n // 2, 2
    L = torch.randn(B, n, n, dtype=D)
    P = L @ L.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=D)
    q = torch.randn(B, n, dtype=D, requires_grad=True)
    G = torch.randn(m, n, dtype=D, requires_grad=True)        # shared: its gradient is summed
    h, A, b = torch.rand(m, dtype=D) + 0.1, torch.randn(p, n, dtype=D), torch.zeros(p, dtype=D)
    layer = dl.QPLayer()
    x, lam, nu = layer(P, q, G, h, A, b, return_duals=True)
    with torch.no_grad():  # KKT residual: stationarity, feasibility, complementarity
        stationarity = torch.einsum("bij,bj->bi", P, x) + q + lam @ G + nu @ A
        slack = h - x @ G.T
        kkt = max(float(stationarity.norm() / q.norm()), float((x @ A.T - b).abs().max()),
                  float(slack.clamp_max(0).abs().max()), float((lam * slack).abs().max()))
    # a small step: x* is piecewise smooth, and the default step (~1e-4 here) can cross
    # a change of active set; the refined solution is exact to rounding, so 1e-5 is safe
    fd = check_grad(lambda q, G: layer(P, q, G, h, A, b).square().sum(), (q, G), eps=1e-5, raise_exception=False)
    return {
        "what": f"QPLayer: {B} QPs, {n} variables, {m} inequalities ({int((lam > 1e-8).sum())} active), "
                f"{p} equalities",
        "solution error": kkt,
        "gradient error": fd.max_error,
        "steps": None,
    }


def optimal_transport(B: int, n: int) -> dict:
    """Entropic OT between point clouds: the plan as a layer (implicit gradients through
    the potentials), checked by finite differences; the Sinkhorn divergence as a loss."""
    x = torch.rand(B, n, 2, dtype=D, requires_grad=True)
    y = torch.rand(B, n + 3, 2, dtype=D)
    solver = dl.ot.Sinkhorn(rtol=1e-12, atol=0.0, max_steps=10000)
    weights = torch.randn(B, n, n + 3, dtype=D)

    def plan_loss(x):
        res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.1, solver=solver, adjoint=dl.Implicit())
        return (res.plan * weights).sum()

    res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.1, solver=solver)
    with torch.no_grad():
        P = res.plan
        marginal = float((P.sum(2) - 1.0 / n).abs().sum(1).max() + (P.sum(1) - 1.0 / (n + 3)).abs().sum(1).max())
    fd = check_grad(plan_loss, (x,), raise_exception=False)
    divergence = dl.ot.SinkhornDivergence(epsilon=0.1)(x, y).sum()
    divergence.backward()
    return {
        "what": f"ot.sinkhorn: {B} transport plans between {n} and {n + 3} points (implicit plan gradient), "
                f"Sinkhorn divergence {float(divergence.detach()):.4f}",
        "solution error": marginal,
        "gradient error": fd.max_error,
        "steps": int(res.stats["num_steps"].max()),
    }


def hypergradients(n: int, d: int) -> dict:
    """dl.bilevel: one hypergradient of a validation loss with respect to per-feature
    ridge penalties (implicit CG), against the closed form."""
    g = torch.Generator().manual_seed(2)
    X, Xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, d, generator=g, dtype=D)
    w_true = torch.randn(d, generator=g, dtype=D)
    y, yv = X @ w_true + torch.randn(n, generator=g, dtype=D), Xv @ w_true
    lam = torch.full((d,), 0.1, dtype=D)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    grad, info = dl.bilevel.hypergradient(outer, inner, torch.zeros(d, dtype=D), lam)
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / n)
    exact = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv) / n)
    return {
        "what": f"bilevel.hypergradient: {d} ridge penalties, ImplicitCG "
                f"(inner residual {float(info.inner_residual.max()):.1e})",
        "solution error": float("nan"),
        "gradient error": rel_err(grad, exact),
        "steps": None,
    }


def pde_layer(B: int, n: int) -> dict:
    """A batch of nonlinear diffusion problems -div((1 + u^2) grad u) = f as a layer:
    Newton-GMRES forward (multigrid preconditioner), one adjoint solve backward
    (non-symmetric Jacobian), checked against central finite differences."""
    from difflayers import pde

    grid = pde.Grid((n, n))
    X, Y = grid.centers()
    bc = pde.Dirichlet()
    layer = pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, bc) - f, grid=grid,
                         preconditioner=lambda u, f: pde.Multigrid(grid, 1.0 + u**2, bc))
    shape = 10.0 * torch.sin(torch.pi * X) * torch.sin(torch.pi * Y)
    amplitude = (1 + torch.rand(B, 1, 1, dtype=D)).requires_grad_(True)   # f = amplitude * shape
    sol = layer(amplitude * shape, return_solution=True)
    with torch.no_grad():
        u, f = sol.value, amplitude * shape
        residual = float((pde.diffusion(u, 1.0 + u**2, grid, bc) - f).norm() / f.norm())
    fd = check_grad(lambda s: layer(s * shape).square().sum(), (amplitude,), directions=2, raise_exception=False)
    return {
        "what": f"pde.PDELayer: {B} nonlinear diffusion problems on a {n}x{n} grid (Newton-GMRES + multigrid, adjoint)",
        "solution error": residual,
        "gradient error": fd.max_error,
        "steps": None,
    }


WORKFLOWS = [
    ("solver layers in networks: deep-equilibrium layer on digits", "deq_digits.py"),
    ("bilevel hyperparameter learning: hyper-cleaning of corrupted digit labels", "hyper_cleaning.py"),
    ("predict-then-optimize: shortest paths, two-stage vs SPO+ vs smoothed LP", "shortest_path.py"),
]


def workflow_examples(out_dir: pathlib.Path) -> list[str]:
    """The quick version of one example per workflow; returns the plots written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for title, script in WORKFLOWS:
        print(f"\n=== {title} (examples/{script} --quick) ===")
        plot = out_dir / script.replace(".py", ".png")
        runpy.run_path(str(EXAMPLES / script))["main"](quick=True, plot=str(plot))
        plots.append(str(plot))
    return plots


def main(quick: bool = False, examples: bool | None = None) -> list[dict]:
    torch.manual_seed(0)
    sizes = dict(B=4, n=32, d=20, N=200, outer=5) if quick else dict(B=32, n=128, d=100, N=1000, outer=30)
    sections = [
        lambda: linear_solves(sizes["B"], sizes["n"]),
        lambda: equilibrium_layer(sizes["B"], sizes["n"] // 2),
        lambda: ridge_hyperparameters(sizes["N"], sizes["d"], sizes["outer"]),
        lambda: curve_fits(sizes["B"]),
        lambda: qp_layer(sizes["B"], sizes["n"] // 2),
        lambda: optimal_transport(2 if quick else 8, 12 if quick else 40),
        lambda: hypergradients(sizes["N"], sizes["d"]),
        lambda: pde_layer(2 if quick else 4, 8 if quick else 24),
    ]
    rows = []
    print(f"difflayers {dl.__version__} quickstart (torch {torch.__version__}, float64, CPU)\n")
    for section in sections:
        start = time.perf_counter()
        row = section()
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(row["what"])
        parts = [f"  solution rel. error {row['solution error']:.1e}" if row["solution error"] == row["solution error"]
                 else "  solution checked by the gradient test",
                 f"gradient rel. error {row['gradient error']:.1e}" if row["gradient error"] == row["gradient error"]
                 else "no gradient in this section",
                 f"{row['seconds']:.2f} s"]
        print(", ".join(parts))
    print("\nGradient references: closed forms, central finite differences (difflayers.testing.check_grad) and unrolling.")
    if examples if examples is not None else not quick:
        plots = workflow_examples(pathlib.Path("build") / "demo")
        print("\nplots written to:\n  " + "\n  ".join(plots))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    main(quick=parser.parse_args().quick)
