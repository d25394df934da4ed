"""``solve_conic``: a batched, differentiable cone-program solve.

Only the solve is a custom autograd node; everything that builds ``(P, q, A, b)``
from user parameters (QP data, cvxpy's affine maps) is ordinary autograd, so
gradients of broadcast parameters are summed over the batch by ``expand``'s own
backward.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..implicit import Adjoint, Implicit, Unroll
from ..solvers import ConvergenceError, Solution, Status
from ..solvers._precision import to_compute, to_output, without_autocast
from ..solvers._tracing import check_all, compiling
from ._cone_algebra import ConeLayout
from ._cones import Cones
from ._interior_point import InteriorPoint
from ._kkt import DualPrecomputation, _bmtv, _bmv

__all__ = ["solve_conic", "ConicSolution", "Smoothed", "ON_FAILURE"]

ON_FAILURE = ("raise", "nan", "mask")
_USABLE = (int(Status.SUCCESS), int(Status.INACCURATE))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Smoothed(Adjoint):
    """Differentiate the central-path point at barrier parameter ``barrier``.

    The forward solve returns, instead of the optimum, the minimizer of the
    log-barrier problem

        minimize 1/2 x'P x + q'x - barrier * sum_i log det(s_i)   s.t.  A x + s = b,

    (one term per inequality row and per second-order cone), and its exact
    derivative. That solution is a smooth function of the data even where the
    optimum is not: the optimum of an LP sits at a vertex, so its exact derivative
    is zero almost everywhere and jumps in between, which gives no training signal;
    the smoothed one moves continuously. As ``barrier -> 0`` the solution and its
    derivative converge to the exact ones (wherever those exist).

    Args:
        barrier: the barrier weight ``mu > 0`` (in the units of the objective; the
            smoothed solution is within ``O(barrier * degree)`` of the optimum in
            objective value).

    References:
        Mandi and Guns, Interior Point Solving for LP-based prediction+optimisation
        (2020), arXiv:2010.13943.
    """

    barrier: float = 1e-2

    def __post_init__(self):
        if not (isinstance(self.barrier, (int, float)) and 0 < self.barrier < float("inf")):
            raise ValueError(f"Smoothed: barrier must be a finite number > 0, got {self.barrier!r}.")


@dataclasses.dataclass(frozen=True)
class ConicSolution(Solution):
    """Result of ``solve_conic`` (``value`` is the primal solution ``x``).

    Attributes:
        value: primal solution ``x``, ``[B, n]``.
        status: ``Status`` codes ``[B]``: ``SUCCESS``, ``INACCURATE`` (usable, reduced
            accuracy), ``PRIMAL_INFEASIBLE``, ``DUAL_INFEASIBLE``, ``MAX_STEPS``,
            ``NONFINITE``.
        stats: ``num_steps``, ``residual`` (normalized: <= 1 means within tolerance),
            ``objective`` (``1/2 x'P x + q'x``), ``tau``/``kappa`` of the embedding.
        z: dual solution ``[B, m]`` (``z in K*``; the multipliers of ``A x + s = b``
            with Lagrangian ``1/2 x'Px + q'x + z'(A x - b)``).
        s: slack ``[B, m]`` (``s in K``, zero on the equality rows).

    For infeasible samples ``value``/``z`` hold the normalized certificate
    (``q'x = -1`` for dual infeasibility, ``b'z = -1`` for primal infeasibility)
    unless ``on_failure`` replaced them.
    """

    z: torch.Tensor
    s: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        return self.value

    @property
    def converged(self) -> torch.Tensor:
        """``[B]`` bool: ``SUCCESS`` or ``INACCURATE`` (usable values)."""
        return (self.status == int(Status.SUCCESS)) | (self.status == int(Status.INACCURATE))


class _KKTAdjoint(torch.autograd.Function):
    """Attach the implicit derivative of the KKT conditions to a solved ``(x, z)``.

    At the solution, with ``H = W^2`` the final scaling (``H = diag(s / z)`` on the
    orthant: zero on active rows, infinite on inactive ones in the limit),

        P x + q + A'z = 0,        A x + s = b,        ds = -H dz

    linearize to the symmetric system

        K [dx; dz] = [-(dP x + dq + dA' z);  db - dA x],     K = [[P, A'], [A, -H]].

    Reverse mode solves ``K [u; v] = [g_x; g_z]`` (K is symmetric) and returns
    ``dL/dq = -u``, ``dL/dP = -(u x' + x u') / 2``, ``dL/dA = -(z u' + v x')``,
    ``dL/db = v``; forward mode solves the system above. Both reuse the factorization
    of ``K`` computed at the final point: no new factorization in the backward pass.
    Shapes: ``x, u [B, n]``; ``z, v [B, m]``; ``P [B, n, n]``; ``A [B, m, n]``.
    """

    @staticmethod
    def forward(kkt, x, z, P, q, A, b):
        return x.view_as(x), z.view_as(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kkt, x, z, P, q, A, b = inputs
        ctx.kkt = kkt
        ctx.has_P = P is not None
        ctx.save_for_backward(x, z)
        ctx.save_for_forward(x, z)

    @staticmethod
    def backward(ctx, gx, gz):
        x, z = ctx.saved_tensors
        gx = torch.zeros_like(x) if gx is None else gx
        gz = torch.zeros_like(z) if gz is None else gz
        u, v = ctx.kkt.solve(gx, gz)
        # samples that receive no cotangent (masked failures) contribute exactly zero
        quiet = ((gx == 0).all(1) & (gz == 0).all(1))[:, None]
        u = torch.where(quiet, 0.0, u)
        v = torch.where(quiet, 0.0, v)
        grad_P = -0.5 * (u[:, :, None] * x[:, None, :] + x[:, :, None] * u[:, None, :]) if ctx.has_P else None
        grad_A = -(z[:, :, None] * u[:, None, :] + v[:, :, None] * x[:, None, :])
        return None, None, None, grad_P, -u, grad_A, v

    @staticmethod
    def jvp(ctx, _kkt, _dx, _dz, dP, dq, dA, db):
        x, z = ctx.saved_tensors
        r1 = torch.zeros_like(x) if dq is None else -dq
        r2 = torch.zeros_like(z) if db is None else db.clone()
        if dP is not None:
            r1 = r1 - _bmv(dP, x)
        if dA is not None:
            r1 = r1 - _bmtv(dA, z)
            r2 = r2 - _bmv(dA, x)
        return ctx.kkt.solve(r1, r2)


def _check_inputs(P, q, A, b, cones):
    if not isinstance(cones, Cones):
        raise TypeError(f"solve_conic: cones must be a difflayers.conic.Cones, got {type(cones).__name__}.")
    named = {"P": P, "q": q, "A": A, "b": b}
    for name, t in named.items():
        if t is None and name == "P":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"solve_conic: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"solve_conic: {name} must be a floating-point tensor, got dtype {t.dtype}; use .double().")
    if q.dim() != 2:
        raise ValueError(f"solve_conic: q must have shape [B, n], got {tuple(q.shape)}.")
    batch, n = q.shape
    if n == 0:
        raise ValueError("solve_conic: the problem has no variables (q has shape [B, 0]); expected n >= 1.")
    m = cones.dim
    expected = {"A": (batch, m, n), "b": (batch, m)}
    if P is not None:
        expected["P"] = (batch, n, n)
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"solve_conic: {name} must have shape {list(shape)} ([B, n] from q, m = cones.dim = {m}); "
                f"got {list(named[name].shape)}. Expand broadcast inputs to the batch first."
            )
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"solve_conic: {name} has dtype {t.dtype} but q has {q.dtype}; pass one dtype.")
        if t.device != q.device:
            raise ValueError(f"solve_conic: {name} is on {t.device} but q is on {q.device}; move them to one device.")
    for name, t in named.items():
        if t is None or t.numel() == 0:
            continue
        finite = torch.isfinite(t.detach().reshape(batch, -1)).all(1)
        check_all(finite, lambda bad, name=name: ValueError(
            f"solve_conic: {name} contains NaN or Inf{_in_elements(bad)}. Clean the data (or drop those elements) "
            "before solving."
        ))
    if P is not None and P.numel():
        _check_convex(P)


def _check_convex(P: torch.Tensor) -> None:
    """Raise unless the symmetric part of every ``P`` is positive semi-definite.

    A Cholesky factorization of ``P_sym + delta I`` with ``delta = sqrt(eps) max(1, |P|_max)``
    succeeds for every PSD ``P`` and fails for one with an eigenvalue below ``-delta``: the
    interior point would otherwise fail on a nonconvex problem with a misleading status.
    """
    P = P.detach().to(torch.promote_types(P.dtype, torch.float32))  # 16-bit data is checked in float32
    P = 0.5 * (P + P.transpose(1, 2))
    delta = torch.finfo(P.dtype).eps ** 0.5 * P.abs().flatten(1).amax(1).clamp_min(1.0)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    _, info = torch.linalg.cholesky_ex(P + delta[:, None, None] * eye)
    check_all(info == 0, lambda bad: ValueError(
        f"solve_conic: P is not positive semi-definite{_in_elements(bad)} (its symmetric part has a negative "
        "eigenvalue), so the problem is not convex; pass a PSD P (e.g. L @ L.mT, or add a multiple of the identity)."
    ))


def _in_elements(bad: list[int] | None) -> str:
    """`` in batch elements [...]`` for a message (empty while traced: indices unknown)."""
    if bad is None:
        return ""
    return f" in batch elements {bad[:8]}{' ...' if len(bad) > 8 else ''}"


@without_autocast
def solve_conic(
    P: torch.Tensor | None,
    q: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    cones: Cones,
    *,
    solver: InteriorPoint | None = None,
    adjoint: Adjoint | None = None,
    on_failure: str = "raise",
    warm_start: ConicSolution | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> ConicSolution:
    """Solve a batch of cone programs and make the solution differentiable.

    Solves, for every batch element,

        minimize 1/2 x'P x + q'x   subject to   A x + s = b,  s in K

    with ``K`` described by ``cones`` (equality rows, then inequality rows, then
    second-order cones). ``x``, ``z`` and ``s`` are differentiable with respect to
    ``P, q, A, b``.

    Args:
        P: ``[B, n, n]`` positive semi-definite (its symmetric part is used; a clearly
            indefinite one raises ``ValueError``), or ``None`` for a linear program.
        q: ``[B, n]``.
        A: ``[B, m, n]`` with ``m = cones.dim``.
        b: ``[B, m]``.
        cones: the cone sizes, shared by the batch.
        solver: an ``InteriorPoint`` (default ``InteriorPoint()``).
        adjoint: ``Implicit()`` (default: KKT implicit differentiation reusing the
            forward factorization), ``Smoothed(barrier)`` (differentiate the
            central-path point; for LPs and degenerate problems), or ``Unroll()``
            (backpropagate through every iteration; for testing).
        on_failure: what to do with elements that are infeasible, unbounded or did
            not converge: ``"raise"`` a ``ConvergenceError`` naming them (default),
            set their outputs to ``"nan"``, or ``"mask"`` them to zero (their
            gradients are zero; the rest of the batch is unaffected). ``INACCURATE``
            elements are returned with a warning under every policy.
        warm_start: a previous ``ConicSolution`` or ``(x, z, s)`` of matching shapes.

    Returns:
        A ``ConicSolution`` with ``value`` (= ``x``), ``z``, ``s``, per-element
        ``status`` and ``stats`` (empty for an empty batch, ``B = 0``). With
        ``max_steps=0`` no iteration runs: elements end ``MAX_STEPS`` at the initial
        point (``INACCURATE``, or ``SUCCESS`` after polishing, where it is already close).

    Precision: ``x``, ``z`` and ``s`` have ``q``'s dtype. float64 and float32 are solved
    as given (float32 with iterative refinement of every KKT solve); float16 and
    bfloat16 data are cast to float32, solved and differentiated there, and the
    solution is cast back (gradients reach the inputs in their dtype; ``stats`` stay
    float32). Integer data raises ``TypeError``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices, NaN/Inf data, a ``P`` that is
            not positive semi-definite.
        ConvergenceError: with ``on_failure="raise"``, when an element failed.

    Example:
        >>> import torch, difflayers as dl
        >>> cones = dl.conic.Cones(nonneg=2)            # x >= 0 written as -x + s = 0
        >>> A = -torch.eye(2, dtype=torch.float64)[None]
        >>> sol = dl.conic.solve_conic(torch.eye(2, dtype=torch.float64)[None],
        ...     torch.tensor([[1.0, -1.0]], dtype=torch.float64), A,
        ...     torch.zeros(1, 2, dtype=torch.float64), cones)
        >>> sol.x.round(decimals=6) + 0.0
        tensor([[0., 1.]], dtype=torch.float64)
    """
    solver = InteriorPoint() if solver is None else solver
    adjoint = Implicit() if adjoint is None else adjoint
    if not isinstance(solver, InteriorPoint):
        raise TypeError(f"solve_conic: solver must be a difflayers.conic.InteriorPoint, got {type(solver).__name__}.")
    if not isinstance(adjoint, (Implicit, Smoothed, Unroll)):
        raise TypeError(
            "solve_conic: adjoint must be Implicit() (exact KKT gradients), Smoothed(barrier) or Unroll(); "
            f"got {type(adjoint).__name__}."
        )
    if isinstance(adjoint, Implicit) and adjoint.linear_solver is not None:
        raise ValueError(
            "solve_conic: the KKT system of the backward pass is solved with the forward factorization; "
            "pass Implicit() without a linear_solver."
        )
    if on_failure not in ON_FAILURE:
        raise ValueError(f"solve_conic: on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")
    _check_inputs(P, q, A, b, cones)
    # 16-bit data is solved in float32 and the solution cast back (solvers._precision)
    dtype = q.dtype
    P, q, A, b = (to_compute(t) for t in (P, q, A, b))
    batch, n = q.shape
    p = cones.zero
    layout = ConeLayout(cones, q.device)

    # grouped row order inside; the user's order outside (plain autograd ops)
    def to_grouped(v):
        return torch.cat([v[:, :p], layout.to_grouped(v[:, p:])], dim=1)

    def from_grouped(v):
        return torch.cat([v[:, :p], layout.from_grouped(v[:, p:])], dim=1)

    A_g, b_g = to_grouped(A), to_grouped(b)
    P_s = None if P is None else 0.5 * (P + P.transpose(1, 2))
    start = None
    if warm_start is not None:
        if isinstance(warm_start, Solution):
            ws = (warm_start.value, warm_start.z, warm_start.s)
        else:
            ws = tuple(warm_start)
        if len(ws) != 3 or tuple(ws[0].shape) != (batch, n) or any(tuple(t.shape) != (batch, cones.dim) for t in ws[1:]):
            raise ValueError(
                f"solve_conic: warm_start must be a ConicSolution or (x [B, n], z [B, m], s [B, m]) with B={batch}, "
                f"n={n}, m={cones.dim}."
            )
        start = (ws[0].detach().to(q), to_grouped(ws[1].detach().to(q)), to_grouped(ws[2].detach().to(q)))

    # Under grad mode the derivative node is always attached (its only extra cost is
    # the final factorization): torch.func transforms (jvp, grad, vmap) hand in
    # tensors that do not say requires_grad. Solve under torch.no_grad() to skip it.
    need_grad = torch.is_grad_enabled()
    if batch == 0:
        empty = q.new_zeros(0, n) + q.sum() * 0  # keeps the graph
        zeros = b.new_zeros(0, cones.dim)
        stats = {k: q.new_zeros(0) for k in ("residual", "objective")}
        stats["num_steps"] = torch.zeros(0, dtype=torch.int64, device=q.device)
        empty = ConicSolution(empty, torch.zeros(0, dtype=torch.int64, device=q.device), stats, z=zeros, s=zeros)
        return to_dtype(empty, dtype)

    if isinstance(adjoint, Unroll) and need_grad:
        x, z, s, status, stats = solver.run(P_s, q, A_g, b_g, cones, layout, start)
    else:
        with torch.no_grad():
            Pd = None if P_s is None else P_s.detach()
            qd, Ad, bd = q.detach(), A_g.detach(), b_g.detach()
            pre = DualPrecomputation.try_build(Pd, Ad)
            x, z, s, status, stats = solver.run(Pd, qd, Ad, bd, cones, layout, start, pre=pre)
            if isinstance(adjoint, Smoothed):
                ok = (status == int(Status.SUCCESS)) | (status == int(Status.INACCURATE))
                xc, zc, sc, cstatus, csteps = solver.center(Pd, qd, Ad, bd, cones, layout, x, z, s, adjoint.barrier)
                keep = ok[:, None]
                x, z, s = torch.where(keep, xc, x), torch.where(keep, zc, z), torch.where(keep, sc, s)
                status = torch.where(ok & (cstatus != int(Status.SUCCESS)), cstatus, status)
                stats["num_steps"] = stats["num_steps"] + torch.where(ok, csteps, 0)
            kkt = None
            if solver.polish and not cones.soc and not isinstance(adjoint, Smoothed):
                x, z, s, status, polished, kkt = solver.refine_on_active_set(
                    Pd, qd, Ad, bd, cones, layout, x, z, s, status, pre=pre
                )
                stats["polished"] = polished
            if need_grad:
                if isinstance(adjoint, Smoothed):
                    kkt = solver.factorize(Pd, Ad, cones, layout, s, z, final=True)
                elif kkt is None:
                    kkt = solver.factorize_exact(Pd, Ad, cones, layout, s, z, pre=pre)
        if need_grad:
            x, z = _KKTAdjoint.apply(kkt, x, z, P_s, q, A_g, b_g)
    # the slack follows from x (exactly zero on the equality rows)
    s = torch.cat([torch.zeros_like(b_g[:, :p]), b_g[:, p:] - _bmv(A_g[:, p:], x)], dim=1) if need_grad else s
    z, s = from_grouped(z), from_grouped(s)
    with torch.no_grad():
        xd = x.detach()
        obj = (q.detach() * xd).sum(1)
        if P_s is not None:
            obj = obj + 0.5 * (xd * _bmv(P_s.detach(), xd)).sum(1)
    stats["objective"] = obj
    solution = to_dtype(ConicSolution(x, status, stats, z=z, s=s), dtype)
    return _apply_policy(solution, on_failure, "solve_conic")


def to_dtype(solution: ConicSolution, dtype: torch.dtype) -> ConicSolution:
    """``solution`` with ``x``, ``z``, ``s`` cast to the caller's ``dtype`` (differentiable;
    ``stats`` keep the compute dtype)."""
    if solution.value.dtype == dtype:
        return solution
    return ConicSolution(
        to_output(solution.value, dtype), solution.status, solution.stats,
        z=to_output(solution.z, dtype), s=to_output(solution.s, dtype),
    )


def _apply_policy(solution: ConicSolution, on_failure: str, what: str) -> ConicSolution:
    status = solution.status
    usable = solution.converged
    if on_failure == "raise":
        if not bool(usable.all()):
            raise ConvergenceError(
                what,
                solution,
                hint="Pass on_failure='nan' or 'mask' to get the per-element status instead of this error "
                "(ConicSolution.status; return_solution=True on the layers).",
            )
    # While torch.compile traces nothing is read from the device (no warnings; "raise"
    # breaks the graph here): the fill below is a no-op where every element is usable.
    traced = compiling()
    inaccurate = status == int(Status.INACCURATE)
    if not traced and bool(inaccurate.any()):
        idx = inaccurate.nonzero().flatten().tolist()
        warnings.warn(
            f"{what}: batch elements {idx[:8]} are INACCURATE: {Status.INACCURATE.message}", RuntimeWarning, stacklevel=4
        )
    if on_failure == "raise" or (not traced and bool(usable.all())):
        return solution
    if not traced:
        failed = (~usable).nonzero().flatten().tolist()
        names = sorted({Status(int(s)).name for s in status[~usable].tolist()})
        warnings.warn(
            f"{what}: batch elements {failed[:8]}{' ...' if len(failed) > 8 else ''} failed ({', '.join(names)}); "
            f"their outputs are {'NaN' if on_failure == 'nan' else 'zero'} (on_failure={on_failure!r}).",
            RuntimeWarning,
            stacklevel=4,  # past solve_conic and without_autocast's frame
        )
    fill = float("nan") if on_failure == "nan" else 0.0
    keep = usable[:, None]
    return ConicSolution(
        torch.where(keep, solution.value, fill),
        status,
        solution.stats,
        z=torch.where(keep, solution.z, fill),
        s=torch.where(keep, solution.s, fill),
    )
