"""Accuracy of the batched interior point on random LP, QP and SOCP suites.

Each suite holds 100 problems (four batches of 25) with known optima. For each, the
table gives our statuses, the largest and median relative objective error against
Clarabel (solved one problem at a time at tolerance 1e-10), the wall time of one
batched ``solve_conic`` call per batch against Clarabel's loop, and for a mixed
batch of feasible, infeasible and unbounded LPs the detected statuses. Two batches of
rank-deficient LPs (dependent equality rows; fewer rows than variables and no ``P``),
where the KKT matrix is singular, give our statuses and how many match Clarabel's.

    python -m benchmarks.run conic_suites [--quick]
"""

from __future__ import annotations

import time
import warnings

import torch

from difflayers.conic import Cones, solve_conic
from difflayers.solvers import Status
from difflayers.testing import (
    concat_problems,
    dual_infeasible_lp,
    primal_infeasible_lp,
    random_conic_qp,
    random_lp,
    random_socp,
    reference_solve,
)

from ._harness import environment

SUITES = {
    "LP": lambda s: [random_lp(25, n, m, m_eq=e, seed=s + k) for k, (n, m, e) in enumerate(
        [(6, 12, 0), (10, 20, 2), (15, 25, 3), (8, 30, 0)])],
    "QP": lambda s: [random_conic_qp(25, n, m, m_eq=e, rank=r, seed=s + k) for k, (n, m, e, r) in enumerate(
        [(10, 8, 2, None), (10, 10, 2, 4), (8, 10, 1, 0), (20, 15, 3, None)])],
    "SOCP": lambda s: [random_socp(25, n, soc, m_ineq=i, m_eq=e, quadratic=qd, seed=s + k)
                       for k, (n, soc, i, e, qd) in enumerate(
        [(5, (3, 4), 0, 0, False), (8, (3, 4, 5), 2, 1, False), (10, (2, 1, 6, 3), 4, 2, False),
         (6, (4, 4), 3, 0, True)])],
}


def _objective(P, q, x):
    obj = (q * x).sum(1)
    if P is not None:
        obj = obj + 0.5 * (x * (P @ x[..., None])[..., 0]).sum(1)
    return obj


def run(repeats: int = 3, device: str = "cpu", quick: bool = False) -> str:
    torch.set_num_threads(1)
    rows = []
    names = ["LP"] if quick else list(SUITES)
    for name in names:
        batches = SUITES[name](100)[: 1 if quick else None]
        errors, statuses, t_ours, t_ref = [], [], 0.0, 0.0
        for problems in batches:
            P, q, A, b, cones = problems
            args = [None if t is None else t.to(device) for t in (P, q, A, b)]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                sol = solve_conic(*args, cones, on_failure="nan")
                times.append(time.perf_counter() - start)
            t_ours += sorted(times)[len(times) // 2]
            start = time.perf_counter()
            ref = reference_solve(P, q, A, b, cones)
            t_ref += time.perf_counter() - start
            obj = _objective(P, q, sol.value.cpu())
            errors.append((obj - ref.objective).abs() / ref.objective.abs().clamp_min(1.0))
            statuses.append(sol.status.cpu())
        err = torch.cat(errors)
        status = torch.cat(statuses)
        counts = {Status(int(s)).name: int((status == s).sum()) for s in status.unique()}
        rows.append({
            "suite": f"{name} ({err.numel()} problems)",
            "statuses": ", ".join(f"{k} {v}" for k, v in counts.items()),
            "max rel. objective error": f"{float(err.max()):.1e}",
            "median": f"{float(err.median()):.1e}",
            "difflayers batched (ms)": f"{1e3 * t_ours:.0f}",
            "Clarabel loop (ms)": f"{1e3 * t_ref:.0f}",
        })
    # one batch mixing feasible, primal infeasible and unbounded problems
    mixed = concat_problems([random_lp(6, 8, 16, seed=1), primal_infeasible_lp(3, 8, 16, seed=2),
                             dual_infeasible_lp(3, 8, 16, seed=3)])
    P, q, A, b, cones = mixed
    with warnings.catch_warnings():  # the failed elements are the point here
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = solve_conic(P, q, A, b, cones, on_failure="mask")
    names = [Status(int(s)).name for s in sol.status]
    rows.append({
        "suite": "mixed LP batch (6 + 3 + 3)",
        "statuses": ", ".join(f"{k} {names.count(k)}" for k in dict.fromkeys(names)),
        "max rel. objective error": "—", "median": "—",
        "difflayers batched (ms)": "—", "Clarabel loop (ms)": "—",
    })
    rows += _rank_deficient_rows(quick)
    head = list(rows[0])
    lines = [f"### Cone-program suites, float64, {device}: {environment()}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def _rank_deficient(batch: int, seed: int):
    """Two batches of rank-deficient LPs, half of each feasible and bounded.

    * dependent equality rows: ``A_eq`` stacks two random rows and a copy of them,
      with ``x >= 0``; the copy's right-hand side is consistent (optimal) or shifted
      (primal infeasible);
    * fewer rows than variables: ``min q'x s.t. G x <= h`` with 3 rows and 6 variables;
      ``q = -G'y`` with ``y > 0`` (bounded) or random (unbounded).
    """
    g = torch.Generator().manual_seed(seed)
    n, half = 6, batch // 2
    E = torch.randn(batch, 2, n, generator=g, dtype=torch.float64)
    A_eq = torch.cat([E, E], dim=1)
    x0 = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    b_eq = (A_eq @ x0[..., None])[..., 0]
    b_eq[half:, 2:] += 1.0  # the copy asks for other values: no point satisfies both
    q = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1  # bounded below on x >= 0
    A1 = torch.cat([A_eq, -torch.eye(n, dtype=torch.float64).expand(batch, n, n)], dim=1)
    b1 = torch.cat([b_eq, torch.zeros(batch, n, dtype=torch.float64)], dim=1)
    first = (None, q, A1, b1, Cones(zero=4, nonneg=n))
    G = torch.randn(batch, 3, n, generator=g, dtype=torch.float64)
    h = torch.rand(batch, 3, generator=g, dtype=torch.float64) + 0.1  # x = 0 strictly feasible
    y = torch.rand(batch, 3, generator=g, dtype=torch.float64) + 0.1
    q2 = -(G.transpose(1, 2) @ y[..., None])[..., 0]
    q2[half:] = torch.randn(batch - half, n, generator=g, dtype=torch.float64)
    second = (None, q2, G, h, Cones(nonneg=3))
    return [("dependent equality rows", first), ("3 rows, 6 variables, no P", second)]


def _rank_deficient_rows(quick: bool):
    rows = []
    batch = 8 if quick else 40
    for name, (P, q, A, b, cones) in _rank_deficient(batch, seed=7):
        with warnings.catch_warnings():  # infeasible and unbounded elements are the point here
            warnings.simplefilter("ignore", RuntimeWarning)
            sol = solve_conic(P, q, A, b, cones, on_failure="mask")
        names = [Status(int(s)).name for s in sol.status]
        ref = reference_solve(P, q, A, b, cones)
        same = sum(ours == theirs for ours, theirs in zip(names, ref.status))
        both = torch.tensor([o == t == "SUCCESS" for o, t in zip(names, ref.status)])
        err = ((q[both] * sol.x[both]).sum(1) - ref.objective[both]).abs() / ref.objective[both].abs().clamp_min(1.0)
        rows.append({
            "suite": f"rank-deficient LPs: {name} ({batch})",
            "statuses": ", ".join(f"{k} {names.count(k)}" for k in dict.fromkeys(names))
            + f"; {same}/{batch} as Clarabel",
            "max rel. objective error": f"{float(err.max()):.1e}" if len(err) else "—",
            "median": f"{float(err.median()):.1e}" if len(err) else "—",
            "difflayers batched (ms)": "—", "Clarabel loop (ms)": "—",
        })
    return rows
