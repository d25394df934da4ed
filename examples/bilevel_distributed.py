"""A data-parallel bilevel outer loop: a regularizer shared by many tasks, learned by
hypergradients computed on each rank's share of the tasks and averaged with all_reduce.

Generated multi-task regression (no download): every task has few samples and many
features, of which the same few are informative in every task (with task-specific
weights). The inner problem of task ``t`` fits ridge weights with one penalty per
feature, shared by all tasks,

    w_t*(lam) = argmin_w 1/(2n) ||X_t w - y_t||^2 + 1/2 sum_i exp(lam_i) w_i^2,

and the outer objective is the mean validation loss over the tasks,

    F(lam) = 1/T sum_t 1/(2 n_v) ||V_t w_t*(lam) - z_t||^2.

Each outer step, rank ``r`` of ``R`` takes its slice of the tasks (the first ``T % R``
ranks one task more), computes the hypergradients of its tasks with one batched call
of ``dl.bilevel.hypergradient`` (implicit, CG; warm-started from its previous step),
sums them, and an ``all_reduce`` adds up the ranks' sums: every rank holds the same
mean hypergradient and takes the same Adam step, so the penalties stay identical
without being broadcast. Baselines: the initial penalty, and the best single penalty
shared by all features (a grid on the same validation objective). All penalties are
judged on new tasks, fitted on their training split and scored on their test split.

    python examples/bilevel_distributed.py [--quick]                    # one process
    torchrun --nproc-per-node 2 examples/bilevel_distributed.py [--quick]  # two ranks (gloo)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from difflayers import bilevel as bl

D = torch.float64
SEED = 0


# ----------------------------------------------------------------------------- data
def make_tasks(count: int, n: int, d: int, informative: int, generator: torch.Generator) -> dict:
    """``count`` tasks: training and validation splits ``X [T, n, d]``, ``y [T, n]``."""
    scales = torch.ones(d, dtype=D)
    scales[informative:] = 3.0  # noisy features with a large variance: they need large penalties
    w = torch.zeros(count, d, dtype=D)
    w[:, :informative] = 1.0 + 0.5 * torch.randn(count, informative, generator=generator, dtype=D)

    def split(m):
        X = torch.randn(count, m, d, generator=generator, dtype=D) * scales
        return X, torch.einsum("tnd,td->tn", X, w) + 0.5 * torch.randn(count, m, generator=generator, dtype=D)

    return {"train": split(n), "val": split(n)}


def fit(X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The inner solutions in closed form (for the baselines and the test tasks)."""
    n = X.shape[1]
    H = X.transpose(1, 2) @ X / n + torch.diag_embed(lam.exp().expand(X.shape[0], -1))
    return torch.linalg.solve(H, (X.transpose(1, 2) @ y[:, :, None] / n)[:, :, 0])


def loss(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-task half mean squared error ``[T]``."""
    return 0.5 * (torch.einsum("tnd,td->tn", X, w) - y).square().mean(1)


# ---------------------------------------------------------------------- distribution
def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def task_slice(count: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s slice of ``count`` tasks: the first ``count % size`` ranks take one
    more (the convention of ``dl.shard_batch``)."""
    share, extra = divmod(count, size)
    start = rank * share + min(rank, extra)
    return slice(start, start + share + (rank < extra))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)  # SUM
    return t


# ------------------------------------------------------------------------ outer loop
def mean_hypergradient(tasks: dict, lam: torch.Tensor, state):
    """The mean over all tasks of the outer loss and its hypergradient, from this rank's tasks."""
    local = task_slice(tasks["train"][0].shape[0], *world())
    (X, y), (V, z) = [(a[local], b[local]) for a, b in (tasks["train"], tasks["val"])]
    count, d = X.shape[0], lam.shape[0]
    total = torch.zeros(d + 1, dtype=D)  # [sum of hypergradients, sum of outer losses]
    info = None
    if count:
        def inner(w, lam_):  # [count]: one ridge problem per task
            return 0.5 * (torch.einsum("tnd,td->tn", X, w) - y).square().mean(1) + 0.5 * (lam_.exp() * w**2).sum(1)

        def outer(w, lam_):
            return loss(V, z, w)

        w0 = torch.zeros(count, d, dtype=D)
        grad, info = bl.hypergradient(outer, inner, w0, lam.detach().expand(count, d).contiguous(), batched=True,
                                      state=state, on_unconverged="raise")
        total = torch.cat([grad.sum(0), info.value.sum()[None]])
    total = all_sum(total) / tasks["train"][0].shape[0]
    return total[:d], float(total[d]), info


def learn(tasks: dict, lam0: torch.Tensor, steps: int, lr: float) -> dict:
    lam = lam0.clone().requires_grad_()
    optimizer = torch.optim.Adam([lam], lr=lr)
    state, history = None, {"outer loss": [], "inner residual": [], "linear residual": []}
    start = time.perf_counter()
    for _ in range(steps):
        grad, value, info = mean_hypergradient(tasks, lam, state)
        optimizer.zero_grad()
        lam.grad = grad
        optimizer.step()
        history["outer loss"].append(value)
        if info is not None:
            state = info.state
            history["inner residual"].append(float(info.inner_residual.max()))
            history["linear residual"].append(float(info.linear_residual.max()))
    return {"lam": lam.detach(), "history": history, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- report
def plot_results(result: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    curve = result["history"]["outer loss"]
    axes[0].plot(range(1, len(curve) + 1), curve, label="per-feature penalties (hypergradient)")
    axes[0].axhline(result["rows"][1]["validation"], color="tab:gray", ls="--", label="best shared penalty (grid)")
    axes[0].set_xlabel("outer step")
    axes[0].set_ylabel("mean validation loss")
    axes[0].set_title(f"outer loop on {result['world']} rank(s)")
    axes[0].legend()
    penalties = result["lam"].exp().numpy()
    k = result["informative"]
    colors = ["tab:green"] * k + ["tab:red"] * (len(penalties) - k)
    axes[1].bar(range(len(penalties)), penalties, color=colors)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("feature (green: informative, red: noise)")
    axes[1].set_ylabel("learned penalty exp(lam_i)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"\nplot written to {path}")


def main(quick: bool = False, plot: str | None = "bilevel_distributed.png", save: str | None = None,
         seed: int = SEED) -> dict:
    """Learn the shared penalties on the ranks of the initialized process group (or alone)."""
    rank, size = world()
    count, test_count, n, d, informative = (7, 40, 15, 12, 3) if quick else (32, 200, 20, 40, 5)
    steps, lr = (30, 0.3) if quick else (100, 0.1)
    g = torch.Generator().manual_seed(seed)
    tasks, test = make_tasks(count, n, d, informative, g), make_tasks(test_count, n, d, informative, g)

    def scores(lam):  # mean validation loss (training tasks), mean test loss (new tasks)
        val = loss(*tasks["val"], fit(*tasks["train"], lam)).mean()
        return float(val), float(loss(*test["val"], fit(*test["train"], lam)).mean())

    lam0 = torch.zeros(d, dtype=D)
    grid = torch.linspace(-6.0, 4.0, 21, dtype=D)
    shared = min(grid, key=lambda c: scores(torch.full((d,), float(c), dtype=D))[0])
    result = learn(tasks, lam0, steps, lr)
    rows = []
    for name, lam in [("initial penalty (1 for every feature)", lam0),
                      (f"best shared penalty ({float(shared.exp()):.3g}, grid of {len(grid)})",
                       torch.full((d,), float(shared), dtype=D)),
                      ("per-feature penalties (hypergradient)", result["lam"])]:
        val, tst = scores(lam)
        rows.append({"method": name, "validation": val, "test": tst})
    result.update(rows=rows, world=size, informative=informative,
                  tasks_per_rank=[len(range(count)[task_slice(count, r, size)]) for r in range(size)])
    if rank == 0:
        history = result["history"]
        print(f"bilevel, data-parallel outer loop: {count} tasks (n={n}, d={d}, {informative} informative features) "
              f"on {size} process(es), tasks per rank {result['tasks_per_rank']}; {steps} outer steps (Adam) in "
              f"{result['seconds']:.1f} s; hypergradients summed with all_reduce")
        print(f"{'penalties':<44} {'validation loss':>15} {'test loss (new tasks)':>22}")
        for row in rows:
            print(f"{row['method']:<44} {row['validation']:>15.4f} {row['test']:>22.4f}")
        penalties = result["lam"].exp()
        print(f"mean learned penalty: informative features {float(penalties[:informative].mean()):.3g}, "
              f"noisy features {float(penalties[informative:].mean()):.3g}")
        print(f"estimator diagnostics (rank 0): max inner residual {max(history['inner residual']):.1e}, "
              f"max linear-solve residual {max(history['linear residual']):.1e}")
        if plot:
            plot_results(result, plot)
        if save:
            torch.save({"lam": result["lam"], "outer loss": history["outer loss"], "rows": rows, "world": size}, save)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="7 tasks, 30 outer steps (a few seconds)")
    parser.add_argument("--plot", default="bilevel_distributed.png", help="PNG file (needs matplotlib); '' for none")
    parser.add_argument("--save", default="", help="torch.save the learned penalties and the curve here (rank 0)")
    parser.add_argument("--seed", type=int, default=SEED, help="tasks and noise")
    args = parser.parse_args()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # one CPU process per rank; "nccl" for one GPU each
    try:
        main(quick=args.quick, plot=args.plot or None, save=args.save or None, seed=args.seed)
    finally:
        if distributed:
            dist.barrier()  # every rank done before any tears down (gloo aborts otherwise)
            dist.destroy_process_group()
