"""``check_hypergrad``: every applicable hypergradient estimator against float64 finite
differences of ``F(lam) = f(w*(lam), lam)``."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, TextIO

import torch

from difflayers import bilevel
from difflayers.bilevel._implicit import solve_inner
from difflayers.bilevel._problem import BilevelProblem
from difflayers.bilevel._tree import leaves

__all__ = ["check_hypergrad", "HypergradCheck", "HypergradRow"]


@dataclasses.dataclass(frozen=True)
class HypergradRow:
    """One estimator's result.

    Attributes:
        estimator: the estimator's short description.
        error: ``||D g - d_fd|| / ||d_fd||`` over the probed directions ``D``.
        seconds: wall time of the ``hypergradient`` call.
        converged: its ``info.converged`` for every problem.
        exact: whether the estimator is exact at convergence (implicit solves); the others
            approximate by design and their error is informative.
        note: the first warning it raised, if any.
    """

    estimator: str
    error: float
    seconds: float
    converged: bool
    exact: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class HypergradCheck:
    """Result of ``check_hypergrad``: one row per estimator, printable as a table.

    Attributes:
        rows: the ``HypergradRow`` of each estimator.
        reference: the finite-difference directional derivatives ``[k]``.
        directions: ``"coordinates"`` or ``"random"``.
    """

    rows: list[HypergradRow]
    reference: torch.Tensor
    directions: str

    def errors(self) -> dict[str, float]:
        return {r.estimator: r.error for r in self.rows}

    def passed(self, rtol: float = 1e-6) -> bool:
        """Whether every exact estimator is within ``rtol`` of the finite differences."""
        return all(r.error <= rtol for r in self.rows if r.exact)

    def table(self) -> str:
        lines = [
            f"hypergradient check against central finite differences ({len(self.reference)} {self.directions} "
            "directions, float64)",
            f"{'estimator':<40} {'rel. error':>10} {'time (s)':>9}  {'converged':<9} kind",
        ]
        for r in self.rows:
            kind = "exact" if r.exact else "approximate"
            lines.append(f"{r.estimator:<40} {r.error:>10.2e} {r.seconds:>9.3f}  {str(r.converged):<9} {kind}"
                         + (f"  ({r.note})" if r.note else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _applicable(problem: BilevelProblem, optimizer, steps: int) -> list:
    kind, symmetric = problem.inner.kind, problem.inner.symmetric
    n = problem.w_layout.size
    out = []
    if symmetric:
        out += [bilevel.ImplicitCG(), bilevel.ImplicitMINRES()]
    out.append(bilevel.ImplicitGMRES())
    if kind != "root" or symmetric:
        out.append(bilevel.ImplicitNeumann(steps=100))
    if n <= 2000:
        out.append(bilevel.ImplicitDense())
    out.append(bilevel.OneStep())
    if kind == "objective":
        out += [bilevel.FiniteDifference(), bilevel.Penalty()]
    if optimizer is not None:
        out += [
            bilevel.Unrolled(optimizer=optimizer, steps=steps),
            bilevel.CheckpointedUnrolled(optimizer=optimizer, steps=steps),
            bilevel.TruncatedUnrolled(optimizer=optimizer, steps=steps, last=max(1, steps // 4)),
        ]
        if problem.lam_layout.size <= 16:
            out.append(bilevel.ForwardMode(optimizer=optimizer, steps=steps))
    return out


def check_hypergrad(
    outer: Callable,
    inner,
    w0,
    lam,
    *,
    optimizer=None,
    steps: int = 200,
    estimators: list | None = None,
    batched: bool = False,
    eps: float = 1e-6,
    max_directions: int = 16,
    seed: int = 0,
    stream: TextIO | None = None,
) -> HypergradCheck:
    """Compare hypergradient estimators with central finite differences in float64.

    The reference differentiates ``F(lam) = f(w*(lam), lam)``, with ``w*(lam +- h d)``
    solved to tight tolerance by the default inner solver (warm-started at ``w*(lam)``),
    along each coordinate of ``lam`` when it has at most ``max_directions`` entries per
    problem, else along ``max_directions`` random unit directions. Each estimator's
    ``D g`` is compared with it: ``error = ||D g - d_fd|| / ||d_fd||``. Implicit
    estimators should agree to about ``1e-7``; approximate ones (unrolled with few steps,
    Neumann, one-step, penalty) show their bias.

    Args:
        outer, inner, w0, lam, batched: as for ``dl.bilevel.hypergradient``; tensors must
            be float64.
        optimizer: inner optimizer for the unrolled estimators (omitted when ``None``).
        steps: inner steps of the unrolled estimators.
        estimators: the estimators to check; ``None``: every applicable one.
        eps: relative finite-difference step, ``h = eps * max(1, |lam|_inf)``.
        max_directions: number of probed directions.
        seed: of the random directions.
        stream: where to write the table (nothing is written when ``None``).

    Returns:
        ``HypergradCheck`` (``str()`` gives the table; ``passed(rtol)``).

    Raises:
        TypeError: tensors that are not float64.

    Example:
        >>> X = torch.randn(30, 4, dtype=torch.float64); y = X.sum(1)
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()
        >>> outer = lambda w, lam: 0.5 * ((X @ w - 0.5 * y) ** 2).mean()
        >>> lam = torch.full((4,), 0.3, dtype=torch.float64)
        >>> check_hypergrad(outer, inner, torch.zeros(4, dtype=torch.float64), lam).passed()
        True
    """
    for t in leaves(w0) + leaves(lam):
        if isinstance(t, torch.Tensor) and t.dtype != torch.float64:
            raise TypeError(
                f"check_hypergrad: finite differences need float64; got a {t.dtype} tensor. Convert w0, lam and "
                "the data your functions use to float64."
            )
    problem = BilevelProblem(outer, inner, w0, lam, batched)
    lam = problem.lam_layout.from_leaves(t.detach() for t in leaves(lam))
    layout = problem.lam_layout
    x0 = problem.w_layout.flatten(w0).detach()
    problem.check(w0, lam)
    x_star = solve_inner(problem, None, x0, lam).value

    p0 = layout.flatten(lam)  # [B, m]
    m = p0.shape[1]
    if m <= max_directions:
        D = torch.eye(m, dtype=p0.dtype, device=p0.device)
        kind = "coordinates"
    else:
        gen = torch.Generator().manual_seed(seed)
        D = torch.randn(max_directions, m, generator=gen, dtype=p0.dtype).to(p0.device)
        D = D / D.norm(dim=1, keepdim=True)
        kind = "random"
    h = eps * max(1.0, float(p0.abs().max()))

    def F(p):
        lam_p = layout.unflatten(p)
        x = solve_inner(problem, None, x_star, lam_p).value
        return problem.outer_value(x, lam_p)  # [B]

    reference = torch.stack([(F(p0 + h * d) - F(p0 - h * d)) / (2 * h) for d in D])  # [k, B]
    if not bool(torch.isfinite(reference).all()):
        raise ValueError("check_hypergrad: the finite differences are not finite; check the inner problem near lam.")

    rows = []
    for est in estimators if estimators is not None else _applicable(problem, optimizer, steps):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g, info = bilevel.hypergradient(outer, inner, w0, lam, estimator=est, batched=batched)
        seconds = time.perf_counter() - start
        directional = (layout.flatten(g) @ D.T).T  # [k, B]
        denom = float(reference.norm())
        error = float((directional - reference).norm()) / (denom if denom > 0 else 1.0)
        notes = [str(w.message).split(";")[0] for w in caught if issubclass(w.category, RuntimeWarning)]
        exact = bool(getattr(est, "exact", False))
        rows.append(HypergradRow(est.describe(), error, seconds, bool(info.converged.all()), exact,
                                 notes[0][:80] if notes else ""))
    result = HypergradCheck(rows=rows, reference=reference.reshape(-1), directions=kind)
    if stream is not None:
        stream.write(result.table() + "\n")
    return result
