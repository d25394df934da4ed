"""Learning one ridge penalty per feature by hypergradient descent.

Generated regression data (no download): a few informative features among many noisy
ones. The inner problem fits ridge weights with one penalty per feature,

    w*(lam) = argmin_w 1/(2n) ||X w - y||^2 + 1/2 sum_i exp(lam_i) w_i^2,

and the outer problem is the validation loss 1/(2 n_v) ||X_v w*(lam) - y_v||^2. The
penalties are learned with Adam on the implicit (CG) hypergradient through
``dl.bilevel.learn_hyperparameters``; the held-out test loss is reported before and after.
The estimators of ``dl.bilevel`` are then compared against the closed-form hypergradient
at the initial penalties.

    python examples/bilevel_ridge.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from difflayers import bilevel as bl

D = torch.float64


def make_data(n: int, d: int, informative: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.ones(d, dtype=D)
    scales[informative:] = 3.0  # noisy features with large variance: they need large penalties
    w_true = torch.zeros(d, dtype=D)
    w_true[:informative] = torch.randn(informative, generator=g, dtype=D)

    def split(m):
        X = torch.randn(m, d, generator=g, dtype=D) * scales
        return X, X @ w_true + 0.5 * torch.randn(m, generator=g, dtype=D)

    return split(n), split(n), split(4 * n)


def main(quick: bool = False) -> dict:
    n, d, informative = (80, 30, 5) if quick else (200, 100, 10)
    steps = 40 if quick else 150
    (X, y), (Xv, yv), (Xt, yt) = make_data(n, d, informative)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() / n + 0.5 * (lam.exp() * w**2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).sum() / n

    def test_loss(w):
        return float(0.5 * ((Xt @ w - yt) ** 2).mean())

    def exact(lam):
        H = X.T @ X / n + torch.diag(lam.exp())
        w = torch.linalg.solve(H, X.T @ y / n)
        return w, -lam.exp() * w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv) / n)

    lam = torch.full((d,), -2.0, dtype=D, requires_grad=True)
    w0 = torch.zeros(d, dtype=D)
    w_start, g_exact = exact(lam.detach())
    before = {"validation": float(outer(w_start, lam)), "test": test_loss(w_start)}

    # 1. the estimators at the initial penalties, against the closed form
    L = float(torch.linalg.eigvalsh(X.T @ X / n + torch.diag(lam.detach().exp()))[-1])
    estimators = [
        bl.ImplicitCG(),
        bl.ImplicitDense(),
        bl.ImplicitNeumann(steps=50),
        bl.Unrolled(optimizer=bl.SGD(lr=1.0 / L, momentum=0.9), steps=200),
        bl.CheckpointedUnrolled(optimizer=bl.SGD(lr=1.0 / L, momentum=0.9), steps=200),
        bl.Penalty(),
        bl.OneStep(step_size=1.0 / L),
    ]
    rows = []
    print(f"bilevel ridge: n={n}, d={d} ({informative} informative), one penalty per feature")
    print(f"{'estimator':<32} {'rel. error':>10} {'time (ms)':>10}")
    for est in estimators:
        start = time.perf_counter()
        g, info = bl.hypergradient(outer, inner, w0, lam.detach(), estimator=est, on_unconverged="raise"
                                   if est.exact else "warn")
        seconds = time.perf_counter() - start
        error = float((g - g_exact).norm() / g_exact.norm())
        rows.append({"estimator": est.describe(), "error": error, "seconds": seconds})
        print(f"{est.describe():<32} {error:>10.2e} {1e3 * seconds:>10.1f}")

    # 2. learn the penalties
    optimizer = torch.optim.Adam([lam], lr=0.2)
    w, history = bl.learn_hyperparameters(outer, inner, w0, lam, optimizer, steps=steps, progress=True,
                                          stream=sys.stdout)
    w_final, _ = exact(lam.detach())
    after = {"validation": float(outer(w_final, lam.detach())), "test": test_loss(w_final)}
    penalties = lam.detach().exp()
    print(f"validation loss {before['validation']:.4f} -> {after['validation']:.4f}; "
          f"test loss {before['test']:.4f} -> {after['test']:.4f}")
    print(f"mean penalty: informative features {float(penalties[:informative].mean()):.3g}, "
          f"noisy features {float(penalties[informative:].mean()):.3g}")
    return {"before": before, "after": after, "history": history, "estimators": rows,
            "penalties": penalties, "informative": informative}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    main(quick=parser.parse_args().quick)
