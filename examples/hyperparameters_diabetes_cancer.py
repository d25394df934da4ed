"""Per-feature regularization learned by hypergradient on two real data sets.

Both data sets ship with scikit-learn (no download):

* diabetes (442 patients, 10 features, a continuous target): ridge regression with one
  penalty per feature,

      w*(lam) = argmin_w 1/(2n) ||X w + b - y||^2 + 1/2 sum_i exp(lam_i) w_i^2;

* breast cancer (569 tumours, 30 features, benign / malignant): L2-regularized logistic
  regression with one penalty per feature,

      w*(lam) = argmin_w 1/n sum_j log(1 + exp(-s_j (x_j' w + b))) + 1/2 sum_i exp(lam_i) w_i^2.

The outer objective is the loss of ``w*(lam)`` on a validation split; the log-penalties
``lam`` are learned with Adam on the implicit hypergradient (Newton-CG inner solve, CG
adjoint solve) through ``dl.bilevel.learn_hyperparameters``, whose history logs the inner
residual ``||grad_w g||`` and the linear-solve residual of every outer step.

Baselines at equal compute: each outer step costs one inner solve, so with ``S`` outer
steps a grid search over one shared penalty (a regularization path from large to small
penalties) and a random search over per-feature penalties each get ``S`` inner solves,
warm-started from the previous solution like the outer steps. Every method
picks its penalties on the validation split; test errors come from a held-out split.
A small validation split can be overfitted by many hyperparameters: the test column
says how much of the validation gain carries over.

    python examples/hyperparameters_diabetes_cancer.py [--quick] [--plot PATH]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time

import torch
import torch.nn.functional as F

import difflayers as dl

D = torch.float64
SEED = 0
LOW, HIGH = 1e-3, 1e2  # the penalty range of the searches
# One inner solver for every method: Newton with CG directions to 1e-4 relative accuracy
# (inexact Newton), run to a gradient norm of 1e-9 relative.
INNER_SOLVER = dl.solvers.Newton(rtol=1e-9, atol=0.0, linear_solver=dl.solvers.CG(rtol=1e-4, atol=0.0))


# ----------------------------------------------------------------------------- data
def load(name: str, seed: int = SEED) -> dict:
    """Standardized train / validation / test splits (40 / 30 / 30 %) as float64 tensors."""
    from sklearn import datasets

    if name == "diabetes":
        X, y = datasets.load_diabetes(return_X_y=True)
    else:
        X, y = datasets.load_breast_cancer(return_X_y=True)
    X, y = torch.as_tensor(X, dtype=D), torch.as_tensor(y, dtype=D)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.4 * len(y)), int(0.3 * len(y))
    parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    mean, std = X[parts[0]].mean(0), X[parts[0]].std(0)
    X = (X - mean) / std
    if name == "diabetes":  # centre and scale the target on the training split
        y = (y - y[parts[0]].mean()) / y[parts[0]].std()
    else:  # labels in {-1, +1}
        y = 2.0 * y - 1.0
    return {split: (X[idx], y[idx]) for split, idx in zip(("train", "val", "test"), parts)}


# ---------------------------------------------------------------------- the two models
def make_problem(name: str, data: dict):
    """``inner(w, lam)``, ``outer(w, lam)``, ``test_error(w)`` and ``test_loss(w)``.

    ``w`` holds the weights followed by the (unpenalized) intercept; ``lam`` the
    log-penalties, one per feature.
    """
    X, y = data["train"]
    Xv, yv = data["val"]
    Xt, yt = data["test"]

    def predict(w, X):  # w [..., d+1] -> [..., n]
        return w[..., :-1] @ X.T + w[..., -1:]

    if name == "diabetes":
        def loss(w, X, y):
            return 0.5 * ((predict(w, X) - y) ** 2).mean(-1)

        def test_error(w):  # mean squared error on the test split, in units of var(y_train)
            return float(((predict(w, Xt) - yt) ** 2).mean())
    else:
        def loss(w, X, y):
            return F.softplus(-y * predict(w, X)).mean(-1)

        def test_error(w):  # misclassification rate on the test split
            return float((torch.sign(predict(w, Xt)) != yt).to(D).mean())

    def inner(w, lam):
        return loss(w, X, y) + 0.5 * (lam.exp() * w[..., :-1] ** 2).sum(-1)

    def outer(w, lam):
        return loss(w, Xv, yv)

    def test_loss(w):
        return float(loss(w, Xt, yt))

    return inner, outer, test_error, test_loss


def solve_sequence(inner, lam: torch.Tensor) -> torch.Tensor:
    """Inner solutions for penalty vectors ``lam [K, d]``, one ``dl.argmin`` each, every
    solve warm-started from the previous solution (as the hypergradient steps are)."""
    w = torch.zeros(lam.shape[1] + 1, dtype=D)
    solutions = []
    with torch.no_grad():
        for lam_k in lam:
            w = dl.argmin(inner, w, lam_k, solver=INNER_SOLVER, batched=False)
            solutions.append(w)
    return torch.stack(solutions)


# --------------------------------------------------------------------------- methods
def hypergradient_method(name: str, data: dict, steps: int, lr: float, log: io.TextIOBase | None) -> dict:
    inner, outer, test_error, test_loss = make_problem(name, data)
    d = data["train"][0].shape[1]
    lam = torch.full((d,), math.log(1e-2), dtype=D, requires_grad=True)
    w0 = torch.zeros(d + 1, dtype=D)
    start = time.perf_counter()
    w, history = dl.bilevel.learn_hyperparameters(
        outer, inner, w0, lam, torch.optim.Adam([lam], lr=lr), steps=steps,
        estimator=dl.bilevel.ImplicitCG(inner_solver=INNER_SOLVER), progress=log is not None, stream=log,
    )
    seconds = time.perf_counter() - start
    w = solve_sequence(inner, lam.detach()[None])[0]  # the solution at the final penalties
    return {
        "method": "hypergradient (ImplicitCG)", "inner solves": steps, "seconds": seconds,
        "validation": float(outer(w, lam)), "test error": test_error(w), "test loss": test_loss(w),
        "history": history, "penalties": lam.detach().exp(),
    }


def search_method(name: str, data: dict, budget: int, kind: str, seed: int = SEED) -> dict:
    """Grid search over one shared penalty or random search over per-feature penalties."""
    inner, outer, test_error, test_loss = make_problem(name, data)
    d = data["train"][0].shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "grid":
        # a regularization path, from the largest penalty down
        lam = torch.linspace(math.log(HIGH), math.log(LOW), budget, dtype=D)[:, None].expand(budget, d)
    else:
        lam = math.log(LOW) + (math.log(HIGH) - math.log(LOW)) * torch.rand(budget, d, generator=g, dtype=D)
    start = time.perf_counter()
    w = solve_sequence(inner, lam)
    val = outer(w, lam)
    seconds = time.perf_counter() - start
    best = int(val.argmin())
    return {
        "method": "grid search (shared penalty)" if kind == "grid" else "random search (per feature)",
        "inner solves": budget, "seconds": seconds, "validation": float(val[best]),
        "test error": test_error(w[best]), "test loss": test_loss(w[best]),
        "best so far": torch.cummin(val, 0).values.tolist(), "penalties": lam[best].exp(),
    }


def run_dataset(name: str, steps: int, lr: float, log, seed: int = SEED) -> dict:
    data = load(name, seed)
    rows = [
        hypergradient_method(name, data, steps, lr, log),
        search_method(name, data, steps, "grid", seed),
        search_method(name, data, steps, "random", seed),
    ]
    inner, outer, test_error, test_loss = make_problem(name, data)
    history = rows[0]["history"]
    # An unregularized fit (penalty 1e-8) as a reference point.
    d = data["train"][0].shape[1]
    w = solve_sequence(inner, torch.full((1, d), math.log(1e-8), dtype=D))[0]
    reference = {"validation": float(outer(w, None)), "test error": test_error(w), "test loss": test_loss(w)}
    return {"name": name, "rows": rows, "history": history, "unregularized": reference,
            "sizes": {k: len(v[1]) for k, v in data.items()}, "features": d}


# ------------------------------------------------------------------------------ output
def print_table(result: dict) -> None:
    name, sizes = result["name"], result["sizes"]
    metric = "test MSE" if name == "diabetes" else "test error rate"
    print(f"\n{name}: {result['features']} features, train/val/test = "
          f"{sizes['train']}/{sizes['val']}/{sizes['test']}")
    print(f"{'method':<30} {'inner solves':>12} {'val. loss':>10} {metric:>15} {'test loss':>10} {'time (s)':>9}")
    ref = result["unregularized"]
    print(f"{'unregularized':<30} {1:>12} {ref['validation']:>10.4f} {ref['test error']:>15.4f} "
          f"{ref['test loss']:>10.4f} {'':>9}")
    for row in result["rows"]:
        print(f"{row['method']:<30} {row['inner solves']:>12} {row['validation']:>10.4f} "
              f"{row['test error']:>15.4f} {row['test loss']:>10.4f} {row['seconds']:>9.2f}")
    h = result["history"]
    print(f"estimator diagnostics over {len(h.outer_loss)} outer steps: max inner residual "
          f"{max(h.inner_residual):.1e}, max linear-solve residual {max(h.linear_residual):.1e}, "
          f"max inner Newton steps {max(h.inner_steps)}, all converged: {all(h.converged)}")


def plot_results(results: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 7.0), squeeze=False)
    for col, result in enumerate(results):
        ax = axes[0, col]
        hyper, grid, rand = result["rows"]
        steps = range(1, len(result["history"].outer_loss) + 1)
        ax.plot(steps, result["history"].outer_loss, label="hypergradient (loss at each step)")
        ax.plot(steps, grid["best so far"], label="grid search (best so far)", linestyle="--")
        ax.plot(steps, rand["best so far"], label="random search (best so far)", linestyle=":")
        # zoom on the hypergradient and random search (the path starts far above)
        curves = [result["history"].outer_loss, grid["best so far"], rand["best so far"]]
        low = min(min(c) for c in curves)
        high = max(curves[0][0], curves[2][0])
        ax.set_ylim(low - 0.15 * (high - low), high + 0.3 * (high - low))
        ax.set_xlabel("inner solves")
        ax.set_ylabel("validation loss")
        ax.set_title(result["name"].replace("_", " "))
        ax.legend(fontsize=8)
        ax = axes[1, col]
        ax.semilogy(hyper["penalties"].numpy(), "o-", label="hypergradient")
        ax.semilogy(grid["penalties"].numpy(), "s--", label="grid search")
        ax.set_xlabel("feature")
        ax.set_ylabel("penalty exp(lam_i)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"\nplot written to {path}")


def main(quick: bool = False, plot: str | None = "hyperparameters_diabetes_cancer.png",
         progress: bool = True, seed: int = SEED) -> dict:
    torch.manual_seed(seed)
    steps = 30 if quick else 120
    log = sys.stderr if progress else None
    results = [run_dataset("diabetes", steps, 0.1, log, seed), run_dataset("breast_cancer", steps, 0.1, log, seed)]
    print("\nper-feature regularization by hypergradient vs search at equal compute (inner solves)")
    for result in results:
        print_table(result)
    if plot:
        plot_results(results, plot)
    return {r["name"]: r for r in results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 outer steps per data set (under 40 s)")
    parser.add_argument("--plot", default="hyperparameters_diabetes_cancer.png",
                        help="PNG file for the curves (needs matplotlib); '' for none")
    parser.add_argument("--seed", type=int, default=SEED, help="train / validation / test split")
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot or None, seed=args.seed)
