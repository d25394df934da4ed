"""Quadratically regularized optimal transport: sparse plans by a semismooth Newton method.

The primal problem replaces the entropy of Sinkhorn by a weighted squared norm,

    min_P  <C, P> + eps/2 sum_ij P_ij^2 / (a_i b_j)   s.t.  P 1 = a,  P' 1 = b,  P >= 0,

whose optimal plan is sparse: ``P_ij = a_i b_j (f_i + g_j - C_ij)_+ / eps``. The
weights ``a_i b_j`` make ``eps`` a cost, as in entropic OT (the regularizer is the
chi-square divergence of ``P`` from ``a b'``), and let zero weights drop out. The
potentials maximize the concave, once continuously differentiable dual

    D(f, g) = <f, a> + <g, b> - 1/(2 eps) sum_ij a_i b_j (f_i + g_j - C_ij)_+^2,

whose gradient is the marginal error ``(a - P 1, b - P' 1)`` and whose generalized
Hessian is ``-H`` with

    H = [[diag(W 1), W], [W', diag(W' 1)]],    W_ij = a_i b_j [f_i + g_j > C_ij] / eps,

a graph Laplacian in disguise (positive semi-definite, with the null direction
``(1, -1)``: the potentials' gauge). Newton's method on ``-D`` converges in a few steps
once the support of the plan is found.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from ..implicit import Adjoint, Implicit, custom_root
from ..solvers import ConvergenceError, IterativeSolver, LinearSolver, Solution, Status
from ..solvers._precision import to_output, without_autocast
from ._api import Envelope
from ._dual_newton import newton_loop
from ._geometry import Geometry, matvec, rmatvec
from ._inputs import prepare_problem

__all__ = ["SemismoothNewton", "QuadraticOTResult", "quadratic_ot"]


def _dual(c, f, g, a, b, eps):
    """``(-D(f, g), P 1 - a, P' 1 - b, S)`` for the negated (convex) dual, with the
    slack ``S = (f_i + g_j - C_ij)_+``: ``P = diag(a) S diag(b) / eps``, so the sums over
    ``P`` are matrix-vector products with ``S``."""
    slack = (f[:, :, None] + g[:, None, :] - c).clamp_min(0.0)
    rows = matvec(slack, b)
    cols = rmatvec(a, slack)
    # sum_ij a_i b_j S_ij^2 / (2 eps) = <f, P 1> + <g, P' 1> - <C, P>, without another pass
    quadratic = 0.5 * (a * matvec(slack.square(), b)).sum(1) / eps
    objective = quadratic - (f * a).sum(1) - (g * b).sum(1)
    return objective, a * rows / eps - a, b * cols / eps - b, slack


def _split(z, n):
    return z[:, :n], z[:, n:]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SemismoothNewton(IterativeSolver):
    """Damped semismooth Newton on the dual of quadratically regularized OT, batched.

    Each step solves ``(H + delta I) d = -grad`` with Jacobi-preconditioned conjugate
    gradients (matrix-free: two products with the active weights ``W``, stored as a
    sparse CSR matrix when fewer than a quarter of them are nonzero), where the
    shift ``delta = tau * max(mean(diag H), |a| |b| / (eps (n + m))) * min(1, r)`` (``r`` the relative marginal
    error) removes the gauge and any empty rows of ``H`` and fades as the iterate
    converges, and takes the step ``alpha d`` with ``alpha`` halved per sample until
    the Armijo condition on the dual holds (or the step halves the marginal error:
    near the optimum the dual's decrease is below rounding). Converged when the marginal error
    ``sum |P 1 - a| + sum |P' 1 - b|`` is at most ``atol + rtol * sum(a)``.

    Args:
        rtol, atol: tolerances (``None``: ``1e-10, 1e-12`` in float64, ``1e-5, 1e-7``
            in float32).
        max_steps: trials per problem (accepted or halved).
        check_every: trials between two convergence checks.
        linear_solver: solver of the Newton systems. ``None``: a dense Cholesky
            factorization of ``H + delta I`` for small batches (``B (n + m)^2 <= 2^17``),
            else ``CG(rtol=1e-2)`` (an inexact Newton method).
        shift: ``tau`` above.
        armijo: sufficient-decrease constant in ``(0, 1/2)``.

    References:
        Lorenz, Manns and Meyer, Quadratically regularized optimal transport (2021),
        arXiv:1903.01112; Blondel, Seguy and Rolet, Smooth and Sparse Optimal Transport
        (2018), arXiv:1710.06276.
    """

    max_steps: int = 200
    check_every: int = 1
    linear_solver: LinearSolver | None = None
    shift: float = 1e-3
    armijo: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.linear_solver is not None and not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                f"SemismoothNewton: linear_solver must be a difflayers.solvers.LinearSolver, "
                f"got {type(self.linear_solver).__name__}."
            )
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"SemismoothNewton: shift must be a finite number > 0, got {self.shift!r}.")
        if not 0.0 < self.armijo < 0.5:
            raise ValueError(f"SemismoothNewton: armijo must be in (0, 0.5), got {self.armijo!r}.")

    def solve(self, c, a, b, eps: float, init=None):
        """Run the iterations on the dense cost ``c [B, n, m]``; returns
        ``(f, g, status, num_steps, residual)`` (no graph recorded)."""
        rtol, atol = self.tolerances(c.dtype)
        n = c.shape[1]
        if init is None:
            # g_j = eps + min_i C_ij over the weighted rows: every column starts with an active entry
            rows = torch.where(a[:, :, None] > 0, c, torch.inf)
            g = torch.where(b > 0, rows.amin(1) + eps, 0.0)
            f = torch.zeros_like(a)
        else:
            f, g = init

        def evaluate(z):
            objective, grad_f, grad_g, _ = _dual(c, *_split(z, n), a, b, eps)
            return objective, torch.cat([grad_f, grad_g], 1)

        def hessian(z):
            # W = diag(a) M diag(b) / eps on the support M of the plan; diag(W 1), diag(W' 1)
            f, g = _split(z, n)
            mask = (f[:, :, None] + g[:, None, :] - c) > 0
            w = a[:, :, None] * b[:, None, :] / eps
            m = mask.to(c.dtype)
            rows = a * matvec(m, b) / eps
            cols = b * rmatvec(a, m) / eps
            return rows, cols, mask, w

        with torch.no_grad():
            z, status, num_steps, err = newton_loop(
                evaluate, hessian, torch.cat([f, g], 1), n, a.sum(1),
                # the diagonal of H for a fully active plan
                a.sum(1) * b.sum(1) / (eps * (n + c.shape[2])),
                rtol=rtol, atol=atol, max_steps=self.max_steps, check_every=self.check_every,
                linear_solver=self.linear_solver, shift=self.shift, armijo=self.armijo,
            )
            state = {"z": z}
            f, g = _split(state["z"], n)
            # the gauge <a, f> = <b, g>; zero-weight points carry zero potentials
            shift = ((g * b).sum(1) - (f * a).sum(1)) / (a.sum(1) + b.sum(1))
            f = torch.where(a > 0, f + shift[:, None], 0.0)
            g = torch.where(b > 0, g - shift[:, None], 0.0)
        return f, g, status, num_steps, err


@dataclasses.dataclass(frozen=True)
class QuadraticOTResult(Solution):
    """Result of ``quadratic_ot`` (``value``: the regularized transport cost ``[B]``).

    Attributes:
        f, g: potentials with ``<a, f> = <b, g>``; ``P_ij = a_i b_j (f_i + g_j - C_ij)_+ / eps``.
        status, stats: per-problem ``Status``; ``num_steps``, ``residual`` (marginal
            error) and ``support`` (fraction of nonzero entries of the plan).
        potentials: ``(f, g)`` in the compute dtype when it differs from the inputs'
            (float32 for float16/bfloat16 inputs), else ``None``; ``plan`` uses them.

    ``value``, ``f``, ``g`` and ``plan`` have the inputs' dtype; the cost, weights and
    ``stats`` are in the compute dtype.
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor = dataclasses.field(repr=False)
    a: torch.Tensor = dataclasses.field(repr=False)
    b: torch.Tensor = dataclasses.field(repr=False)
    epsilon: float = 0.0
    batched: bool = True
    potentials: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    @property
    def plan(self) -> torch.Tensor:
        """The plan ``[B, n, m]``, exactly zero off its support."""
        f, g = (self.f, self.g) if self.potentials is None else self.potentials
        f, g = (f, g) if self.batched else (f[None], g[None])
        p = _plan(self.cost, f, g, self.a, self.b, self.epsilon)
        return to_output(p if self.batched else p[0], self.f.dtype)


def _plan(c, f, g, a, b, eps):
    return a[:, :, None] * b[:, None, :] * (f[:, :, None] + g[:, None, :] - c).clamp_min(0.0) / eps


def _dual_value(c, f, g, a, b, eps):
    """``D(f, g)``: the transport value at the optimum, differentiable in every argument."""
    return -_dual(c, f, g, a, b, eps)[0]


@without_autocast
def quadratic_ot(
    cost: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    epsilon: float,
    cost_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "sqeuclidean",
    solver: SemismoothNewton | None = None,
    adjoint: Adjoint | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    throw: bool = True,
) -> QuadraticOTResult:
    """Quadratically regularized optimal transport (sparse plans) between batches of measures.

    Solves, for every batch element,

        min_P  <C, P> + eps/2 sum_ij P_ij^2 / (a_i b_j)   s.t.  P 1 = a,  P' 1 = b,  P >= 0

    by a semismooth Newton method on its dual. The plan ``P_ij = a_i b_j (f_i + g_j -
    C_ij)_+ / eps`` has exact zeros: as ``eps -> 0`` its support shrinks to that of an
    unregularized optimal plan, and for any ``eps`` it is much sparser than an entropic
    plan (which is dense).

    Args:
        cost: ``[B, n, m]`` (or ``[n, m]``) dense cost; or ``None`` with point clouds.
        x, y: point clouds ``[B, n, d]``, ``[B, m, d]``; their cost ``cost_fn(x, y)`` is
            materialized (the Newton systems need it).
        a, b: nonnegative weights of equal mass (``None``: uniform); zero weights pad.
        epsilon: the regularization, ``> 0``, in the units of the cost.
        cost_fn: ``"sqeuclidean"``, ``"euclidean"`` or a callable, as in ``sinkhorn``.
        solver: a ``SemismoothNewton``.
        adjoint: ``dl.ot.Envelope()`` (default; ``value`` differentiable, gradient ``P``
            with respect to the cost) or ``dl.Implicit()`` (the implicit function theorem
            on the dual optimality conditions: ``f``, ``g``, ``plan`` and ``value``
            differentiable; the symmetric system is solved by CG).
        init: warm-start potentials ``(f, g)``.
        throw: raise ``ConvergenceError`` when a problem does not converge.

    Returns:
        A ``QuadraticOTResult`` (unbatched fields when no input is batched). Its
        ``value``, ``f``, ``g`` and ``plan`` have the inputs' dtype: float16 and
        bfloat16 inputs are solved and differentiated in float32 and cast back.

    Example:
        >>> import torch, difflayers as dl
        >>> x = torch.rand(30, 2, dtype=torch.float64)
        >>> y = torch.rand(40, 2, dtype=torch.float64)
        >>> res = dl.ot.quadratic_ot(x=x, y=y, epsilon=0.1)
        >>> float((res.plan > 0).double().mean()) < 0.5     # sparse
        True

    References:
        Blondel, Seguy and Rolet, Smooth and Sparse Optimal Transport (2018),
        arXiv:1710.06276; Lorenz, Manns and Meyer, Quadratically regularized optimal
        transport (2021), arXiv:1903.01112.
    """
    name = "quadratic_ot"
    solver = SemismoothNewton() if solver is None else solver
    adjoint = Envelope() if adjoint is None else adjoint
    if not isinstance(solver, SemismoothNewton):
        raise TypeError(f"{name}: solver must be a difflayers.ot.SemismoothNewton, got {type(solver).__name__}.")
    if not isinstance(adjoint, (Envelope, Implicit)):
        raise TypeError(f"{name}: adjoint must be Envelope() or Implicit(), got {type(adjoint).__name__}.")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"{name}: epsilon must be a finite number > 0, got {epsilon!r}.")
    geom, a, b, batched, ref = prepare_problem(name, cost, x, y, a, b, cost_fn, None, balanced=True)
    eps = float(epsilon)
    if init is not None:
        init = tuple(t.detach().to(a).expand_as(w) for t, w in zip(init, (a, b)))
    track = torch.is_grad_enabled()
    c = geom.dense()
    f, g, status, steps, err = solver.solve(c.detach(), a.detach(), b.detach(), eps, init)
    if isinstance(adjoint, Implicit) and track:
        f, g = _implicit(geom, f, g, a, b, eps, adjoint)
    if isinstance(adjoint, Envelope) or not track:
        f, g = f.detach(), g.detach()
    value = _dual_value(c, f, g, a, b, eps)
    with torch.no_grad():
        support = (_plan(c, f, g, a, b, eps) > 0).flatten(1).double().mean(1).to(a.dtype)
    out = (lambda t: t) if batched else (lambda t: t[0])
    dtype = ref.dtype  # 16-bit inputs were solved in float32: results cast back
    stats = {"num_steps": steps, "residual": err, "support": support}
    result = QuadraticOTResult(
        to_output(out(value), dtype), out(status), {k: out(v) for k, v in stats.items()}, f=to_output(out(f), dtype),
        g=to_output(out(g), dtype), cost=c, a=a, b=b, epsilon=eps, batched=batched,
        potentials=None if dtype == a.dtype else (out(f), out(g)),
    )
    if throw and not bool((status == int(Status.SUCCESS)).all()):
        raise ConvergenceError(name, QuadraticOTResult(value, status, stats, f=f, g=g, cost=c, a=a, b=b, epsilon=eps))
    return result


def _implicit(geom: Geometry, f, g, a, b, eps, adjoint: Implicit):
    """Potentials differentiable by the implicit function theorem.

    The optimality condition is the dual gradient, completed so that its Jacobian is
    symmetric positive definite:

        F(f, g) = (P 1 - a + a k / eps,  P' 1 - b - b k / eps),    k = <a, f> - <b, g>,

    on points of positive weight, times ``eps (n + m) / (|a| + |b|)`` (potential units)
    (``F = f`` or ``g`` on zero-weight points, whose potentials are pinned to 0).
    ``k = 0`` at the returned gauge, so ``F = 0`` there; its Jacobian ``H + w w' / eps``
    with ``w = (a, -b)`` adds to the Hessian ``H`` a rank-one term that is positive along
    the gauge direction ``(1, -1)``. Reverse mode
    solves ``(H + w w' / eps) v = dL/d(f, g)`` by CG.
    """
    n = a.shape[1]
    dense = geom.cost is not None

    def root(z, *params):
        c = params[0] if dense else geom.cost_fn(params[0], params[1])
        a_, b_ = params[-2], params[-1]
        f_, g_ = _split(z, n)
        _, grad_f, grad_g, _ = _dual(c, f_, g_, a_, b_, eps)
        k = ((a_ * f_).sum(1) - (b_ * g_).sum(1))[:, None] / eps
        # in units of the potentials: a scalar per problem keeps the Jacobian symmetric
        scale = eps * z.shape[1] / (a_.sum(1, keepdim=True) + b_.sum(1, keepdim=True))
        rows = torch.where(a_ > 0, scale * (grad_f + a_ * k), f_)
        cols = torch.where(b_ > 0, scale * (grad_g - b_ * k), g_)
        return torch.cat([rows, cols], 1)

    solution = torch.cat([f, g], 1)
    params = ((geom.cost,) if dense else (geom.x, geom.y)) + (a, b)
    z = custom_root(root, linear_solver=adjoint.linear_solver, symmetric=True)(lambda z0, *p: solution)(
        solution, *params
    )
    return _split(z, n)
