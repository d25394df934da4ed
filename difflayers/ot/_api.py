"""``sinkhorn``: batched entropic optimal transport with selectable gradients."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..implicit import Adjoint, Implicit, Unroll, custom_root
from ..solvers import ConvergenceError, Solution, Status
from ..solvers._precision import common_dtype, to_compute, to_output, without_autocast
from ..solvers._tracing import compiling
from ._geometry import COSTS, Geometry
from ._inputs import as_batched, prepare_problem
from ._sinkhorn import Sinkhorn, _update_f, _update_g

__all__ = ["sinkhorn", "Envelope", "SinkhornResult", "SinkhornDivergence", "SinkhornLayer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Envelope(Adjoint):
    """Danskin's (envelope) gradient of the transport value.

    At the optimum the value's derivative is the partial derivative of the objective
    at the fixed optimal plan: ``dV/dC = P``, ``dV/da = f``, ``dV/db = g`` (balanced,
    up to the constant of the potentials' gauge), ``dV/dx_i = sum_j P_ij grad_x c(x_i,
    y_j)``. No iteration is recorded: the backward pass costs one pass over the cost
    and ``O(1)`` extra memory. Only ``value`` is differentiable; use ``Implicit()`` for
    gradients through the potentials or the plan.

    References:
        Feydy et al., Interpolating between Optimal Transport and MMD using Sinkhorn
        Divergences (2019), arXiv:1810.08278.
    """


@dataclasses.dataclass(frozen=True)
class SinkhornResult(Solution):
    """Result of ``sinkhorn`` (``value`` is the regularized transport cost).

    Attributes:
        value: ``<C, P> + eps KL(P | a b')`` (plus ``rho KL`` marginal terms when
            unbalanced), ``[B]``.
        f, g: potentials ``[B, n]``, ``[B, m]``; ``P_ij = a_i b_j exp((f_i + g_j - C_ij) /
            eps)``.
        status, stats: per-problem ``Status`` and ``num_steps``, ``residual``.
        potentials: ``(f, g)`` in the compute dtype when it differs from the inputs'
            (float32 for float16/bfloat16 inputs), else ``None``. ``plan`` and
            ``apply_plan`` use them: ``exp((f + g - C) / eps)`` would amplify the
            rounding of 16-bit potentials by ``|f| / eps``.

    ``value``, ``f``, ``g``, ``plan`` and ``apply_plan`` have the inputs' dtype; the
    geometry, weights and ``stats`` are in the compute dtype.
    """

    f: torch.Tensor
    g: torch.Tensor
    geometry: Geometry = dataclasses.field(repr=False)
    a: torch.Tensor = dataclasses.field(repr=False)
    b: torch.Tensor = dataclasses.field(repr=False)
    epsilon: float = 0.0
    batched: bool = True
    potentials: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return to_output(t if self.batched else t[0], self.f.dtype)

    def _exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = (self.f, self.g) if self.potentials is None else self.potentials
        return self._in(f), self._in(g)

    @property
    def plan(self) -> torch.Tensor:
        """The dense plan ``[B, n, m]`` (materialized on demand)."""
        f, g = self._exact()
        parts = [_plan_tile(c, f[:, s:t], g, self.a[:, s:t], self.b, self.epsilon) for s, t, c in self.geometry.tiles()]
        return self._out(torch.cat(parts, 1))

    def apply_plan(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v [B, m, k]`` (or ``[m, k]`` unbatched), tile by tile."""
        v = v if self.batched else v[None]
        f, g = self._exact()
        v = v.to(f.dtype)
        parts = [
            torch.bmm(_plan_tile(c, f[:, s:t], g, self.a[:, s:t], self.b, self.epsilon), v)
            for s, t, c in self.geometry.tiles()
        ]
        return self._out(torch.cat(parts, 1))

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batched else t[None]


def _plan_tile(c, f, g, a, b, eps):
    return torch.exp((f[:, :, None] + g[:, None, :] - c) / eps) * a[:, :, None] * b[:, None, :]


@without_autocast
def sinkhorn(
    cost: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    epsilon: float,
    cost_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "sqeuclidean",
    rho_a: float | None = None,
    rho_b: float | None = None,
    solver: Sinkhorn | None = None,
    adjoint: Adjoint | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tile: int | None = None,
    throw: bool = True,
) -> SinkhornResult:
    """Entropic optimal transport between batches of discrete measures.

    Solves, for every batch element,

        min_P  <C, P> + eps KL(P | a b')   s.t.  P 1 = a,  P' 1 = b

    (with ``rho_a KL(P 1 | a)`` and/or ``rho_b KL(P' 1 | b)`` replacing a constraint
    when ``rho_a``/``rho_b`` is given: unbalanced OT) by log-domain Sinkhorn
    iterations, batched with per-problem convergence.

    Args:
        cost: ``[B, n, m]`` (or ``[n, m]``) dense cost; or ``None`` with point clouds.
        x, y: point clouds ``[B, n, d]``, ``[B, m, d]`` (or unbatched); their cost
            ``cost_fn(x, y)`` is computed in row tiles, never stored whole unless it
            is small.
        a, b: nonnegative weights ``[B, n]``, ``[B, m]`` (``None``: uniform). Zero
            weights are allowed (padding); balanced problems need equal masses.
        epsilon: the entropic regularization, ``> 0`` (in the units of the cost).
        cost_fn: ``"sqeuclidean"`` (``||x - y||^2``), ``"euclidean"``,
            ``dl.ot.pnorm_cost(p, power)`` (``||x - y||_p^power``), or any callable
            ``(x [B, t, d], y [B, m, d]) -> [B, t, m]``.
        rho_a, rho_b: KL weights of relaxed marginals (``None``: exact marginal).
        solver: a ``Sinkhorn`` (tolerances, ``max_steps``, ``check_every``,
            ``epsilon_scaling``).
        adjoint: ``Envelope()`` (default; only ``value`` differentiable), ``Implicit()``
            (the implicit function theorem on the potentials: ``f``, ``g``, ``plan`` and
            ``value`` differentiable) or ``Unroll()`` (backpropagate every iteration).
        init: warm-start potentials ``(f, g)``.
        tile: rows of a point-cloud cost computed at a time.
        throw: raise ``ConvergenceError`` when a problem does not converge.

    Returns:
        A ``SinkhornResult`` (unbatched fields when no input is batched).

    Precision: results have the inputs' dtype. float64 and float32 are solved as
    given (float32 warns when ``epsilon`` is below ``1e-4`` times the cost scale);
    float16 and bfloat16 inputs are solved, and differentiated, in float32 and the
    results cast back (gradients reach the inputs in their dtype). ``cost_fn`` then
    sees float32 clouds. 16-bit weights of a balanced problem may differ in mass by
    their rounding (``eps`` of the dtype); ``b`` is rescaled to ``a``'s mass.

    Example:
        >>> import torch, difflayers as dl
        >>> x = torch.rand(50, 2, dtype=torch.float64, requires_grad=True)
        >>> y = torch.rand(60, 2, dtype=torch.float64)
        >>> res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.05)
        >>> res.value.backward()       # x.grad: the envelope gradient
        >>> bool(res.status == 0)
        True

    References:
        Peyre and Cuturi, Computational Optimal Transport (2019), arXiv:1803.00567.
    """
    solver = Sinkhorn() if solver is None else solver
    adjoint = Envelope() if adjoint is None else adjoint
    if not isinstance(solver, Sinkhorn):
        raise TypeError(f"sinkhorn: solver must be a difflayers.ot.Sinkhorn, got {type(solver).__name__}.")
    if not isinstance(adjoint, (Envelope, Implicit, Unroll)):
        raise TypeError(f"sinkhorn: adjoint must be Envelope(), Implicit() or Unroll(), got {type(adjoint).__name__}.")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"sinkhorn: epsilon must be a finite number > 0, got {epsilon!r}.")
    for name, rho in (("rho_a", rho_a), ("rho_b", rho_b)):
        if rho is not None and not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"sinkhorn: {name} must be a number > 0 or None, got {rho!r}.")
    geom, a, b, batched, ref = prepare_problem(
        "sinkhorn", cost, x, y, a, b, cost_fn, tile, balanced=rho_a is None and rho_b is None
    )
    # the compute dtype (16-bit inputs included); an advice that needs a host read, so
    # not given while torch.compile traces
    if a.dtype == torch.float32 and not compiling():
        scale = max(float(c.detach().abs().max()) for _, _, c in geom.tiles())
        if scale / epsilon > 1e4:
            warnings.warn(
                f"sinkhorn: epsilon={epsilon:g} is below 1e-4 x the cost scale ({scale:.3g}): float32 potentials "
                "lose most of their precision. Use float64 or a larger epsilon.",
                RuntimeWarning,
                stacklevel=3,  # past without_autocast's frame
            )
    if init is not None:
        init = tuple(as_batched(t, 1, "init").detach().to(a.dtype) for t in init)

    track = torch.is_grad_enabled()
    eps = float(epsilon)
    if isinstance(adjoint, Unroll) and track:
        f, g, status, steps, err = solver.solve(geom, a, b, eps, rho_a=rho_a, rho_b=rho_b, init=init, track=True)
    elif isinstance(adjoint, Implicit) and track:
        f, g, status, steps, err = _implicit(solver, geom, a, b, eps, rho_a, rho_b, init, adjoint)
    else:
        f, g, status, steps, err = solver.solve(geom, a, b, eps, rho_a=rho_a, rho_b=rho_b, init=init)
    if isinstance(adjoint, Envelope) or not track:
        value = _envelope_value(geom, f.detach(), g.detach(), a, b, eps, rho_a, rho_b)
    else:
        value = _value(geom, f, g, a, b, eps, rho_a, rho_b)
    out = (lambda t: t) if batched else (lambda t: t[0])
    dtype = ref.dtype  # 16-bit inputs were solved in float32: results cast back
    result = SinkhornResult(
        to_output(out(value), dtype), out(status), {"num_steps": out(steps), "residual": out(err)},
        f=to_output(out(f), dtype), g=to_output(out(g), dtype), geometry=geom, a=a, b=b, epsilon=eps,
        batched=batched, potentials=None if dtype == a.dtype else (out(f), out(g)),
    )
    if throw and not bool((status == int(Status.SUCCESS)).all()):
        raise ConvergenceError("sinkhorn", SinkhornResult(value, status, {"num_steps": steps, "residual": err},
                                                            f=f, g=g, geometry=geom, a=a, b=b, epsilon=eps))
    return result


def _tile_transport(c, f, g, a, b, eps):
    """``sum_ij P_ij C_ij`` for one tile with ``P`` from detached potentials."""
    with torch.no_grad():
        p = _plan_tile(c.detach(), f, g, a, b, eps)
    return (p * c).sum((1, 2))


def _transport(geom: Geometry, f, g, a, b, eps):
    """``<P, C>`` with ``P`` fixed (no gradient) and ``C`` differentiable, tile by tile;
    point-cloud tiles are recomputed in the backward pass (memory of one tile)."""
    a, b = a.detach(), b.detach()
    if geom.cost is not None:
        return _tile_transport(geom.cost, f, g, a, b, eps)
    total = 0.0
    for start in range(0, geom.n, geom.tile):
        stop = min(start + geom.tile, geom.n)

        def part(xt, y, start=start, stop=stop):
            return _tile_transport(geom.cost_fn(xt, y), f[:, start:stop], g, a[:, start:stop], b, eps)

        xt = geom.x[:, start:stop]
        if torch.is_grad_enabled() and (xt.requires_grad or geom.y.requires_grad):
            total = total + checkpoint(part, xt, geom.y, use_reentrant=False)
        else:
            total = total + part(xt, geom.y)
    return total


def _plan_statistics(geom: Geometry, f, g, a, b, eps):
    """``(<P, C>, sum P log P, P 1, P' 1)`` in one pass over the tiles."""
    transport, entropy, rows, cols = 0.0, 0.0, [], 0.0
    for s, t, c in geom.tiles():
        p = _plan_tile(c, f[:, s:t], g, a[:, s:t], b, eps)
        transport = transport + (p * c).sum((1, 2))
        entropy = entropy + torch.xlogy(p, p).sum((1, 2))
        rows.append(p.sum(2))
        cols = cols + p.sum(1)
    return transport, entropy, torch.cat(rows, 1), cols


def _kl(u, v):
    return (torch.xlogy(u, u) - torch.xlogy(u, v) - u + v).sum(1)


def _envelope_value(geom, f, g, a, b, eps, rho_a, rho_b):
    """The value, with the envelope gradient attached to ``C`` (or ``x, y``), ``a``, ``b``."""
    transport = _transport(geom, f, g, a, b, eps)
    if rho_a is None and rho_b is None:
        # <C, P> + eps KL(P | ab') = <f, a> + <g, b> at the optimum; d/da = f, d/db = g
        return (f * a).nansum(1) + (g * b).nansum(1) + (transport - transport.detach())
    # unbalanced: no constraint, so Danskin holds for every argument of the objective
    with torch.no_grad():
        _, entropy, rows, cols = _plan_statistics(geom, f, g, a, b, eps)
    return _unbalanced_objective(transport, entropy, rows, cols, a, b, eps, rho_a, rho_b)


def _unbalanced_objective(transport, entropy, rows, cols, a, b, eps, rho_a, rho_b):
    """``<C, P> + eps KL(P | ab') + rho_a KL(P 1 | a) + rho_b KL(P' 1 | b)`` from its parts
    (``entropy = sum P log P``, ``rows = P 1``, ``cols = P' 1``)."""
    value = transport + eps * (entropy - torch.xlogy(rows, a).sum(1) - torch.xlogy(cols, b).sum(1)
                               - rows.sum(1) + a.sum(1) * b.sum(1))
    if rho_a is not None:
        value = value + rho_a * _kl(rows, a)
    if rho_b is not None:
        value = value + rho_b * _kl(cols, b)
    return value


def _value(geom, f, g, a, b, eps, rho_a, rho_b):
    """The value from differentiable potentials (``Implicit``, ``Unroll``)."""
    if rho_a is None and rho_b is None:
        return (f * a).nansum(1) + (g * b).nansum(1)
    return _unbalanced_objective(*_plan_statistics(geom, f, g, a, b, eps), a, b, eps, rho_a, rho_b)


def _implicit(solver, geom, a, b, eps, rho_a, rho_b, init, adjoint):
    """Potentials differentiable by the implicit function theorem on the reduced dual.

    For fixed ``f`` the dual is maximized in ``g`` by one soft-minimum, ``g = G(f)``
    (the ``g`` update of the iterations). The optimal ``f`` is then a zero of the
    gradient of the reduced dual ``f -> D(f, G(f))``,

        F(f) = P 1 - a e^(-f / rho_a),      P = P(f, G(f))

    (``e^(-f / rho)`` reads 1 for a hard marginal), whose Jacobian is the Schur
    complement of the dual Hessian, symmetric positive semi-definite:

        J = diag(P 1) / eps + D_a - (P / eps) diag(P' 1 / eps + D_b)^-1 (P' / eps),

    ``D = diag(w e^(-pot / rho)) / rho`` (zero for a hard marginal). Balanced, ``J 1 =
    0`` (the gauge); ``F`` gets the term ``a <a, f> / eps``, zero at the returned gauge
    ``<a, f> = 0``, which makes ``J`` positive definite. Reverse mode solves ``J v =
    dL/df`` by CG (``n`` unknowns; each product is a vjp through the two soft-minima
    of one iteration) and ``g = G(f)`` is differentiated by ordinary autograd.
    ``F`` is scaled by ``eps n / sum(a)`` per problem (potential units; a scalar keeps
    ``J`` symmetric). Zero-weight points do not enter ``F`` (their ``f_i`` is pinned to
    0 there) and get their potentials from one soft-minimum afterwards.
    """
    balanced = rho_a is None and rho_b is None
    dense = geom.cost is not None

    def geometry(params):
        if dense:
            return Geometry(cost=params[0])
        return Geometry(x=params[0], y=params[1], cost_fn=geom.cost_fn, tile=geom.tile)

    def root(f, *params):
        a_, b_ = params[-2], params[-1]
        g_ = geometry(params)
        log_a, log_b = torch.log(a_), torch.log(b_)
        g = _update_g(g_, log_a, f, eps, rho_b)
        # (P 1)_i = a_i exp((f_i - fhat_i) / eps), fhat = -eps LSE_j(log b_j + (g_j - C_ij) / eps)
        rows = a_ * torch.exp(f / eps + g_.lse_rows(log_b + g / eps, eps))
        grad = rows - (a_ if rho_a is None else a_ * torch.exp(-f / rho_a))
        if balanced:
            grad = grad + a_ * (a_ * f).sum(1, keepdim=True) / eps
        # in units of the potentials (eps n / |a| per problem keeps J symmetric), so that
        # the root check and the linear solver's tolerance read as for a fixed-point map;
        # zero-weight potentials pinned at 0
        return torch.where(a_ > 0, eps * a_.shape[1] / a_.sum(1, keepdim=True) * grad, f)

    f, g, status, steps, err = solver.solve(geom, a.detach(), b.detach(), eps, rho_a=rho_a, rho_b=rho_b, init=init)
    with torch.no_grad():
        if balanced:
            f = f - (a * f).sum(1, keepdim=True) / a.sum(1, keepdim=True)
        solution = torch.where(a > 0, f, 0.0)
    params = ((geom.cost,) if dense else (geom.x, geom.y)) + (a, b)
    f = custom_root(root, linear_solver=adjoint.linear_solver, symmetric=True)(lambda z0, *p: solution)(
        solution, *params
    )
    g = _update_g(geom, torch.log(a), f, eps, rho_b)
    if bool((a == 0).any()):  # zero-weight points: one soft-minimum from g (ordinary autograd)
        f = torch.where(a > 0, f, _update_f(geom, torch.log(b), g, eps, rho_a))
    return f, g, status, steps, err


class SinkhornDivergence(torch.nn.Module):
    """Debiased Sinkhorn loss between point clouds (a metric-like, nonnegative loss).

        S(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2

    ``S(a, a) = 0``, ``S >= 0`` for the squared Euclidean cost, and ``S`` interpolates
    between optimal transport (``eps -> 0``) and an MMD (``eps -> inf``). Gradients are
    envelope gradients of the three transport problems.

    Args:
        epsilon: the entropic regularization.
        cost_fn: as in ``sinkhorn``.
        solver: a ``Sinkhorn``.

    Call:
        ``loss(x, y, a=None, b=None) -> [B]`` (or a scalar for unbatched clouds), in
        the inputs' dtype. float16 and bfloat16 inputs are computed in float32 (the
        three transport values nearly cancel) and the loss cast back.

    References:
        Feydy et al., Interpolating between Optimal Transport and MMD using Sinkhorn
        Divergences (2019), arXiv:1810.08278.
    """

    def __init__(self, *, epsilon: float, cost_fn="sqeuclidean", solver: Sinkhorn | None = None):
        super().__init__()
        self.epsilon, self.cost_fn, self.solver = epsilon, cost_fn, solver

    @without_autocast
    def forward(self, x, y, a=None, b=None):
        # one dtype first, then 16-bit inputs in float32: the difference below cancels
        dtype = common_dtype("SinkhornDivergence", {"x": x, "y": y, "a": a, "b": b})
        x, y, a, b = (to_compute(t) for t in (x, y, a, b))
        res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=self.epsilon, cost_fn=self.cost_fn, solver=self.solver)
        xx = self._self_transport(x, res.a, res.batched)
        yy = self._self_transport(y, res.b, res.batched)
        return to_output(res.value - 0.5 * (xx + yy), dtype)

    def _self_transport(self, z, w, batched):
        """``OT_eps(w, w)`` on the cloud ``z`` by the symmetric iteration, with the
        envelope gradient attached (``g = f``)."""
        z = as_batched(z, 2, "x")
        fn = COSTS[self.cost_fn] if isinstance(self.cost_fn, str) else self.cost_fn
        geom = Geometry(x=z, y=z, cost_fn=fn)
        solver = Sinkhorn() if self.solver is None else self.solver
        f, status, steps, err = solver.solve_symmetric(geom, w.detach(), self.epsilon)
        if not bool((status == int(Status.SUCCESS)).all()):
            raise ConvergenceError(
                "SinkhornDivergence (self-transport)",
                Solution(f, status, {"num_steps": steps, "residual": err}),
            )
        value = _envelope_value(geom, f, f, w, w, float(self.epsilon), None, None)
        return value if batched else value[0]

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, cost_fn={self.cost_fn!r}"


class SinkhornLayer(torch.nn.Module):
    """Entropic transport plan between two point clouds (or a given cost) as a layer.

    ``layer(x, y, a=None, b=None)`` returns the plan ``P [B, n, m]`` of
    ``sinkhorn(x=x, y=y, ...)`` (``layer(cost=C)`` for a dense cost), differentiable by
    the implicit function theorem by default, so the plan can feed the rest of a
    network (soft matchings, attention-like transport, barycentric projections
    ``P y / a``).

    Args:
        epsilon: the entropic regularization.
        cost_fn: as in ``sinkhorn``.
        solver: a ``Sinkhorn``.
        adjoint: ``dl.Implicit()`` (default) or ``dl.Unroll()`` (the plan needs a
            differentiable solution, so ``Envelope`` is not accepted).
        return_result: return the whole ``SinkhornResult`` instead of the plan.

    Example:
        >>> import torch, difflayers as dl
        >>> layer = dl.ot.SinkhornLayer(epsilon=0.1)
        >>> x = torch.rand(4, 10, 2, dtype=torch.float64, requires_grad=True)
        >>> y = torch.rand(4, 12, 2, dtype=torch.float64)
        >>> P = layer(x, y)                       # [4, 10, 12], rows sum to 1/10
        >>> (P @ y).square().sum().backward()
    """

    def __init__(self, *, epsilon: float, cost_fn="sqeuclidean", solver: Sinkhorn | None = None,
                 adjoint: Adjoint | None = None, return_result: bool = False):
        super().__init__()
        adjoint = Implicit() if adjoint is None else adjoint
        if isinstance(adjoint, Envelope):
            raise TypeError("SinkhornLayer: the plan needs Implicit() or Unroll(); Envelope only differentiates the value.")
        self.epsilon, self.cost_fn, self.solver, self.adjoint = epsilon, cost_fn, solver, adjoint
        self.return_result = return_result

    def forward(self, x=None, y=None, a=None, b=None, *, cost=None):
        res = sinkhorn(cost=cost, x=x, y=y, a=a, b=b, epsilon=self.epsilon, cost_fn=self.cost_fn,
                       solver=self.solver, adjoint=self.adjoint)
        return res if self.return_result else res.plan

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, cost_fn={self.cost_fn!r}, adjoint={self.adjoint}"
