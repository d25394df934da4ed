"""Quadratically regularized (sparse) OT between point clouds: solve time and accuracy.

Problem: ``x``, ``y``: ``n = m`` points uniform in ``[0, 1]^2`` (fixed seed), uniform
weights, cost ``||x_i - y_j||^2``, regularization ``eps/2 sum_ij P_ij^2 / (a_i b_j)``
with ``eps = 1e-3`` (with uniform weights: ``(eps n m / 2) ||P||_F^2``), a batch of
``B`` problems, float64. Every method solves to a marginal error of about 1e-9.

Methods, on the same data, one CPU thread:

* difflayers ``dl.ot.quadratic_ot`` (batched semismooth Newton-CG, the whole batch in
  one call), then the envelope gradient with respect to the points; to a marginal
  error of 1e-9 and, for a comparison at equal accuracy, of 1e-4;
* POT 0.9.7 ``ot.smooth.smooth_ot_dual(a, b, C, reg=eps n m, reg_type="l2")``: the
  same problem (POT's regularizer is ``reg/2 ||P||_F^2``) by L-BFGS-B on the dual
  (scipy, numpy), one problem at a time (``stopThr=1e-9``, ``numItermax=10000``);
  L-BFGS-B stops near a marginal error of 1e-4 whatever ``stopThr``.

The error column is the largest marginal error ``max(|P 1 - a|_1, |P' 1 - b|_1)`` over the
batch; the note gives the largest plan difference to difflayers' plan and the fraction
of nonzero entries.

Run: ``python -m benchmarks.run sparse_ot [--quick]``.
"""

from __future__ import annotations

import os
import warnings

import torch

from ._harness import Row, environment, format_table, measure

EPSILON = 1e-3


def _marginal_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    rows = (P.sum(-1) - a).abs().sum(-1)
    cols = (P.sum(-2) - b).abs().sum(-1)
    return float(torch.maximum(rows, cols).max())


def _size(batch: int, n: int, repeats: int) -> str:
    import difflayers as dl

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, n, 2, dtype=torch.float64, generator=g)
    y = torch.rand(batch, n, 2, dtype=torch.float64, generator=g)
    a = torch.full((batch, n), 1.0 / n, dtype=torch.float64)
    rows = []
    for rtol in (1e-9, 1e-4):
        solver = dl.ot.SemismoothNewton(rtol=rtol, atol=0.0)

        def ours(solver=solver):
            xr = x.clone().requires_grad_()
            res = dl.ot.quadratic_ot(x=xr, y=y, epsilon=EPSILON, solver=solver)
            res.value.sum().backward()
            return res

        res = ours()
        if rtol == 1e-9:
            P_ours = res.plan.detach()
        seconds, peak = measure(ours, torch.device("cpu"), repeats)
        steps = res.stats["num_steps"]
        note = (f"{int(steps.min())}-{int(steps.max())} Newton steps; support "
                f"{100 * float(res.stats['support'].mean()):.1f} %")
        rows.append(Row(f"difflayers quadratic_ot, rtol {rtol:g} (batched, + envelope gradient)", seconds, peak,
                        _marginal_error(res.plan.detach(), a, a), note))
    missing = []
    try:
        import numpy as np
        import ot

        C = torch.cdist(x, y).square().numpy()
        an = a[0].numpy()

        def pot():
            out = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(batch):
                    out.append(ot.smooth.smooth_ot_dual(an, an, C[i], EPSILON * n * n, reg_type="l2",
                                                        stopThr=1e-9, numItermax=10000))
            return out

        plans = torch.from_numpy(np.stack(pot()))
        seconds, peak = measure(pot, torch.device("cpu"), max(1, repeats // 2))
        diff = float((plans - P_ours).abs().max())
        support = 100 * float((plans > 1e-12 / (n * n)).double().mean())
        rows.append(Row(f"POT {ot.__version__} smooth_ot_dual (L-BFGS-B, loop over the batch)", seconds, peak,
                        _marginal_error(plans, a, a), f"max plan diff {diff:.1e}; support {support:.1f} %",
                        anchor=True))
    except ImportError as exc:
        missing.append(f"- POT: n/a ({exc})")
    title = f"B = {batch}, n = m = {n} points in [0,1]^2, eps = {EPSILON}, float64, cpu, 1 thread"
    parts = [format_table(title, rows, "marginal error (max over the batch)")]
    return "\n\n".join(parts + (["\n".join(missing)] if missing else []))


def run(repeats: int = 5, device: str = "cpu", quick: bool = False) -> str:
    """Run the comparison and return the markdown tables (CPU only)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        sizes = [(2, 100)] if quick else [(8, 200), (4, 500)]
        header = f"Quadratically regularized OT (sparse plans). {environment()}"
        return header + "\n\n" + "\n\n".join(_size(batch, n, repeats) for batch, n in sizes)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(run(repeats=args.repeats, quick=args.quick))
