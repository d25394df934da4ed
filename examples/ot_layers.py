"""Optimal transport layers in training loops.

1. Point-cloud matching: an affine map (A, t) is learned so that A x + t matches a
   target cloud, by gradient descent on the Sinkhorn divergence (envelope gradients).
   The target is a known affine image of x plus noise, so the recovered map can be
   compared with the truth.
2. Learning to rank: a linear scoring model is trained through `soft_rank` (implicit
   gradients of the transport plan) to reproduce the ranking of a hidden linear score;
   Spearman's rank correlation on held-out data is reported.

    python examples/ot_layers.py [--quick] [--plot PATH]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import difflayers as dl

D = torch.float64


def _progress(step: int, total: int, every: int, message: str) -> None:
    if step % every == 0 or step == total:
        print(f"  [{step:4d}/{total}] {message}", flush=True)


def point_cloud_matching(quick: bool) -> dict:
    """Learn (A, t) with A x + t ~ y by descending the Sinkhorn divergence."""
    g = torch.Generator().manual_seed(0)
    n = 150 if quick else 500
    x = torch.randn(n, 2, generator=g, dtype=D)
    true_A = torch.tensor([[1.3, 0.4], [-0.2, 0.8]], dtype=D)
    true_t = torch.tensor([1.0, -0.5], dtype=D)
    y = x @ true_A.T + true_t + 0.02 * torch.randn(n, 2, generator=g, dtype=D)
    y = y[torch.randperm(n, generator=g)]  # no correspondence is given
    A = torch.eye(2, dtype=D, requires_grad=True)
    t = torch.zeros(2, dtype=D, requires_grad=True)
    # epsilon scaling: start from the cost scale; a moderate tolerance is enough for descent
    loss_fn = dl.ot.SinkhornDivergence(epsilon=0.2, solver=dl.ot.Sinkhorn(rtol=1e-6, max_steps=10000, epsilon_scaling=0.8))
    opt = torch.optim.Adam([A, t], lr=0.05)
    steps = 60 if quick else 200
    history = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_fn(x @ A.T + t, y)
        loss.backward()
        opt.step()
        history.append(loss.item())
        _progress(step, steps, 20, f"Sinkhorn divergence {loss.item():.3e}")
    error = torch.cat([(A - true_A).flatten(), t - true_t]).abs().max().item()
    return {"history": history, "map error": error, "initial": history[0], "final": history[-1]}


def _spearman(pred: torch.Tensor, target: torch.Tensor) -> float:
    rp = pred.argsort(-1).argsort(-1).to(D)
    rt = target.argsort(-1).argsort(-1).to(D)
    rp, rt = rp - rp.mean(-1, keepdim=True), rt - rt.mean(-1, keepdim=True)
    return float(((rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1))).mean())


def learning_to_rank(quick: bool) -> dict:
    """Fit w so that the ranks of X w match those of a hidden score, through soft_rank."""
    g = torch.Generator().manual_seed(1)
    d, items = 5, 8
    groups = 32 if quick else 128
    hidden = torch.randn(d, generator=g, dtype=D)

    def sample(count):
        X = torch.randn(count, items, d, generator=g, dtype=D)
        return X, X @ hidden + 0.1 * torch.randn(count, items, generator=g, dtype=D)

    X_train, s_train = sample(groups)
    X_test, s_test = sample(256)
    target = (s_train.argsort(-1).argsort(-1) + 1).to(D)
    w = torch.zeros(d, dtype=D)
    w[0] = 1.0
    w.requires_grad_()
    opt = torch.optim.Adam([w], lr=0.05)
    steps = 30 if quick else 150
    before = _spearman(X_test @ w.detach(), s_test)
    history = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        ranks = dl.ot.soft_rank(X_train @ w, epsilon=0.05)
        loss = (ranks - target).square().mean()
        loss.backward()
        opt.step()
        history.append(loss.item())
        _progress(step, steps, 10, f"rank loss {loss.item():.3f}")
    after = _spearman(X_test @ w.detach(), s_test)
    return {"history": history, "spearman before": before, "spearman after": after}


def main(quick: bool = False, plot: str | None = "ot_layers.png") -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    print("1. point-cloud matching with the Sinkhorn divergence")
    match = point_cloud_matching(quick)
    print("2. learning to rank through soft_rank")
    rank = learning_to_rank(quick)
    rows = [
        ("matching", "Sinkhorn divergence, first -> last step", f"{match['initial']:.3e} -> {match['final']:.3e}"),
        ("matching", "max error of the recovered affine map", f"{match['map error']:.3f}"),
        ("ranking", "held-out Spearman correlation, before -> after", f"{rank['spearman before']:.3f} -> "
                                                                        f"{rank['spearman after']:.3f}"),
    ]
    print(f"\n{'task':10s} {'metric':50s} value")
    for task, metric, value in rows:
        print(f"{task:10s} {metric:50s} {value}")
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib is not installed: no plot written)")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            axes[0].semilogy(match["history"])
            axes[0].set(title="point-cloud matching", xlabel="step", ylabel="Sinkhorn divergence")
            axes[1].plot(rank["history"])
            axes[1].set(title="learning to rank", xlabel="step", ylabel="squared rank error")
            fig.tight_layout()
            fig.savefig(plot, dpi=100)
            print(f"plot written to {plot}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    assert all(math.isfinite(v) for v in match["history"] + rank["history"])
    return {"matching": match, "ranking": rank}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute on a CPU")
    parser.add_argument("--plot", default="ot_layers.png", help="where to write the PNG (matplotlib)")
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot)
