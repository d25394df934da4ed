"""Gauss-Newton and Levenberg-Marquardt for nonlinear least squares, batched.

Both minimize ``1/2 ||r(z)||^2`` over ``z [B, n]`` with residuals ``r [B, m]`` through
the normal equations of the linearized residual

    (J^T J + lambda I) d = -J^T r,        J = dr/dz  [B, m, n],

solved either densely (``J`` built with one vectorized pass of ``n`` Jacobian-vector
products; batched Cholesky) or matrix-free
(products ``v -> J^T (J v) + lambda v`` by ``jvp``/``vjp``, solved by any
``LinearSolver``, CG being the natural one). The Jacobian of ``r`` is block diagonal
over the batch, so sample ``b`` only ever sees its own block.

The matrix-free mode uses ``torch.func.vjp``, which ``torch.utils.checkpoint`` does not
support: differentiate it with ``Unroll`` or ``Implicit``, not ``CheckpointedUnroll``
(the dense mode supports all three).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch.func import jvp, vjp, vmap

from ._driver import batch_dot, batch_norm
from ._linear import LinearSolver
from ._nonlinear import NonlinearSolver
from ._operator import MatvecOperator
from ._problem import LeastSquaresProblem
from ._solution import Status

__all__ = ["GaussNewton", "LevenbergMarquardt"]


def _residual_fn(problem: LeastSquaresProblem, params) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: _flat(problem.residuals(z, params))


def _flat(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], r.shape[1:].numel())  # not -1: ambiguous for an empty batch


def _dense_jacobian(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, J)`` with ``J [B, m, n]``, from ``n`` vectorized Jacobian-vector products.

    Forward mode only, so that it also runs under ``torch.utils.checkpoint``
    (``torch.func``'s reverse mode refuses saved-tensor hooks).
    """
    r = fn(z)
    batch, n = z.shape
    eye = torch.eye(n, dtype=z.dtype, device=z.device).expand(batch, n, n)
    try:
        J = vmap(lambda v: jvp(fn, (z,), (v,))[1], in_dims=2, out_dims=2)(eye)
    except Exception:  # a function vmap cannot trace: one column at a time
        J = torch.stack([jvp(fn, (z,), (eye[:, :, i].contiguous(),))[1] for i in range(n)], dim=2)
    return r, J


def _bad_status(status: torch.Tensor) -> torch.Tensor:
    return (status == int(Status.BREAKDOWN)) | (status == int(Status.NONFINITE))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NormalEquationsSolver(NonlinearSolver):
    """Shared parts of Gauss-Newton and Levenberg-Marquardt."""

    linear_solver: LinearSolver | None = None
    max_steps: int = 128
    check_every: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.linear_solver is not None and not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                f"{type(self).__name__}: linear_solver must be a difflayers.solvers.LinearSolver such as CG(), "
                f"or None for a dense Cholesky factorization; got {type(self.linear_solver).__name__}."
            )

    def check_problem(self, problem):
        if not isinstance(problem, LeastSquaresProblem):
            raise TypeError(
                f"{type(self).__name__} solves LeastSquaresProblem only (it needs the residual vector r, "
                f"not just F); got {type(problem).__name__}. Wrap the residuals as LeastSquaresProblem(r), "
                "or use Newton for root, fixed-point and minimization problems."
            )

    @property
    def _dense(self) -> bool:
        return self.linear_solver is None

    def _linearize(self, fn, z):
        """Residuals, gradient ``g = J^T r`` and the data to solve with ``J^T J``.

        Dense: ``J^T J [B, n, n]``. Matrix-free: the pullback of ``r`` at ``z``.
        """
        if self._dense:
            r, J = _dense_jacobian(fn, z)
            g = torch.einsum("bmn,bm->bn", J, r)
            return r, g, torch.einsum("bmi,bmj->bij", J, J)
        r, pullback = vjp(fn, z)
        return r, pullback(r)[0], pullback

    def _solve(self, fn, z, gram, g, lam, x0):
        """``d = -(J^T J + lam I)^-1 g`` and which samples succeeded."""
        if self._dense:
            eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
            L, info = torch.linalg.cholesky_ex(gram + lam[:, None, None] * eye)
            d = torch.cholesky_solve(-g[:, :, None], L)[:, :, 0]
            ok = info == 0
        else:
            pullback = gram

            def normal(v):
                return pullback(jvp(fn, (z,), (v,))[1])[0] + lam[:, None] * v

            # Unit right-hand side, rescaled after: see Newton._direction.
            norm = batch_norm(g)
            scale = torch.where((norm > 0) & torch.isfinite(norm), norm, torch.ones_like(norm))[:, None]
            op = MatvecOperator(normal, rmatvec=normal, symmetric=True, positive_definite=True)
            sol = self.linear_solver.solve(op, -g / scale, x0=None if x0 is None else x0 / scale)
            d, ok = sol.value * scale, ~_bad_status(sol.status)
        ok = ok & torch.isfinite(d).all(dim=1)
        return torch.where(ok[:, None], d, torch.zeros_like(d)), ok

    def _accept(self, problem, trial, r, r_t, g, g_t, pred, sufficient, g0_norm):
        """Which trials to take: ``sufficient`` decrease of the cost, or, where the
        cost can no longer tell the points apart, a decrease of ``||J^T r||``.

        Near a minimum with nonzero residual the decrease predicted by the model falls
        below the rounding error of ``phi`` (about ``eps ||r|| ||y||``), and a test on
        ``phi`` rejects steps at random while ``||J^T r||`` still converges
        quadratically. So a trial that does not raise the cost beyond rounding is
        also accepted if it meets the tolerance (which keeps a step taken at the
        solution, as ``Truncated``/``OneStep`` differentiation does, from being lost)
        or, where ``pred <= sqrt(eps) phi``, if it lowers ``||J^T r||``.
        """
        rtol, atol = self.tolerances(trial.dtype)
        root_eps = math.sqrt(torch.finfo(trial.dtype).eps)
        cost, cost_t = 0.5 * r.square().sum(dim=1), 0.5 * r_t.square().sum(dim=1)
        finite = torch.isfinite(cost_t) & torch.isfinite(g_t).all(dim=1)
        level = cost_t <= cost * (1.0 + root_eps)
        gnorm_t = batch_norm(g_t)
        small = gnorm_t <= atol + rtol * problem.scale(trial, g0_norm)
        lower = (pred <= root_eps * cost) & (gnorm_t < batch_norm(g))
        return finite & (sufficient | (level & (small | lower)))

    def residual(self, problem, state, params):
        return batch_norm(state["g"]), problem.scale(state["z"], state["g0_norm"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussNewton(_NormalEquationsSolver):
    """Gauss-Newton with a per-sample backtracking line search.

    Minimizes ``1/2 ||r(z)||^2`` by solving the Gauss-Newton system and trying

        J^T J d = -J^T r,      z_trial = z + alpha d,

    from ``alpha = 1``. A trial is accepted when the cost ``phi = 1/2 ||r||^2`` is
    finite and satisfies the Armijo condition
    ``phi(z + alpha d) <= phi(z) + c alpha (J^T r)^T d`` (``c = armijo``); once the
    predicted decrease is below the rounding level of ``phi`` (``<= sqrt(eps) phi``,
    near a minimum with nonzero residual), a trial that does not raise ``phi`` beyond
    rounding is accepted if it lowers ``||J^T r||`` or meets the tolerance. A
    rejected sample keeps ``z`` and halves ``alpha``; an accepted one gets a new
    direction and ``alpha = 1``. This is ``LevenbergMarquardt``
    without damping, so it needs ``J`` of full column rank (``m >= n``): a singular
    ``J^T J`` stops the sample with ``Status.BREAKDOWN`` (use Levenberg-Marquardt
    there). ``max_steps`` counts trials. No host synchronization inside a step
    (except inside an iterative ``linear_solver``).

    Converged when ``||J^T r|| <= atol + rtol * ||J^T r at z0||`` (a stationary point;
    the residual itself need not vanish).

    Args:
        linear_solver: ``None`` builds ``J`` and factors ``J^T J`` by batched
            Cholesky; a ``LinearSolver`` (``CG()``) solves the normal equations
            matrix-free through ``jvp``/``vjp`` products.
        line_search: backtrack on the cost; ``False`` accepts every full step.
        armijo: sufficient-decrease constant ``c`` in (0, 1/2).
        min_step: smallest step length tried, in (0, 1); below it the sample stops
            with ``Status.LINE_SEARCH_FAILED``.
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> t = torch.linspace(0, 1, 8, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-1.5 * t)
        >>> problem = LeastSquaresProblem(lambda z, t, y: z[:, :1] * torch.exp(z[:, 1:] * t) - y)
        >>> z0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> GaussNewton().solve(problem, z0, (t, y)).value
        tensor([[ 2.0000, -1.5000]], dtype=torch.float64)

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed. (2006), section 10.3,
            DOI 10.1007/978-0-387-40065-5.
    """

    line_search: bool = True
    armijo: float = 1e-4
    min_step: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.line_search, bool):
            raise TypeError(f"GaussNewton: line_search must be True or False, got {self.line_search!r}.")
        if not 0.0 < self.armijo < 0.5:
            raise ValueError(f"GaussNewton: armijo must be in (0, 0.5), got {self.armijo!r}.")
        if not 0.0 < self.min_step < 1.0:
            raise ValueError(f"GaussNewton: min_step must be in (0, 1), got {self.min_step!r}.")

    def _direction(self, fn, z, g, gram):
        zero = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        d, ok = self._solve(fn, z, gram, g, zero, None)
        # A non-finite gradient is the driver's NONFINITE, not a breakdown.
        return d, ~ok & torch.isfinite(g).all(dim=1)

    def init(self, problem, z0, params):
        fn = _residual_fn(problem, params)
        r, g, gram = self._linearize(fn, z0)
        d, failed = self._direction(fn, z0, g, gram)
        alpha = torch.ones(z0.shape[0], dtype=z0.dtype, device=z0.device)
        failure = torch.where(failed, int(Status.BREAKDOWN), 0).to(torch.int64)
        return {"z": z0, "r": r, "g": g, "d": d, "alpha": alpha, "g0_norm": batch_norm(g), "failure": failure}

    def step(self, problem, state, params):
        fn = _residual_fn(problem, params)
        z, r, g, d, alpha = state["z"], state["r"], state["g"], state["d"], state["alpha"]
        trial = z + alpha[:, None] * d
        r_t, g_t, gram_t = self._linearize(fn, trial)
        if self.line_search:
            # phi(z) - phi(z_t) = 1/2 (r - r_t).(r + r_t), which cancels less than a difference of costs
            decrease = 0.5 * batch_dot(r - r_t, r + r_t)
            pred = -alpha * batch_dot(g, d)
            accept = self._accept(
                problem, trial, r, r_t, g, g_t, pred, decrease >= self.armijo * pred, state["g0_norm"]
            )
        else:
            accept = torch.ones_like(alpha, dtype=torch.bool)
        d_t, failed = self._direction(fn, trial, g_t, gram_t)
        a = accept[:, None]
        alpha_new = torch.where(accept, torch.ones_like(alpha), 0.5 * alpha)
        code = torch.where(accept & failed, int(Status.BREAKDOWN), 0)
        code = torch.where(~accept & (alpha_new < self.min_step), int(Status.LINE_SEARCH_FAILED), code)
        failure = state["failure"]
        return {
            "z": torch.where(a, trial, z),
            "r": torch.where(a, r_t, r),
            "g": torch.where(a, g_t, g),
            "d": torch.where(a, d_t, d),
            "alpha": alpha_new,
            "g0_norm": state["g0_norm"],
            "failure": torch.where(failure == 0, code, failure),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class LevenbergMarquardt(_NormalEquationsSolver):
    """Levenberg-Marquardt with per-sample damping updated by the gain ratio.

    Minimizes ``phi(z) = 1/2 ||r(z)||^2``. Each step solves the damped system

        (J^T J + lambda I) d = -J^T r

    and compares the actual decrease of the cost with the decrease predicted by the
    linear model, ``pred = 1/2 d^T (lambda d - J^T r)``:

        rho = (phi(z) - phi(z + d)) / pred.

    Nielsen's rule updates each sample's damping: if ``rho > 0`` the step is taken
    and ``lambda <- lambda * max(1/3, 1 - (2 rho - 1)^3)``, ``nu <- 2``; otherwise
    ``z`` is kept, ``lambda <- lambda * nu`` and ``nu <- 2 nu``. Where ``pred`` is
    below the rounding level of ``phi`` (``<= sqrt(eps) phi``) ``rho`` is noise, and
    a step that does not raise ``phi`` beyond rounding is taken (with
    ``lambda <- lambda / 3``) if it lowers ``||J^T r||`` or meets the tolerance. Large ``lambda`` gives
    short gradient-descent steps, small ``lambda`` Gauss-Newton steps, so the method
    copes with rank-deficient Jacobians and far starts. The initial damping is
    ``tau * max_i (J^T J)_ii`` (dense) or ``tau * ||J g||^2 / ||g||^2`` with
    ``g = J^T r`` (matrix-free, where the diagonal is not available).
    ``max_steps`` counts trials. No host synchronization inside a step (except
    inside an iterative ``linear_solver``).

    Converged when ``||J^T r|| <= atol + rtol * ||J^T r at z0||``. A sample whose
    rejected steps have become negligible (``||d|| <= eps (||z|| + eps)``) or whose
    damping overflows stops with ``Status.LINE_SEARCH_FAILED``.

    Args:
        linear_solver: ``None`` builds ``J`` and factors ``J^T J + lambda I`` by
            batched Cholesky; a ``LinearSolver`` (``CG()``) solves the damped normal
            equations matrix-free through ``jvp``/``vjp`` products.
        initial_damping: ``tau`` above, > 0 (1e-3 by default; 1e-6 for a good start).
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> t = torch.linspace(0, 1, 8, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-1.5 * t)
        >>> problem = LeastSquaresProblem(lambda z, t, y: z[:, :1] * torch.exp(z[:, 1:] * t) - y)
        >>> z0 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
        >>> LevenbergMarquardt().solve(problem, z0, (t, y)).value
        tensor([[ 2.0000, -1.5000]], dtype=torch.float64)

    References:
        Moré, The Levenberg-Marquardt algorithm: implementation and theory (1978),
            DOI 10.1007/BFb0067700.
        Nielsen, Damping parameter in Marquardt's method, IMM-REP-1999-05 (1999).
        Nocedal & Wright, Numerical Optimization, 2nd ed. (2006), section 10.3,
            DOI 10.1007/978-0-387-40065-5.
    """

    initial_damping: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 < self.initial_damping < float("inf")):
            raise ValueError(f"LevenbergMarquardt: initial_damping must be > 0, got {self.initial_damping!r}.")

    def init(self, problem, z0, params):
        fn = _residual_fn(problem, params)
        r, g, gram = self._linearize(fn, z0)
        if self._dense:
            curvature = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1)
        else:
            Jg = jvp(fn, (z0,), (g,))[1]
            curvature = Jg.square().sum(dim=1) / g.square().sum(dim=1)
        tiny = torch.finfo(z0.dtype).tiny
        lam = self.initial_damping * torch.nan_to_num(curvature, nan=1.0, posinf=1.0).clamp_min(tiny)
        state = {"z": z0, "r": r, "g": g, "lam": lam, "nu": torch.full_like(lam, 2.0), "g0_norm": batch_norm(g)}
        if self._dense:
            state["gram"] = gram
        state["failure"] = torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device)
        return state

    def step(self, problem, state, params):
        fn = _residual_fn(problem, params)
        z, r, g, lam, nu = state["z"], state["r"], state["g"], state["lam"], state["nu"]
        gram = state["gram"] if self._dense else vjp(fn, z)[1]
        d, ok = self._solve(fn, z, gram, g, lam, None)
        trial = z + d
        r_t, g_t, gram_t = self._linearize(fn, trial)

        decrease = 0.5 * batch_dot(r - r_t, r + r_t)
        pred = 0.5 * (lam * d.square().sum(dim=1) - batch_dot(g, d))
        positive = pred > 0
        rho = decrease / torch.where(positive, pred, torch.ones_like(pred))
        gain = positive & (rho > 0)
        accept = ok & self._accept(problem, trial, r, r_t, g, g_t, pred, gain, state["g0_norm"])

        # Accepted without a meaningful gain ratio (rounding regime): shrink as for a good step.
        shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
        shrink = torch.where(gain & torch.isfinite(shrink), shrink, torch.full_like(shrink, 1.0 / 3.0))
        lam_new = torch.where(accept, lam * shrink, lam * nu)
        nu_new = torch.where(accept, torch.full_like(nu, 2.0), 2.0 * nu)

        eps = torch.finfo(z.dtype).eps
        negligible = ok & (batch_norm(d) <= eps * (batch_norm(z) + eps))
        stalled = ~accept & (negligible | ~torch.isfinite(lam_new))
        failure = state["failure"]
        failure = torch.where((failure == 0) & stalled, int(Status.LINE_SEARCH_FAILED), failure)

        a = accept[:, None]
        new = {
            "z": torch.where(a, trial, z),
            "r": torch.where(a, r_t, r),
            "g": torch.where(a, g_t, g),
            "lam": lam_new,
            "nu": nu_new,
            "g0_norm": state["g0_norm"],
        }
        if self._dense:
            new["gram"] = torch.where(accept[:, None, None], gram_t, state["gram"])
        new["failure"] = failure
        return new
