"""difflayers conic layers: batched QPs and LPs as differentiable layers, on CPU.

Run ``python examples/conic_layers.py`` (``--quick`` for a version under 30 s).

1. A batch of QPs through ``dl.QPLayer``; the gradient is checked against central
   finite differences.
2. The same problems written in cvxpy and solved by ``dl.ConicLayer``, compared with
   ``QPLayer`` and, where it is installed, with cvxpylayers.
3. Predict-then-optimize: a linear model maps features to the edge costs of a
   shortest-path LP on a grid. It is trained with the SPO+ loss
   (``dl.conic.spo_plus_loss``) and, as the two-stage baseline, with the mean squared
   error of the costs; both are scored by the normalized regret of their decisions on
   held-out data. The training curves go to a PNG when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import difflayers as dl
from difflayers.testing import check_grad

D = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def qp_data(B: int, n: int, m: int, p: int, generator: torch.Generator) -> dict:
    """``B`` strictly convex QPs ``min 1/2 x'(F'F + 0.1 I)x + q'x`` with shared
    ``G x <= h``, ``A x = b`` and ``-1 <= x <= 1``; ``F`` and ``q`` vary per element."""
    k = n // 2
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=D)  # noqa: E731
    return {
        "F": randn(B, k, n) / k**0.5,
        "q": randn(B, n),
        "G": randn(m, n),
        "h": 0.1 + torch.rand(m, generator=generator, dtype=D),
        "A": randn(p, n),
        "b": 0.1 * randn(p),
    }


def qp_solve(F, q, G, h, A, b, **options):
    """``x*`` of the QPs (``F`` enters through ``P = F'F + 0.1 I``, by plain autograd)."""
    n = q.shape[-1]
    P = F.transpose(-1, -2) @ F + 0.1 * torch.eye(n, dtype=D)
    box = torch.ones(n, dtype=D)
    return dl.QPLayer()(P, q, G, h, A, b, lb=-box, ub=box, **options)


def qp_layer(data: dict) -> dict:
    """Section 1: solve and differentiate a batch of QPs, check the gradient."""
    F, q, G, h = (data[k].clone().requires_grad_(True) for k in ("F", "q", "G", "h"))
    A, b = data["A"], data["b"]
    start = time.perf_counter()
    x, lam, nu, sol = qp_solve(F, q, G, h, A, b, return_duals=True, return_solution=True)
    x.square().sum().backward()          # dL/dF, dL/dq, dL/dG, dL/dh by the KKT adjoint
    seconds = time.perf_counter() - start
    fd = check_grad(lambda F, q, G, h: qp_solve(F, q, G, h, A, b).square().sum(), (F, q, G, h),
                    raise_exception=False)
    B, n = q.shape
    return {
        "name": "1. QPLayer",
        "what": f"QPLayer: {B} QPs, n={n}, {G.shape[0]} inequalities, {A.shape[0]} equalities, box bounds",
        "detail": f"{int((lam > 1e-8).sum())} active inequalities in the batch, "
                  f"{int(sol.stats['num_steps'].max())} interior-point steps at most",
        "metric": "gradient rel. error vs central differences",
        "value": fd.max_error,
        "seconds": seconds,
    }


def cvxpy_layer(data: dict) -> list[dict]:
    """Section 2: the same problems written in cvxpy (``dl.ConicLayer``), compared with
    ``QPLayer`` and with cvxpylayers when it is importable."""
    import cvxpy as cp

    B, k, n = data["F"].shape
    m = data["G"].shape[0]
    x = cp.Variable(n)
    F_p, q_p, G_p, h_p = cp.Parameter((k, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    objective = 0.5 * cp.sum_squares(F_p @ x) + 0.05 * cp.sum_squares(x) + q_p @ x
    constraints = [G_p @ x <= h_p, data["A"].numpy() @ x == data["b"].numpy(), x >= -1, x <= 1]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    params = [F_p, q_p, G_p, h_p]
    inputs = [data[k].clone().requires_grad_(True) for k in ("F", "q", "G", "h")]
    weights = torch.randn(B, n, generator=torch.Generator().manual_seed(3), dtype=D)

    def value_and_grads(layer):
        start = time.perf_counter()
        (x_t,) = layer(*inputs)
        grads = torch.autograd.grad((weights * x_t).sum(), inputs)
        return x_t.detach(), torch.cat([g.flatten() for g in grads]), time.perf_counter() - start

    x_qp = qp_solve(*inputs, data["A"], data["b"])
    g_qp = torch.cat([g.flatten() for g in torch.autograd.grad((weights * x_qp).sum(), inputs)])
    x_qp = x_qp.detach()
    layer = dl.ConicLayer(problem, parameters=params, variables=[x])
    value_and_grads(layer)               # first call: warm the caches before timing
    x_cl, g_cl, seconds = value_and_grads(layer)
    rows = [{
        "name": "2. ConicLayer (cvxpy)",
        "what": f"ConicLayer: the same {B} QPs from cvxpy ({layer.extra_repr()})",
        "detail": f"solution differs from QPLayer's by {rel_err(x_cl, x_qp):.1e} (relative)",
        "metric": "gradient rel. difference vs QPLayer",
        "value": rel_err(g_cl, g_qp),
        "seconds": seconds,
    }]
    try:
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        print("  cvxpylayers is not installed: comparison skipped")
        return rows
    reference = CvxpyLayer(problem, parameters=params, variables=[x])
    with warnings.catch_warnings():  # cvxpylayers' own solver warnings are not ours to report
        warnings.simplefilter("ignore")
        value_and_grads(reference)
        x_ref, g_ref, seconds = value_and_grads(reference)
    rows.append({
        "name": "2. cvxpylayers",
        "what": "cvxpylayers CvxpyLayer (its default solver and settings), same problems",
        "detail": f"solution differs from ConicLayer's by {rel_err(x_ref, x_cl):.1e} (relative)",
        "metric": "gradient rel. difference vs ConicLayer",
        "value": rel_err(g_ref, g_cl),
        "seconds": seconds,
    })
    return rows


def grid_shortest_path(k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shortest path from the top-left to the bottom-right node of a ``k x k`` grid with
    edges going right or down, as the LP ``min c'w  s.t.  A w = b, 0 <= w <= 1``.

    ``A`` is the node-arc incidence matrix without its last row (the rows of an
    incidence matrix sum to zero: one is redundant). Its vertices are the paths.
    """
    node = lambda i, j: i * k + j  # noqa: E731
    edges = [(node(i, j), node(i, j + 1)) for i in range(k) for j in range(k - 1)]
    edges += [(node(i, j), node(i + 1, j)) for i in range(k - 1) for j in range(k)]
    A = torch.zeros(k * k, len(edges), dtype=D)
    for e, (tail, head) in enumerate(edges):
        A[tail, e], A[head, e] = 1.0, -1.0
    b = torch.zeros(k * k, dtype=D)
    b[0], b[-1] = 1.0, -1.0
    return A[:-1], b[:-1], len(edges)


def cost_data(N: int, features: int, edges: int, degree: int, noise: float, generator: torch.Generator,
              basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``x ~ N(0, I)`` and costs ``c = ((basis x / sqrt(p) + 3)^degree / 3.5^degree + 1) * eps``
    with multiplicative noise ``eps ~ U[1 - noise, 1 + noise]`` (the synthetic shortest-path
    data of Elmachtoub and Grigas, arXiv:1710.08005): a linear model is misspecified for
    ``degree > 1``, which is where training on the decision (SPO+) pays off."""
    X = torch.randn(N, features, generator=generator, dtype=D)
    c = (X @ basis.T / features**0.5 + 3.0) ** degree / 3.5**degree + 1.0
    return X, c * (1.0 - noise + 2.0 * noise * torch.rand(N, edges, generator=generator, dtype=D))


def predict_then_optimize(grid: int, n_train: int, n_test: int, epochs: int, degree: int,
                          batch: int = 32, features: int = 5, lr: float = 0.02) -> tuple[list[dict], dict]:
    """Section 3: SPO+ against two-stage MSE on a shortest-path LP."""
    generator = torch.Generator().manual_seed(7)
    A, b, E = grid_shortest_path(grid)
    bounds = {"lb": torch.zeros(E, dtype=D), "ub": torch.ones(E, dtype=D)}
    basis = (torch.rand(E, features, generator=generator) < 0.5).to(D)
    X_train, c_train = cost_data(n_train, features, E, degree, 0.5, generator, basis)
    X_test, c_test = cost_data(n_test, features, E, degree, 0.5, generator, basis)
    lp = dl.QPLayer()

    def decide(cost):                    # w*(cost): an optimal path per row
        with torch.no_grad():
            return lp(None, cost, A=A, b=b, **bounds)

    w_train = decide(c_train)            # SPO+ reuses the optimal decisions of the data
    best = (c_test * decide(c_test)).sum(1)

    def regret(cost_hat):                # normalized regret of the decisions on held-out data
        return float(((c_test * decide(cost_hat)).sum(1) - best).sum() / best.sum())

    curves, seconds = {}, {}
    for name in ("SPO+", "two-stage MSE"):
        torch.manual_seed(0)             # the same initial model and batches for both
        model = torch.nn.Linear(features, E).double()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        with torch.no_grad():
            curves[name] = [regret(model(X_test))]
        seconds[name] = 0.0              # training time, without the held-out evaluations
        for _ in range(epochs):
            start = time.perf_counter()
            for idx in torch.randperm(n_train).split(batch):
                c_hat = model(X_train[idx])
                if name == "SPO+":
                    loss = dl.conic.spo_plus_loss(c_hat, c_train[idx], A=A, b=b, **bounds, w_true=w_train[idx])
                else:
                    loss = (c_hat - c_train[idx]).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            seconds[name] += time.perf_counter() - start
            with torch.no_grad():
                curves[name].append(regret(model(X_test)))
    random_cost = torch.rand(n_test, E, generator=torch.Generator().manual_seed(11), dtype=D)
    curves["random costs"] = [regret(random_cost)] * (epochs + 1)
    what = f"{grid}x{grid} grid shortest path ({E} edges), degree {degree}, {n_train} training samples"
    rows = [{
        "name": f"3. {name}",
        "what": f"{name}: {what}",
        "detail": f"regret {curves[name][0]:.3f} -> {curves[name][-1]:.3f} after {epochs} epochs",
        "metric": "normalized regret, held-out",
        "value": curves[name][-1],
        "seconds": seconds[name],
    } for name in ("SPO+", "two-stage MSE")]
    rows.append({"name": "3. random costs", "what": "random costs (uniform), same held-out data", "detail": "",
                 "metric": "normalized regret, held-out", "value": curves["random costs"][0], "seconds": 0.0})
    return rows, curves


def plot_curves(curves: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"\nmatplotlib is not installed: no plot written (pip install matplotlib for {path}).")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(len(curve)), curve, label=name, linestyle="--" if name == "random costs" else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("normalized regret (held-out)")
    ax.set_title("Predict-then-optimize: shortest path")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\ntraining curves written to {path}")


def main(quick: bool = False, plot: str | None = "conic_layers_training.png") -> dict:
    torch.manual_seed(0)
    if quick:
        qp_sizes, pto = dict(B=8, n=10, m=6, p=2), dict(grid=4, n_train=200, n_test=100, epochs=6, degree=8)
    else:
        qp_sizes, pto = dict(B=64, n=30, m=15, p=5), dict(grid=5, n_train=500, n_test=500, epochs=10, degree=8)
    print(f"difflayers {dl.__version__} conic layers (torch {torch.__version__}, float64, CPU)\n")
    data = qp_data(**qp_sizes, generator=torch.Generator().manual_seed(0))
    rows = []
    for section in (lambda: [qp_layer(data)], lambda: cvxpy_layer(data)):
        for row in section():
            rows.append(row)
            print(f"{row['what']}\n  {row['detail']}; {row['metric']} {row['value']:.1e}, {row['seconds']:.2f} s")
    pto_rows, curves = predict_then_optimize(**pto)
    for row in pto_rows:
        rows.append(row)
        print(f"{row['what']}\n  {row['detail']}" if row["detail"] else row["what"])
    if plot:
        plot_curves(curves, plot)

    print(f"\n{'section':<22} {'measure':<44} {'value':>9} {'time (s)':>9}")
    print("-" * 87)
    for r in rows:
        print(f"{r['name']:<22} {r['metric']:<44} {r['value']:>9.2e} {r['seconds']:>9.2f}")
    print("time: one forward + backward of the batch (1, 2); training, without the held-out evaluations (3).")
    return {"rows": rows, "curves": curves}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 30 s)")
    parser.add_argument("--plot", default="conic_layers_training.png",
                        help="PNG file for the training curves (needs matplotlib); '' for none")
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot or None)
