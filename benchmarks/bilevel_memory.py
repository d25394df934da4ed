"""Peak memory and time of implicit, unrolled and checkpointed hypergradients against the
number of inner steps, for a network with one weight-decay hyperparameter per weight.

Inner problem: a 2-layer MLP d_in-hidden-classes (ReLU) trained by ``T`` steps of SGD with
momentum on cross-entropy + 1/2 sum_j exp(lam_j) w_j^2 (``lam`` has one entry per weight);
outer: validation cross-entropy. Estimators: ``ImplicitCG`` at the ``T``-step iterate
(inner steps run without recording; a fixed budget of CG iterations), ``Unrolled`` and
``CheckpointedUnrolled`` through the ``T`` steps. The full size (MLP 256-1024-10, 272k
weights, batch 4096, T in {10, 100, 400}) is meant for a CUDA device, where peak memory is
``torch.cuda.max_memory_allocated``; ``--quick`` runs a small network on any device (on
CPU the peak resident-set measurement is coarse: it misses memory the allocator reuses).
"""

from __future__ import annotations

import math
import warnings

import torch

from difflayers import bilevel as bl

from ._harness import Row, environment, format_table, measure


def _problem(d_in: int, hidden: int, classes: int, batch: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d_in, classes, generator=g, dtype=dtype)

    def data():
        X = torch.randn(batch, d_in, generator=g, dtype=dtype)
        return X.to(device), (X @ teacher).argmax(1).to(device)

    (X, y), (Xv, yv) = data(), data()
    model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    model = model.to(dtype=dtype, device=device)
    params = {k: p.detach() for k, p in model.named_parameters()}
    lam = {k: torch.full_like(p, math.log(1e-4)) for k, p in params.items()}
    ce = torch.nn.functional.cross_entropy

    def inner(w, lam):
        fit = ce(torch.func.functional_call(model, w, (X,)), y)
        return fit + 0.5 * sum((lam[k].exp() * w[k] ** 2).sum() for k in w)

    def outer(w, lam):
        return ce(torch.func.functional_call(model, w, (Xv,)), yv)

    return inner, outer, params, lam


def run(repeats: int = 3, device: str = "cuda", quick: bool = False) -> str:
    device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    if quick:
        d_in, hidden, classes, batch, horizons = 16, 32, 5, 64, (3, 8)
    else:
        d_in, hidden, classes, batch, horizons = 256, 1024, 10, 4096, (10, 100, 400)
    inner, outer, params, lam = _problem(d_in, hidden, classes, batch, dtype, device)
    weights = sum(p.numel() for p in params.values())
    optimizer = bl.SGD(lr=0.1, momentum=0.9)
    tables = [
        f"Hypergradient memory: MLP {d_in}-{hidden}-{classes} ({weights} weights, one hyperparameter each), "
        f"batch {batch}, float32, {device.type}. {environment()}"
    ]
    for T in horizons:
        estimators = [
            (f"ImplicitCG (T={T} inner steps, 20 CG iterations)", bl.ImplicitCG(
                inner_solver=bl.OptimizerSolver(optimizer=optimizer, max_steps=T, rtol=0.0, atol=0.0),
                max_steps=20, check_every=20)),
            (f"Unrolled (T={T})", bl.Unrolled(optimizer=optimizer, steps=T)),
            (f"CheckpointedUnrolled (T={T})", bl.CheckpointedUnrolled(optimizer=optimizer, steps=T)),
        ]
        rows, flats, reference = [], [], None
        for label, estimator in estimators:

            def fn(estimator=estimator):
                with warnings.catch_warnings():
                    # a T-step inner iterate is not a converged solution: the implicit row
                    # measures memory and time, not accuracy
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return bl.hypergradient(outer, inner, params, lam, estimator=estimator)[0]

            grad = fn()
            flat = torch.cat([g.reshape(-1) for g in grad.values()])
            if isinstance(estimator, bl.Unrolled):
                reference = flat
            seconds, peak = measure(fn, device, repeats)
            rows.append(Row(label, seconds, peak, math.nan, anchor=isinstance(estimator, bl.Unrolled)))
            flats.append(flat)
        for row, flat in zip(rows, flats):  # against the unrolled gradient of the same T steps
            row.error = float((flat - reference).norm() / reference.norm())
        tables.append(format_table(f"T = {T} inner steps", rows, "Unrolled"))
    return "\n\n".join(tables)
