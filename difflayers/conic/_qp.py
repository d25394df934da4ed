"""``QPLayer``: batched quadratic (and linear) programs as a layer."""

from __future__ import annotations

import torch

from ..implicit import Adjoint
from ..solvers._tracing import check_all
from ._cones import Cones
from ._interior_point import InteriorPoint
from ._solve import ON_FAILURE, ConicSolution, solve_conic

__all__ = ["QPLayer", "solve_qp"]

# (name, number of trailing dims when unbatched, shape pattern for messages)
_SPEC = {
    "P": (2, "[n, n]"),
    "q": (1, "[n]"),
    "G": (2, "[m, n]"),
    "h": (1, "[m]"),
    "A": (2, "[p, n]"),
    "b": (1, "[p]"),
    "lb": (1, "[n]"),
    "ub": (1, "[n]"),
}


def _batch_size(args: dict[str, torch.Tensor | None]) -> int | None:
    batch = None
    for name, t in args.items():
        if t is None:
            continue
        core, pattern = _SPEC[name]
        if t.dim() not in (core, core + 1):
            raise ValueError(
                f"QPLayer: {name} must have shape {pattern} or [B, {pattern[1:]}, got {list(t.shape)}."
            )
        if t.dim() == core + 1:
            if batch is not None and t.shape[0] != batch:
                raise ValueError(
                    f"QPLayer: {name} has batch size {t.shape[0]} but another argument has {batch}; "
                    "batched arguments must share the leading dimension (unbatched ones broadcast)."
                )
            batch = t.shape[0]
    return batch


def solve_qp(
    P: torch.Tensor | None,
    q: torch.Tensor,
    G: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    lb: torch.Tensor | None = None,
    ub: torch.Tensor | None = None,
    solver: InteriorPoint | None = None,
    adjoint: Adjoint | None = None,
    on_failure: str = "raise",
    warm_start: ConicSolution | None = None,
) -> tuple[ConicSolution, bool, int, int]:
    """Solve ``min 1/2 x'Px + q'x  s.t.  G x <= h, A x = b, lb <= x <= ub`` (batched).

    Each argument is batched (leading dimension ``B``) or not (broadcast, gradient
    summed over the batch). Returns ``(solution, batched, p, m)`` where the
    solution's duals ``z`` are ordered ``[equalities (p), inequalities (m), bounds]``.
    See ``QPLayer`` for the arguments.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"QPLayer: q must be a torch.Tensor, got {type(q).__name__}.")
    for first, second in (("G", "h"), ("A", "b")):
        given = {"G": G, "h": h, "A": A, "b": b}
        if (given[first] is None) != (given[second] is None):
            raise ValueError(f"QPLayer: pass {first} and {second} together (or neither).")
    args = {"P": P, "q": q, "G": G, "h": h, "A": A, "b": b, "lb": lb, "ub": ub}
    for name, t in args.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"QPLayer: {name} must be a torch.Tensor or None, got {type(t).__name__}.")
        if t is not None and t.dtype != q.dtype:
            raise TypeError(
                f"QPLayer: {name} has dtype {t.dtype} but q has {q.dtype}; pass every argument with one dtype."
            )
        if t is not None and t.device != q.device:
            raise ValueError(
                f"QPLayer: {name} is on {t.device} but q is on {q.device}; move every argument to one device."
            )
    batch = _batch_size(args)
    for name in ("P", "q", "G", "h", "A", "b"):  # named as passed (solve_conic sees them stacked)
        t = args[name]
        if t is not None and t.numel():
            check_all(torch.isfinite(t.detach()), lambda _, name=name: ValueError(
                f"QPLayer: {name} contains NaN or Inf; clean the data before solving (absent bounds are lb/ub "
                "entries of -inf/+inf)."
            ))
    batched = batch is not None
    B = batch if batched else 1
    n = q.shape[-1]

    def expand(name, t):
        core = _SPEC[name][0]
        t = t if t.dim() == core + 1 else t.unsqueeze(0)
        return t.expand(B, *t.shape[1:])

    ex = {name: (None if t is None else expand(name, t)) for name, t in args.items()}
    for name in ("P", "G", "A"):
        t = ex[name]
        if t is not None and t.shape[-1] != n:
            raise ValueError(f"QPLayer: {name} must have n = {n} columns (from q), got shape {list(t.shape)}.")
    if ex["P"] is not None and ex["P"].shape[-2] != n:
        raise ValueError(f"QPLayer: P must be [n, n] with n = {n}, got {list(ex['P'].shape)}.")
    for mat, vec in (("G", "h"), ("A", "b")):
        if ex[mat] is not None and ex[vec].shape[-1] != ex[mat].shape[-2]:
            raise ValueError(
                f"QPLayer: {vec} must have {ex[mat].shape[-2]} entries (the rows of {mat}), got {ex[vec].shape[-1]}."
            )
    eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(B, n, n)
    rows_A, rows_b = [], []
    p = m = 0
    if ex["A"] is not None:
        rows_A.append(ex["A"])
        rows_b.append(ex["b"])
        p = ex["A"].shape[1]
    if ex["G"] is not None:
        rows_A.append(ex["G"])
        rows_b.append(ex["h"])
        m = ex["G"].shape[1]
    nonneg = m
    for name, sign in (("lb", -1.0), ("ub", 1.0)):
        bound = ex[name]
        if bound is None:
            continue
        # checked as passed: a shared bound expanded to an empty batch would hide its NaN
        check_all(~torch.isnan(args[name].detach()), lambda _, name=name: ValueError(
            f"QPLayer: {name} contains NaN; use -inf/+inf for absent bounds."
        ))
        # infinite bounds become rows that always hold with slack 1 (zero dual)
        finite = torch.isfinite(bound)
        rows_A.append(sign * eye * finite[:, :, None].to(q.dtype))
        rows_b.append(torch.where(finite, sign * bound, torch.ones_like(bound)))
        nonneg += n
    if rows_A:
        A_c, b_c = torch.cat(rows_A, dim=1), torch.cat(rows_b, dim=1)
    else:
        A_c, b_c = q.new_zeros(B, 0, n), q.new_zeros(B, 0)
    sol = solve_conic(
        ex["P"],
        ex["q"],
        A_c,
        b_c,
        Cones(zero=p, nonneg=nonneg),
        solver=solver,
        adjoint=adjoint,
        on_failure=on_failure,
        warm_start=warm_start,
    )
    return sol, batched, p, m


class QPLayer(torch.nn.Module):
    """Batched convex quadratic program as a differentiable layer.

    Computes, for each batch element,

        x* = argmin_x 1/2 x'P x + q'x   s.t.   G x <= h,  A x = b,  lb <= x <= ub

    with ``P`` positive semi-definite (``None``: a linear program). Gradients come
    from the implicit function theorem on the KKT conditions, reusing the interior
    point's final factorization (``adjoint=Implicit()``, default), from the
    central path (``adjoint=Smoothed(barrier)``: informative gradients for LPs), or
    from unrolling (``Unroll()``, for testing). Arguments without a batch dimension
    are broadcast and their gradients are summed over the batch. All arguments share
    one floating dtype: float64 (recommended for gradient checks) and float32 are
    solved as given; float16 and bfloat16 are solved in float32 and ``x`` and the
    duals are returned in the input dtype (see ``solve_conic``).

    Args:
        solver: an ``InteriorPoint``.
        adjoint: ``Implicit()``, ``Smoothed(barrier)`` or ``Unroll()``.
        on_failure: ``"raise"`` (default), ``"nan"`` or ``"mask"``; see
            ``solve_conic``.

    Call:
        ``layer(P, q, G=None, h=None, A=None, b=None, *, lb=None, ub=None,
        return_duals=False, return_solution=False)``. Shapes (``B`` optional,
        per argument): ``P [B, n, n]``, ``q [B, n]``, ``G [B, m, n]``, ``h [B, m]``,
        ``A [B, p, n]``, ``b [B, p]``, ``lb, ub [B, n]`` (``+-inf`` for no bound).
        Returns ``x`` (``[B, n]``, or ``[n]`` if no argument is batched); with
        ``return_duals=True`` ``(x, lam, nu)`` where ``lam >= 0`` are the multipliers of
        ``G x <= h`` and ``nu`` those of ``A x = b`` (Lagrangian
        ``1/2 x'Px + q'x + lam'(Gx - h) + nu'(Ax - b)``); with ``return_solution=True``
        the ``ConicSolution`` (statuses, iterations) is appended.

    Example:
        >>> import torch, difflayers as dl
        >>> layer = dl.QPLayer()
        >>> P = torch.eye(2, dtype=torch.float64)
        >>> q = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
        >>> G = torch.ones(1, 2, dtype=torch.float64); h = torch.ones(1, dtype=torch.float64)
        >>> x = layer(P, q, G, h)                  # projection of (1, 1) on x1 + x2 <= 1
        >>> x.detach().round(decimals=6)
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
        >>> x.sum().backward()

    References:
        Amos and Kolter, OptNet: Differentiable Optimization as a Layer in Neural
        Networks (2017), arXiv:1703.00443.
    """

    def __init__(self, *, solver: InteriorPoint | None = None, adjoint: Adjoint | None = None, on_failure: str = "raise"):
        super().__init__()
        if on_failure not in ON_FAILURE:
            raise ValueError(f"QPLayer: on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")
        if solver is not None and not isinstance(solver, InteriorPoint):
            raise TypeError(f"QPLayer: solver must be an InteriorPoint, got {type(solver).__name__}.")
        self.solver = solver
        self.adjoint = adjoint
        self.on_failure = on_failure

    def forward(
        self,
        P: torch.Tensor | None,
        q: torch.Tensor,
        G: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
        A: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        *,
        lb: torch.Tensor | None = None,
        ub: torch.Tensor | None = None,
        return_duals: bool = False,
        return_solution: bool = False,
    ):
        sol, batched, p, m = solve_qp(
            P, q, G, h, A, b, lb=lb, ub=ub, solver=self.solver, adjoint=self.adjoint, on_failure=self.on_failure
        )
        x, nu, lam = sol.value, sol.z[:, :p], sol.z[:, p : p + m]
        if not batched:
            x, nu, lam = x[0], nu[0], lam[0]
        out = (x, lam, nu) if return_duals else (x,)
        if return_solution:
            out = out + (sol,)
        return out if len(out) > 1 else out[0]

    def extra_repr(self) -> str:
        return f"solver={self.solver}, adjoint={self.adjoint}, on_failure={self.on_failure!r}"
