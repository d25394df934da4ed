"""Estimators evaluated at a solved inner problem: implicit (CG, MINRES, GMRES, Neumann,
dense), one-step, finite-difference and penalty.

All of them first solve ``G(w, lam) = 0`` from ``w0`` with the estimator's inner solver
(without recording), then combine derivatives at the solution ``w*``.
"""

from __future__ import annotations

import torch
from torch.func import grad

from ..solvers import JacobianOperator, KrylovSolver, MinimizeProblem, Neumann, batch_norm
from ._estimators import (
    FiniteDifference,
    ImplicitDense,
    ImplicitNeumann,
    OneStep,
    Penalty,
    _Implicit,
    default_inner_solver,
)
from ._problem import BilevelProblem
from ._tree import Tree, leaves

__all__ = ["solve_inner", "implicit_estimate"]


def _combine(fn, *trees: Tree) -> Tree:
    if isinstance(trees[0], torch.Tensor):
        return fn(*trees)
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def _per_problem(values: torch.Tensor, like: torch.Tensor, batched: bool) -> torch.Tensor:
    """Broadcast a ``[B]`` tensor against a leaf (``[B, ...]`` batched, any shape otherwise)."""
    if batched:
        return values.reshape(values.shape[:1] + (1,) * (like.dim() - 1))
    return values.reshape(())


def solve_inner(problem: BilevelProblem, solver, x0: torch.Tensor, lam: Tree):
    """Solve the inner problem from ``x0`` without recording; returns the ``Solution``."""
    if solver is None:
        solver = default_inner_solver(problem.inner.kind, problem.inner.symmetric)
    with torch.no_grad():
        sol = solver.solve(problem.solver_problem(), x0, tuple(leaves(lam)))
    return sol


def _largest_eigenvalue(J: JacobianOperator, x: torch.Tensor, iterations: int = 20) -> float:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    estimate = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        v = v / batch_norm(v).clamp_min(torch.finfo(x.dtype).tiny)[:, None]
        w = J.mv(v)
        estimate = batch_norm(w)
        v = w
    return float(estimate.max()) if estimate.numel() else 1.0  # any step size serves an empty batch


def _grad_lam_inner(problem: BilevelProblem, x: torch.Tensor, lam: Tree) -> Tree:
    """``grad_lam g(x, lam)`` as a tree (inner objectives)."""
    return grad(lambda lam_: problem.inner_value(x, lam_).sum())(lam)


def _require_objective(problem: BilevelProblem, estimator) -> None:
    if problem.inner.kind != "objective":
        raise TypeError(
            f"hypergradient: {type(estimator).__name__} needs an inner objective g(w, lam) (it differentiates g "
            f"with respect to lam); got a {type(problem.inner).__name__} inner problem. Use ImplicitGMRES, "
            "OneStep or an unrolled estimator for fixed points and roots."
        )


def implicit_estimate(problem: BilevelProblem, estimator, x0: torch.Tensor, lam: Tree, adjoint0):
    """Run an estimator of this module; returns a dict of results for ``HypergradientInfo``."""
    if isinstance(estimator, (FiniteDifference, Penalty)):
        _require_objective(problem, estimator)
    if isinstance(estimator, _Implicit) and estimator.needs_symmetric and not problem.inner.symmetric:
        raise TypeError(
            f"hypergradient: {type(estimator).__name__} needs a symmetric Jacobian dG/dw (an inner objective, or "
            f"Root(R, symmetric=True)); got a {type(problem.inner).__name__} inner problem whose Jacobian is not "
            "declared symmetric. Use ImplicitGMRES (or ImplicitDense for small problems)."
        )
    sol = solve_inner(problem, estimator.inner_solver, x0, lam)
    x = sol.value.detach()
    out = {
        "x": x,
        "inner_residual": sol.stats["residual"],
        "inner_steps": sol.stats["num_steps"],
        "inner_status": sol.status,
        "statuses": [("inner solve", sol)],
    }
    if isinstance(estimator, Penalty):
        return _penalty(problem, estimator, x, lam, out)
    f_x, f_lam, values = problem.outer_grads(x, lam)
    out["values"] = values

    if isinstance(estimator, OneStep):
        mixed = problem.mixed_vjp(x, lam, f_x)
        out["grad"] = _combine(lambda a, b: a - estimator.step_size * b, f_lam, mixed)
        return out

    if isinstance(estimator, FiniteDifference):
        norm = batch_norm(f_x)
        e = estimator.epsilon / torch.where(norm > 0, norm, torch.ones_like(norm))
        plus = _grad_lam_inner(problem, x + e[:, None] * f_x, lam)
        minus = _grad_lam_inner(problem, x - e[:, None] * f_x, lam)

        def combine(a, p, m):
            return a - estimator.step_size * (p - m) / (2 * _per_problem(e, p, problem.batched))

        out["grad"] = _combine(combine, f_lam, plus, minus)
        return out

    # Implicit function theorem. G(w*(lam), lam) = 0 gives dw*/dlam = -(dG/dw)^-1 dG/dlam, so
    #     (dG/dw)^T v = df/dw          (one batched linear solve, v [B, n])
    #     dF/dlam = df/dlam - (dG/dlam)^T v.
    symmetric = problem.inner.symmetric
    J = JacobianOperator(
        lambda z: problem.root(z, lam), x, symmetric=symmetric, positive_definite=problem.inner.kind == "objective"
    )
    if isinstance(estimator, ImplicitNeumann):
        step = estimator.step_size
        if step is None:
            if problem.inner.kind == "fixed_point":
                step = 1.0
            elif symmetric:
                step = 1.0 / _largest_eigenvalue(J, x)
            else:
                raise ValueError(
                    "hypergradient: ImplicitNeumann cannot pick a step size for a nonsymmetric root problem; "
                    "expected step_size=... with |1 - step_size * eig(dR/dw)| < 1. Pass it, or use ImplicitGMRES."
                )
        solver = estimator.linear_solver(step)
    elif isinstance(estimator, ImplicitDense):
        solver = estimator.linear_solver(symmetric=problem.inner.kind == "objective")
    else:
        solver = estimator.linear_solver()
    warm = adjoint0 if isinstance(solver, KrylovSolver) and not isinstance(solver, Neumann) else None
    lin = solver.solve(J.T, f_x, x0=warm)
    v = lin.value.detach()
    mixed = problem.mixed_vjp(x, lam, v)
    out["grad"] = _combine(lambda a, b: a - b, f_lam, mixed)
    out["adjoint"] = v
    out["linear_residual"] = lin.stats["residual"]
    out["linear_steps"] = lin.stats["num_steps"]
    out["linear_status"] = lin.status
    # A Neumann series with rtol = 0 is a fixed budget of terms, not a solve to a tolerance.
    if not (isinstance(estimator, ImplicitNeumann) and estimator.rtol == 0):
        out["statuses"].append(("adjoint linear solve", lin))
    return out


def _penalty(problem: BilevelProblem, estimator: Penalty, x: torch.Tensor, lam: Tree, out: dict) -> dict:
    # F2SA: with y_rho = argmin_y g(y) + f(y) / rho, the value-function penalty gives
    #     dF/dlam = df/dlam(y_rho) + rho (grad_lam g(y_rho) - grad_lam g(w*)) + O(1/rho).
    solver = estimator.penalized_solver()
    layout = problem.lam_layout
    params = tuple(leaves(lam))
    g_star = _grad_lam_inner(problem, x, lam)
    _, _, values = problem.outer_grads(x, lam)
    out["values"] = values

    def estimate(rho: float):
        def penalized(z, *ls):
            lam_ = layout.from_leaves(ls)
            return problem.inner_value(z, lam_) + problem.outer_value(z, lam_) / rho

        with torch.no_grad():
            sol = solver.solve(MinimizeProblem(penalized), x, params)
        y = sol.value.detach()
        _, f_lam, _ = problem.outer_grads(y, lam)
        g_y = _grad_lam_inner(problem, y, lam)
        return _combine(lambda a, b, c: a + rho * (b - c), f_lam, g_y, g_star), sol

    rho = float(estimator.multiplier)
    first, sol = estimate(rho)
    out["statuses"].append(("penalized inner solve", sol))
    out["extra"] = {"penalized_residual": sol.stats["residual"], "penalized_steps": sol.stats["num_steps"]}
    if estimator.extrapolate:
        second, sol2 = estimate(2.0 * rho)
        out["statuses"].append(("penalized inner solve (2 rho)", sol2))
        # Richardson: the O(1/rho) terms of 2 E(2 rho) - E(rho) cancel.
        first = _combine(lambda a, b: 2.0 * b - a, first, second)
    out["grad"] = first
    return out
