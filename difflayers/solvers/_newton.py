"""Newton's method with a per-sample backtracking line search, dense or Newton-Krylov."""

from __future__ import annotations

import dataclasses

import torch

from ._dense import LU
from ._driver import batch_norm
from ._linear import LinearSolver
from ._nonlinear import NonlinearSolver
from ._operator import JacobianOperator
from ._solution import Status

__all__ = ["Newton"]


def _half_square(f: torch.Tensor) -> torch.Tensor:
    return 0.5 * f.square().sum(dim=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Newton(NonlinearSolver):
    """Newton's method on the root form ``F(z) = 0``, with a per-sample line search.

    Each sample solves the Newton system at its iterate ``z`` and tries

        J(z) d = -F(z),    J = dF/dz,    z_trial = z + alpha d,

    starting from ``alpha = 1``. With ``line_search=True`` a trial is accepted when
    the merit ``m(z) = 1/2 ||F(z)||^2`` is finite and satisfies the Armijo condition

        m(z + alpha d) <= (1 - 2 c alpha) m(z),     c = armijo,

    (``-2 m(z)`` is the slope of ``m`` along the exact Newton direction), or when the
    trial already meets the tolerance (so that a step taken at the solution, as
    ``Truncated``/``OneStep`` differentiation does, is not lost to rounding). A
    rejected sample keeps ``z`` and halves ``alpha``; an accepted one gets a new
    direction and ``alpha = 1``. Samples are independent: each one backtracks on its
    own, inside the batched loop, without host synchronization (the line search is
    spread over driver steps). **``max_steps`` counts trials**, accepted or not: one
    trial costs one evaluation of ``F`` and one linear solve.

    Works on every problem kind through ``problem.root``: ``F(z)`` for a
    ``RootProblem``, ``z - T(z)`` for a ``FixedPointProblem``, ``grad f(z)`` for a
    ``MinimizeProblem`` (then the merit is ``1/2 ||grad f||^2``, so Newton may also
    stop at saddle points or maxima of ``f``: it finds stationary points), and
    ``J_r^T r`` for a ``LeastSquaresProblem`` (prefer ``LevenbergMarquardt`` there).

    The Jacobian is never formed by hand: it is a ``JacobianOperator`` (products by
    ``torch.func.jvp``). A dense linear solver (the default ``LU()``) materializes it
    with one vectorized pass of ``n`` Jacobian-vector products; a Krylov solver
    (``GMRES()``, ``CG()`` for symmetric positive definite Jacobians, ``MINRES()``
    for symmetric indefinite ones) gives matrix-free Newton-Krylov. Krylov solves
    check their own convergence, so they synchronize with the host inside a step.

    Converged when ``||F(z)|| <= atol + rtol * scale``, with ``scale = ||F(z0)||``
    (``||z||`` for fixed-point problems).

    Failures, per sample: a non-finite direction or a linear solve that reports
    ``BREAKDOWN``/``NONFINITE`` (a singular Jacobian) stops that sample with
    ``Status.BREAKDOWN``; ``alpha < min_step`` stops it with
    ``Status.LINE_SEARCH_FAILED``; other samples carry on.

    Args:
        linear_solver: solver of the Newton systems; ``None`` means ``LU()``
            (dense, exact). Pass ``GMRES()``/``CG()``/``MINRES()`` for matrix-free
            Newton-Krylov on large systems.
        line_search: backtrack on the merit ``1/2 ||F||^2``; ``False`` accepts every
            full Newton step (fastest near the solution, may diverge far from it).
        armijo: sufficient-decrease constant ``c`` in (0, 1/2).
        min_step: smallest step length ``alpha`` tried, in (0, 1).
        rtol, atol, check_every: see ``IterativeSolver``.
        max_steps: budget of trials (accepted or rejected) per sample.

    Example:
        >>> c = torch.tensor([[2.0], [9.0]], dtype=torch.float64)
        >>> problem = RootProblem(lambda z, c: z**2 - c)
        >>> Newton().solve(problem, torch.ones(2, 1, dtype=torch.float64), (c,)).value
        tensor([[1.4142],
                [3.0000]], dtype=torch.float64)

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed. (2006), chapters 3 and 11,
            DOI 10.1007/978-0-387-40065-5.
        Dennis & Schnabel, Numerical Methods for Unconstrained Optimization and
            Nonlinear Equations (1996), section 6.3, DOI 10.1137/1.9781611971200.
        Knoll & Keyes, Jacobian-free Newton-Krylov methods (2004),
            DOI 10.1016/j.jcp.2003.08.010.
    """

    linear_solver: LinearSolver | None = None
    line_search: bool = True
    armijo: float = 1e-4
    min_step: float = 1e-8
    max_steps: int = 64
    check_every: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.linear_solver is not None and not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                "Newton: linear_solver must be a difflayers.solvers.LinearSolver such as LU(), GMRES() or CG(), "
                f"or None for LU(); got {type(self.linear_solver).__name__}."
            )
        if not isinstance(self.line_search, bool):
            raise TypeError(f"Newton: line_search must be True or False, got {self.line_search!r}.")
        if not 0.0 < self.armijo < 0.5:
            raise ValueError(f"Newton: armijo must be in (0, 0.5), got {self.armijo!r}.")
        if not 0.0 < self.min_step < 1.0:
            raise ValueError(f"Newton: min_step must be in (0, 1), got {self.min_step!r}.")

    def _solver(self) -> LinearSolver:
        return LU() if self.linear_solver is None else self.linear_solver

    def _direction(self, problem, z, f, params, x0):
        """Newton direction ``d = -J(z)^-1 F(z)`` and the samples where it failed."""
        # Solve for the direction of unit right-hand side, then rescale: an iterative
        # solver's tolerance becomes relative to ||F|| (its atol would otherwise cap
        # the accuracy of late Newton steps), and a step taken at the solution still
        # iterates, so that differentiating it (OneStep/Truncated) sees J^-1.
        norm = batch_norm(f)
        scale = torch.where((norm > 0) & torch.isfinite(norm), norm, torch.ones_like(norm))[:, None]
        if x0 is not None:
            x0 = x0 / scale
        jac = JacobianOperator(lambda z: problem.root(z, params), z, symmetric=problem.symmetric)
        sol = self._solver().solve(jac, -f / scale, x0=x0)
        d = sol.value * scale
        finite = torch.isfinite(d).all(dim=1)
        failed = ~finite | (sol.status == int(Status.BREAKDOWN)) | (sol.status == int(Status.NONFINITE))
        # A non-finite F is the driver's NONFINITE, not a breakdown of the linear solve;
        # F = 0 exactly (a root) is success whatever the solver says about it.
        failed = failed & torch.isfinite(f).all(dim=1) & (f != 0).any(dim=1)
        # Zero directions keep failed samples finite while the rest of the batch runs.
        d = torch.where((failed | ~finite)[:, None], torch.zeros_like(d), d)
        return d, failed

    def init(self, problem, z0, params):
        f = problem.root(z0, params)
        d, failed = self._direction(problem, z0, f, params, None)
        batch = z0.shape[0]
        failure = torch.where(failed, int(Status.BREAKDOWN), 0).to(torch.int64)
        alpha = torch.ones(batch, dtype=z0.dtype, device=z0.device)
        return {"z": z0, "f": f, "d": d, "alpha": alpha, "f0_norm": batch_norm(f), "failure": failure}

    def step(self, problem, state, params):
        z, f, d, alpha, f0_norm = state["z"], state["f"], state["d"], state["alpha"], state["f0_norm"]
        trial = z + alpha[:, None] * d
        f_trial = problem.root(trial, params)
        if self.line_search:
            merit, merit_trial = _half_square(f), _half_square(f_trial)
            armijo = merit_trial <= (1.0 - 2.0 * self.armijo * alpha) * merit
            rtol, atol = self.tolerances(z.dtype)
            done = batch_norm(f_trial) <= atol + rtol * problem.scale(trial, f0_norm)
            accept = (torch.isfinite(merit_trial) & armijo) | done
        else:
            accept = torch.ones_like(alpha, dtype=torch.bool)
        z_new = torch.where(accept[:, None], trial, z)
        f_new = torch.where(accept[:, None], f_trial, f)
        # Rejected samples re-solve the same system: starting a Krylov solver from the
        # old direction ends it at once.
        x0 = torch.where(accept[:, None], torch.zeros_like(d), d)
        d_new, failed = self._direction(problem, z_new, f_new, params, x0)
        d_new = torch.where(accept[:, None], d_new, d)
        alpha_new = torch.where(accept, torch.ones_like(alpha), 0.5 * alpha)

        failure = state["failure"]
        code = torch.where(accept & failed, int(Status.BREAKDOWN), 0)
        code = torch.where(~accept & (alpha_new < self.min_step), int(Status.LINE_SEARCH_FAILED), code)
        failure = torch.where(failure == 0, code, failure)  # the first failure is the one reported
        return {"z": z_new, "f": f_new, "d": d_new, "alpha": alpha_new, "f0_norm": f0_norm, "failure": failure}

    def residual(self, problem, state, params):
        return batch_norm(state["f"]), problem.scale(state["z"], state["f0_norm"])
