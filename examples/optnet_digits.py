"""OptNet on scikit-learn's digits: a QP layer with learnable constraints as the last layer.

Run ``python examples/optnet_digits.py`` (``--quick`` for a version under 40 s).

The network maps an 8x8 digit to class scores ``s = MLP(x)`` and then to a point of
the probability simplex cut by ``m`` learned half-spaces,

    p*(s) = argmin_p 1/2 ||p||^2 - s'p
            s.t.  1'p = 1,  p >= 0           (fixed: p is a probability vector)
                  G p <= h                   (learned: G [m, 10], h = G p0 + softplus(r))

with ``dl.QPLayer``. Without ``G p <= h`` this is the Euclidean projection of the scores
onto the simplex (sparsemax); the learned facets cut the simplex further. Writing
``h = G p0 + softplus(r)`` with ``p0`` the uniform distribution keeps ``p0`` strictly
feasible whatever ``G`` and ``r`` are (the parametrization of Amos and Kolter,
arXiv:1703.00443), so every QP of training has a solution.

Two ways to differentiate the layer are compared:

- exact (``adjoint=dl.Implicit()``, the default): the derivative of the KKT conditions.
  The projection is sparse: a class outside the support sits on its bound ``p_i = 0``
  (an active row: ``dp_i = 0``) and its score gets no gradient; trained on the squared
  distance to the one-hot label, a digit whose true class has left the support stops
  teaching.
- smoothed (``adjoint=dl.conic.Smoothed(barrier=0.01)``): the layer returns the
  central-path point, the projection regularized by ``-0.01 * sum log(slacks)`` (every
  probability strictly positive, as softmax is the entropy-regularized version of the
  same argmax), and its exact derivative. Cross-entropy applies and every class gets
  a gradient.

The baseline is a plain MLP with a softmax and cross-entropy whose hidden layer is
widened to a similar parameter count. All are trained with Adam on 1297 digits and
tested on the other 500. The summary table gives test accuracy and test Brier score
(squared distance of the predicted distribution to the one-hot label); the plot shows
test accuracy per epoch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import difflayers as dl

D = torch.float64


def _progress(message: str) -> None:
    print(f"\r  {message:<70}", end="", file=sys.stderr, flush=True)


def load_digits_split(seed: int, n_test: int = 500) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=D) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]


def mlp(inputs: int, hidden: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, outputs)).double()


class OptNet(torch.nn.Module):
    """``p* = argmin 1/2 ||p||^2 - s'p  s.t.  1'p = 1, p >= 0, G p <= h`` with ``s = MLP(x)``."""

    def __init__(self, inputs: int, hidden: int, classes: int, facets: int, adjoint=None):
        super().__init__()
        self.scores = mlp(inputs, hidden, classes)
        self.G = torch.nn.Parameter(torch.randn(facets, classes, dtype=D) / classes**0.5)
        self.r = torch.nn.Parameter(torch.zeros(facets, dtype=D))
        self.qp = dl.QPLayer(adjoint=adjoint)
        self.register_buffer("P", torch.eye(classes, dtype=D))
        self.register_buffer("A", torch.ones(1, classes, dtype=D))
        self.register_buffer("b", torch.ones(1, dtype=D))
        self.register_buffer("p0", torch.full((classes,), 1.0 / classes, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.G @ self.p0 + torch.nn.functional.softplus(self.r)
        return self.qp(self.P, -self.scores(x), self.G, h, self.A, self.b, lb=torch.zeros_like(self.p0))


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(predict, X: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        p = predict(X)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(D)
    return {"accuracy": float((p.argmax(1) == y).to(D).mean()),
            "brier": float((p - onehot).square().sum(1).mean())}


def train(name: str, model: torch.nn.Module, predict, loss_fn, data, epochs: int, batch: int, lr: float,
          seed: int) -> dict:
    X, y, X_test, y_test = data
    torch.manual_seed(seed)              # the same batches for every model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = [evaluate(predict, X_test, y_test)]
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(y)).split(batch):
            loss = loss_fn(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(evaluate(predict, X_test, y_test))
        _progress(f"{name}: epoch {epoch}/{epochs}, test accuracy {history[-1]['accuracy']:.3f}")
    return {"history": history, "seconds": time.perf_counter() - start, "parameters": n_parameters(model),
            **history[-1]}


def main(quick: bool = False, plot: str | None = "optnet_digits.png", seed: int = 0) -> dict:
    torch.set_num_threads(1)
    config = dict(hidden=32, facets=10, barrier=0.01, epochs=8 if quick else 25, batch=64, lr=0.01)
    print(f"difflayers {dl.__version__}: OptNet on digits (torch {torch.__version__}, float64, CPU)")
    data = load_digits_split(seed)
    classes = 10

    inputs = data[0].shape[1]
    torch.manual_seed(seed)
    smoothed = OptNet(inputs, config["hidden"], classes, config["facets"],
                      adjoint=dl.conic.Smoothed(barrier=config["barrier"]))
    torch.manual_seed(seed)
    exact = OptNet(inputs, config["hidden"], classes, config["facets"])
    # the baseline's hidden layer is widened until it has at least as many parameters
    hidden = config["hidden"]
    while n_parameters(mlp(inputs, hidden, classes)) < n_parameters(smoothed):
        hidden += 1
    torch.manual_seed(seed)
    baseline = mlp(inputs, hidden, classes)

    def cross_entropy(p, y):
        return torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), y)

    def squared_error(p, y):
        return (p - torch.nn.functional.one_hot(y, classes).to(D)).square().sum(1).mean()

    fit = dict(data=data, epochs=config["epochs"], batch=config["batch"], lr=config["lr"], seed=seed)
    results = {
        "OptNet, smoothed": train("OptNet, smoothed", smoothed, smoothed, cross_entropy, **fit),
        "OptNet, exact": train("OptNet, exact", exact, exact, squared_error, **fit),
        "MLP + softmax": train("MLP", baseline, lambda X: baseline(X).softmax(1),
                               torch.nn.functional.cross_entropy, **fit),
    }
    print(file=sys.stderr)
    print(f"{len(data[1])} training / {len(data[3])} test digits, {config['epochs']} epochs, "
          f"{config['facets']} learned facets")
    print(f"\n{'model':<18} {'loss':<14} {'parameters':>10} {'test accuracy':>14} {'test Brier':>11} {'train (s)':>10}")
    print("-" * 82)
    losses = {"OptNet, smoothed": "cross-entropy", "OptNet, exact": "squared error", "MLP + softmax": "cross-entropy"}
    for name, r in results.items():
        print(f"{name:<18} {losses[name]:<14} {r['parameters']:>10d} {r['accuracy']:>14.3f} {r['brier']:>11.3f} "
              f"{r['seconds']:>10.1f}")
    print("Brier: mean squared distance of the predicted distribution to the one-hot label (lower is better).")
    if plot:
        plot_history(results, plot)
        print(f"plot written to {plot}")
    return results


def plot_history(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, r), marker in zip(results.items(), "o^s"):
        ax.plot(range(len(r["history"])), [h["accuracy"] for h in r["history"]], marker=marker,
                label=f"{name} ({r['parameters']} parameters)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("Digits: QP layer with learned constraints vs MLP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (under 40 s)")
    parser.add_argument("--plot", default="optnet_digits.png", help="PNG file for the plot; '' for none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot or None, seed=args.seed)
