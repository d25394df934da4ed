"""A deep-equilibrium layer on scikit-learn's digits, and its backward memory.

Run ``python examples/deq_digits.py`` (``--quick`` for a version under 40 s).

The network is ``image -> z* -> linear -> 10 classes`` where ``z*`` is the fixed point
of one tanh layer with input injection,

    z* = tanh(W z* + U x + b),

computed by ``dl.fixed_point`` with Anderson acceleration. Its gradient comes from the
implicit function theorem: one linear solve with ``(I - dT/dz)^T`` at the fixed point,
whatever the number of forward iterations. ``W`` is rescaled to Frobenius norm at most
0.9, so ``T`` is a contraction (tanh is 1-Lipschitz): the fixed point exists and is
unique, and the Neumann series ``w = g + (dT/dz)^T w`` solves the backward system, which
is why the layer uses ``adjoint=dl.Implicit(linear_solver=dl.solvers.Neumann())`` (a
short recurrence, a few vectors per sample; GMRES, the default for nonsymmetric
systems, keeps a Krylov basis of ``restart + 1`` vectors).

1. Training: the layer is trained with Adam on 1297 digits and tested on the other
   500 (scikit-learn's bundled 8x8 images, no download).
2. Memory: for the trained layer, the forward solve is run to tighter and tighter
   tolerances (more Anderson iterations) and differentiated implicitly (Neumann and
   GMRES backward solves) and with ``dl.Unroll()`` (backpropagation through every
   iteration). Two measures of the
   memory of one forward + backward: the bytes autograd keeps for the backward pass
   (tensors saved by the graph, counted by ``torch.autograd.graph.saved_tensors_hooks``;
   exact) and the growth of the process's resident-set high-water mark (Linux
   ``/proc/self/status`` VmHWM, as ``benchmarks/_harness.py`` measures; includes the
   workspace of the backward solve). Unrolled memory grows linearly with the number of
   forward iterations; implicit memory does not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import multiprocessing
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


def equilibrium_map(z: torch.Tensor, W: torch.Tensor, U: torch.Tensor, bias: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z @ W.T + x @ U.T + bias)


ADJOINTS = {
    "implicit, Neumann": dl.Implicit(linear_solver=dl.solvers.Neumann()),
    "implicit, GMRES": dl.Implicit(linear_solver=dl.solvers.GMRES()),
    "unroll": dl.Unroll(),
}


class DEQClassifier(torch.nn.Module):
    """``logits = head(z*)`` with ``z* = tanh(W z* + U x + b)``."""

    def __init__(self, inputs: int, width: int, classes: int, max_norm: float = 0.9):
        super().__init__()
        self.W = torch.nn.Parameter(0.5 * max_norm * torch.randn(width, width, dtype=D) / width)
        self.U = torch.nn.Parameter(torch.randn(width, inputs, dtype=D) / inputs**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(width, dtype=D))
        self.head = torch.nn.Linear(width, classes).double()
        self.max_norm = max_norm

    def contraction(self) -> torch.Tensor:
        """``W`` rescaled to Frobenius norm <= max_norm (a bound on its spectral norm)."""
        return self.W * (self.max_norm / self.W.norm().clamp_min(self.max_norm))

    def equilibrium(self, x: torch.Tensor, solver=None, adjoint=None, return_solution: bool = False):
        z0 = torch.zeros(x.shape[0], self.W.shape[0], dtype=D)
        # the parameters are explicit arguments of the map, so gradients reach them
        return dl.fixed_point(equilibrium_map, z0, self.contraction(), self.U, self.bias, x,
                              solver=solver or dl.solvers.Anderson(rtol=1e-6, atol=1e-8),
                              adjoint=adjoint or ADJOINTS["implicit, Neumann"], return_solution=return_solution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.equilibrium(x))


def accuracy(model: DEQClassifier, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).to(D).mean())


def train(model: DEQClassifier, data, epochs: int, batch: int, lr: float) -> dict:
    X, y, X_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = {"epoch": [0], "test accuracy": [accuracy(model, X_test, y_test)], "train loss": [math.nan]}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for idx in torch.randperm(len(y)).split(batch):
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        history["epoch"].append(epoch)
        history["train loss"].append(total / len(y))
        history["test accuracy"].append(accuracy(model, X_test, y_test))
        _progress(f"epoch {epoch}/{epochs}: train loss {history['train loss'][-1]:.3f}, "
                  f"test accuracy {history['test accuracy'][-1]:.3f}")
    print(file=sys.stderr)
    history["seconds"] = time.perf_counter() - start
    return history


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mib(fn) -> float:
    """Growth of the resident-set high-water mark during ``fn()`` (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")              # resets VmHWM to the current resident set
    except OSError:
        return math.nan
    base = _rss_kib("VmRSS")
    fn()
    return max(_rss_kib("VmHWM") - base, 0) / 1024


@contextlib.contextmanager
def freed_memory_returned():
    """Make glibc return freed blocks of 64 KiB and more to the system at once.

    By default glibc raises its mmap threshold as large blocks are freed and keeps them
    for reuse, so the high-water mark of a call depends on what ran before it. With a
    fixed threshold (and trimming) the resident set follows the live tensors.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def saved_for_backward_mib(fn):
    """``fn()`` and the MiB of distinct storages autograd saved for its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values()) / 2**20


def _sweep(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor, tolerances) -> list[dict]:
    rows = []
    params = [model.W, model.U, model.bias]
    with freed_memory_returned():
        for rtol in tolerances:
            solver = dl.solvers.Anderson(rtol=rtol, atol=0.0, max_steps=500)
            grads = {}
            for name, adjoint in ADJOINTS.items():
                def step():
                    sol, saved = saved_for_backward_mib(
                        lambda: model.equilibrium(x, solver, adjoint, return_solution=True))
                    loss = torch.nn.functional.cross_entropy(model.head(sol.value), y)
                    grad = torch.cat([g.detach().flatten() for g in torch.autograd.grad(loss, params)])
                    return sol, saved, grad

                start = time.perf_counter()
                sol, saved, grads[name] = step()       # also warms up before the measured call
                seconds = time.perf_counter() - start
                rss = peak_rss_mib(step)
                rows.append({"adjoint": name, "rtol": rtol, "iterations": int(sol.stats["num_steps"].max()),
                             "saved MiB": saved, "peak RSS MiB": rss, "seconds": seconds})
                _progress(f"memory: rtol {rtol:.0e}, {name}, {rows[-1]['iterations']} iterations")
            for r in rows[-len(ADJOINTS):]:     # the gradients agree once the forward has converged
                r["grad rel. difference"] = float((grads[r["adjoint"]] - grads["unroll"]).norm()
                                                  / grads["unroll"].norm())
    print(file=sys.stderr)
    return rows


def _sweep_in_child(queue, *args) -> None:
    try:
        queue.put(("rows", _sweep(*args)))
    except Exception as error:  # noqa: BLE001 -- reported by the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))


def memory_sweep(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor, tolerances) -> list[dict]:
    """Memory of one forward + backward for each adjoint and forward tolerance.

    Measured in a forked child process where fork exists, so that the allocator
    settings of ``freed_memory_returned`` and the memory touched do not outlive the
    measurement.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return _sweep(model, x, y, tolerances)
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_sweep_in_child, args=(queue, model, x, y, tolerances))
    child.start()
    while child.is_alive() and queue.empty():
        child.join(0.1)
    if queue.empty():
        raise RuntimeError(f"memory measurement: the child process exited with code {child.exitcode}")
    kind, payload = queue.get()
    child.join()
    if kind == "error":
        raise RuntimeError(f"memory measurement failed in the child process: {payload}")
    return payload


def plot_results(history: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4))
    left.plot(history["epoch"], history["test accuracy"], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy")
    left.set_title("DEQ layer on digits (implicit gradients)")
    for k, (name, marker) in enumerate(zip(ADJOINTS, "o^s")):
        its = [r["iterations"] for r in rows if r["adjoint"] == name]
        right.plot(its, [r["saved MiB"] for r in rows if r["adjoint"] == name], marker=marker, color=f"C{k}",
                   label=f"{name}: saved for backward")
        right.plot(its, [r["peak RSS MiB"] for r in rows if r["adjoint"] == name], marker=marker, color=f"C{k}",
                   linestyle="--", label=f"{name}: peak RSS growth")
    right.set_yscale("log")
    right.set_xlabel("Anderson iterations of the forward solve")
    right.set_ylabel("MiB")
    right.set_title("Memory of one forward + backward")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(quick: bool = False, plot: str | None = "deq_digits.png", seed: int = 0) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if quick:
        config = dict(width=64, epochs=8, batch=64, lr=0.01, mem_batch=512, tolerances=(1e-2, 1e-5, 1e-8))
    else:
        config = dict(width=128, epochs=15, batch=64, lr=0.005, mem_batch=1024,
                      tolerances=(1e-2, 1e-4, 1e-6, 1e-8, 1e-10))
    print(f"difflayers {dl.__version__}: deep-equilibrium layer on digits (torch {torch.__version__}, float64, CPU)")
    data = load_digits_split(seed)
    model = DEQClassifier(data[0].shape[1], config["width"], 10)
    history = train(model, data, config["epochs"], config["batch"], config["lr"])
    X, y = data[0][: config["mem_batch"]], data[1][: config["mem_batch"]]
    rows = memory_sweep(model, X, y, config["tolerances"])

    print(f"\nwidth {config['width']}, {config['epochs']} epochs ({history['seconds']:.1f} s): "
          f"test accuracy {history['test accuracy'][-1]:.3f} on {len(data[3])} held-out digits")
    print(f"\nmemory of one forward + backward, batch {config['mem_batch']}:")
    print(f"{'rtol':>8} {'adjoint':>18} {'iterations':>11} {'saved (MiB)':>12} {'peak RSS (MiB)':>15} "
          f"{'time (s)':>9} {'grad diff':>10}")
    print("-" * 89)
    for r in rows:
        print(f"{r['rtol']:>8.0e} {r['adjoint']:>18} {r['iterations']:>11d} {r['saved MiB']:>12.2f} "
              f"{r['peak RSS MiB']:>15.1f} {r['seconds']:>9.2f} {r['grad rel. difference']:>10.1e}")
    print("saved: tensors autograd keeps for the backward; peak RSS: growth of the resident-set high-water mark;\n"
          "grad diff: relative difference from the unrolled gradient at that tolerance.")
    if plot:
        plot_results(history, rows, plot)
        print(f"plot written to {plot}")
    return {"history": history, "memory": rows, "test accuracy": history["test accuracy"][-1], "config": config}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller layer, fewer epochs (under 40 s)")
    parser.add_argument("--plot", default="deq_digits.png", help="PNG file for the plot; '' for none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(quick=args.quick, plot=args.plot or None, seed=args.seed)
