"""Predict-then-optimize on a shortest-path LP: two-stage MSE vs SPO+ vs a smoothed LP layer.

Run ``python examples/shortest_path.py`` (``--quick`` for a version under 40 s).

The decision is a shortest path from the top-left to the bottom-right node of a 5 x 5
grid whose 40 edges go right or down, written as the LP

    min_w c'w   s.t.   A w = b (flow conservation),   0 <= w <= 1.

The edge costs are not known when deciding; a linear model predicts them from 5
features. The data follow the synthetic set-up of the decision-focused learning
literature (Elmachtoub and Grigas, "Smart Predict, then Optimize", arXiv:1710.08005;
PyEPO, arXiv:2206.14234): with ``B`` a fixed Bernoulli(0.5) matrix,

    c_e = [ ((B x)_e / sqrt(p) + 3)^deg / 3.5^deg + 1 ] * eps_e,   eps_e ~ U[0.5, 1.5],

so a linear model is well specified at ``deg = 1`` and increasingly misspecified as
``deg`` grows. Three ways to train the same linear model are compared by the
normalized regret of their decisions on held-out data,
``sum_i (c_i'w*(c_hat_i) - c_i'w*(c_i)) / sum_i c_i'w*(c_i)``:

1. two-stage: least-squares fit of the costs (the best a linear model can do in MSE);
2. SPO+: ``dl.conic.spo_plus_loss``, a convex surrogate of the regret (two LP solves
   per step, no solver derivative);
3. smoothed LP layer: ``dl.QPLayer(adjoint=dl.conic.Smoothed(barrier))`` returns the
   central-path point of the LP, a smooth function of the predicted costs, and the
   loss is the true cost of that decision, ``c'w_mu(c_hat)``, differentiated through
   the layer.

SPO+ and the smoothed layer start from the two-stage fit. The summary table gives the
regret of each method for each degree; the plot shows regret against degree.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import difflayers as dl

D = torch.float64
METHODS = ("two-stage MSE", "SPO+", "smoothed LP layer")


def _progress(message: str) -> None:
    print(f"\r  {message:<70}", end="", file=sys.stderr, flush=True)


def grid_shortest_path(k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flow conservation ``A w = b`` on a ``k x k`` grid with edges right and down, unit
    flow from node 0 to node ``k*k - 1``; the last node's row is dropped (the rows of an
    incidence matrix sum to zero, one of them is redundant)."""
    node = lambda i, j: i * k + j  # noqa: E731
    edges = [(node(i, j), node(i, j + 1)) for i in range(k) for j in range(k - 1)]
    edges += [(node(i, j), node(i + 1, j)) for i in range(k - 1) for j in range(k)]
    A = torch.zeros(k * k, len(edges), dtype=D)
    for e, (tail, head) in enumerate(edges):
        A[tail, e], A[head, e] = 1.0, -1.0
    b = torch.zeros(k * k, dtype=D)
    b[0], b[-1] = 1.0, -1.0
    return A[:-1], b[:-1], len(edges)


def make_data(n: int, basis: torch.Tensor, degree: int, noise: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``x ~ N(0, I_p)`` and costs of the polynomial model of degree ``degree``."""
    edges, p = basis.shape
    X = torch.randn(n, p, generator=generator, dtype=D)
    c = (X @ basis.T / p**0.5 + 3.0) ** degree / 3.5**degree + 1.0
    eps = 1.0 - noise + 2.0 * noise * torch.rand(n, edges, generator=generator, dtype=D)
    return X, c * eps


class ShortestPath:
    """The LP of one grid, its exact solutions and the normalized regret."""

    def __init__(self, k: int):
        self.A, self.b, self.edges = grid_shortest_path(k)
        self.bounds = {"lb": torch.zeros(self.edges, dtype=D), "ub": torch.ones(self.edges, dtype=D)}
        self.exact = dl.QPLayer()

    def decide(self, cost: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.exact(None, cost, A=self.A, b=self.b, **self.bounds)

    def regret(self, cost_hat: torch.Tensor, cost: torch.Tensor, best: torch.Tensor) -> float:
        realized = (cost * self.decide(cost_hat)).sum(1)
        return float((realized - best).sum() / best.sum())


def train(method: str, lp: ShortestPath, X: torch.Tensor, c: torch.Tensor, w_true: torch.Tensor,
          epochs: int, batch: int, lr: float, barrier: float, seed: int, label: str) -> torch.nn.Linear:
    """A linear cost model fitted by least squares, then (SPO+, smoothed) refined by Adam
    on the decision loss."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], lp.edges).double()
    ones = torch.ones(X.shape[0], 1, dtype=D)
    coef = torch.linalg.lstsq(torch.cat([X, ones], 1), c).solution       # [p + 1, E]
    with torch.no_grad():
        model.weight.copy_(coef[:-1].T)
        model.bias.copy_(coef[-1])
    if method == "two-stage MSE":
        return model
    smoothed = dl.QPLayer(adjoint=dl.conic.Smoothed(barrier=barrier))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in torch.randperm(X.shape[0]).split(batch):
            c_hat = model(X[idx])
            if method == "SPO+":
                loss = dl.conic.spo_plus_loss(c_hat, c[idx], A=lp.A, b=lp.b, **lp.bounds, w_true=w_true[idx])
            else:
                w = smoothed(None, c_hat, A=lp.A, b=lp.b, **lp.bounds)
                loss = (c[idx] * w).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _progress(f"{label}: {method}, epoch {epoch + 1}/{epochs}, loss {float(loss.detach()):.3f}")
    return model


def run(degrees, n_train: int, n_test: int, epochs: int, batch: int, grid: int = 5, features: int = 5,
        noise: float = 0.5, lr: float = 0.01, barrier: float = 0.1, seed: int = 0) -> dict:
    lp = ShortestPath(grid)
    regret = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    for degree in degrees:
        generator = torch.Generator().manual_seed(seed + 1000 * degree)
        basis = (torch.rand(lp.edges, features, generator=generator) < 0.5).to(D)
        X, c = make_data(n_train, basis, degree, noise, generator)
        X_test, c_test = make_data(n_test, basis, degree, noise, generator)
        w_true = lp.decide(c)
        best = (c_test * lp.decide(c_test)).sum(1)
        for method in METHODS:
            start = time.perf_counter()
            model = train(method, lp, X, c, w_true, epochs, batch, lr, barrier, seed, f"deg {degree}")
            seconds[method] += time.perf_counter() - start
            with torch.no_grad():
                regret[method].append(lp.regret(model(X_test), c_test, best))
    print(file=sys.stderr)
    return {"degrees": list(degrees), "regret": regret, "seconds": seconds,
            "setting": f"{grid}x{grid} grid ({lp.edges} edges), {features} features, "
                       f"noise U[{1 - noise}, {1 + noise}], "
                       f"{n_train} training / {n_test} held-out samples, {epochs} epochs"}


def plot_regret(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in zip(METHODS, "osD"):
        ax.plot(result["degrees"], [100 * r for r in result["regret"][method]], marker=marker, label=method)
    ax.set_xlabel("polynomial degree of the cost model (misspecification)")
    ax.set_ylabel("normalized regret, held-out (%)")
    ax.set_title("Shortest path on a 5x5 grid: linear cost model")
    ax.set_xticks(result["degrees"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(quick: bool = False, plot: str | None = "shortest_path.png", seed: int = 0) -> dict:
    torch.set_num_threads(1)
    if quick:
        sizes = dict(degrees=(1, 6), n_train=200, n_test=200, epochs=4, batch=50)
    else:
        sizes = dict(degrees=(1, 2, 4, 6, 8), n_train=1000, n_test=1000, epochs=10, batch=50)
    print(f"difflayers {dl.__version__}: predict-then-optimize, shortest path "
          f"(torch {torch.__version__}, float64, CPU)")
    start = time.perf_counter()
    result = run(**sizes, seed=seed)
    result["total seconds"] = time.perf_counter() - start
    print(result["setting"])
    print(f"\n{'method':<20}" + "".join(f"{'deg ' + str(d):>9}" for d in result["degrees"]) + f"{'train (s)':>11}")
    print("-" * (31 + 9 * len(result["degrees"])))
    for method in METHODS:
        cells = "".join(f"{100 * r:>8.2f}%" for r in result["regret"][method])
        print(f"{method:<20}{cells}{result['seconds'][method]:>11.1f}")
    print("normalized regret of the decisions on held-out data (lower is better).")
    if plot:
        plot_regret(result, plot)
        print(f"plot written to {plot}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two degrees, fewer samples (under 40 s)")
    parser.add_argument("--plot", default="shortest_path.png", help="PNG file for the plot; '' for none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot or None, seed=args.seed)
