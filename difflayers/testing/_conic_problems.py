"""Seeded random cone programs with known outcomes, and a Clarabel reference solve.

Every generator returns a :class:`ConicBatch` of ``B`` problems of equal shape, in the
form the conic solvers of difflayers take::

    minimize 1/2 x'Px + q'x   subject to   A x + s = b,  s in K,

with ``K = {0}^zero x R_+^nonneg x SOC(d_1) x ... x SOC(d_k)`` in that row order
(:class:`~difflayers.conic._cones.Cones`) and the dual ``z in K*`` of the Lagrangian
``1/2 x'Px + q'x + z'(A x - b)``, so that at a solution ``P x + q + A'z = 0``.

Feasible families are built backwards from a chosen primal-dual pair ``(x0, s0, z0)``
with ``s0 in K``, ``z0 in K*`` and ``s0'z0 = 0``: ``b = A x0 + s0`` and
``q = -P x0 - A'z0`` make it optimal, and strict complementarity (every pair has a
margin of at least 0.5) keeps the optimal active set away from a change. Infeasible
families carry a certificate by construction (Farkas for primal infeasibility, a
recession direction for dual infeasibility). Tensors are built in float64 from a
``torch.Generator`` seeded with ``seed`` and only then cast to ``dtype``, so a seed
gives the same problems in every dtype.

Example:
    >>> batch = random_lp(4, n=3, m=6, seed=0)
    >>> batch.A.shape, batch.cones.dim
    (torch.Size([4, 6, 3]), 6)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from difflayers.conic._cones import Cones

__all__ = [
    "ConicBatch",
    "KnownSolution",
    "QPData",
    "ReferenceSolution",
    "concat_problems",
    "degenerate_lp",
    "dual_infeasible_lp",
    "primal_infeasible_lp",
    "qp_to_conic",
    "random_conic_qp",
    "random_lp",
    "random_qp",
    "random_socp",
    "reference_solve",
]

_F64 = torch.float64


class KnownSolution(NamedTuple):
    """The primal-dual pair a feasible problem was built from (in the batch's dtype).

    ``x`` ``[B, n]``, ``z`` ``[B, m]``, ``s`` ``[B, m]`` with ``P x + q + A'z = 0``,
    ``A x + s = b``, ``s in K``, ``z in K*``, ``s'z = 0``: an optimum. Where a family's
    optimum is not unique (see its docstring) it is one of them.
    """

    x: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ConicBatch:
    """A batch of cone programs of equal shape; unpacks as ``P, q, A, b, cones``.

    Attributes:
        P: ``[B, n, n]`` symmetric positive semidefinite, or ``None`` for a linear program.
        q: ``[B, n]``.
        A: ``[B, m, n]``.
        b: ``[B, m]``.
        cones: the cone of the rows of ``A x + s = b``, shared by the batch.
        solution: the optimum the problems were built from (``None`` for infeasible
            families and for converted problems).
    """

    P: torch.Tensor | None
    q: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    cones: Cones
    solution: KnownSolution | None = None

    def __iter__(self):
        return iter((self.P, self.q, self.A, self.b, self.cones))

    @property
    def batch_size(self) -> int:
        return self.q.shape[0]

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> ConicBatch:
        """The problems at ``index``, keeping the batch dimension (an int gives a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        P = None if self.P is None else self.P[index]
        known = None if self.solution is None else KnownSolution(*(t[index] for t in self.solution))
        return ConicBatch(P, self.q[index], self.A[index], self.b[index], self.cones, known)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ConicBatch:
        """The same problems with every tensor moved to ``dtype`` / ``device``."""

        def move(t):
            return None if t is None else t.to(dtype=dtype, device=device)

        known = None if self.solution is None else KnownSolution(*(move(t) for t in self.solution))
        return ConicBatch(move(self.P), move(self.q), move(self.A), move(self.b), self.cones, known)


class QPData(NamedTuple):
    """A batch of QPs ``minimize 1/2 x'Px + q'x s.t. G x <= h, A x = b``; ``None`` for absent parts.

    Unpacks as ``P, q, G, h, A, b`` (the argument order of ``QPLayer``).
    """

    P: torch.Tensor
    q: torch.Tensor
    G: torch.Tensor | None
    h: torch.Tensor | None
    A: torch.Tensor | None
    b: torch.Tensor | None


class ReferenceSolution(NamedTuple):
    """Per-element result of :func:`reference_solve` (float64, on the CPU).

    Attributes:
        x: ``[B, n]`` primal solution (NaN where no solution was found).
        z: ``[B, m]`` dual solution, ``P x + q + A'z = 0`` (NaN where none was found).
        s: ``[B, m]`` slack, ``A x + s = b`` (NaN where none was found).
        objective: ``[B]``: ``1/2 x'Px + q'x``; ``+inf`` for a primal infeasible
            element, ``-inf`` for a dual infeasible (unbounded) one, NaN otherwise
            when no solution was found.
        status: one of ``"SUCCESS"``, ``"INACCURATE"`` (Clarabel's ``AlmostSolved``),
            ``"PRIMAL_INFEASIBLE"``, ``"DUAL_INFEASIBLE"`` (including Clarabel's
            ``Almost...Infeasible``), ``"MAX_STEPS"``, ``"NUMERICAL_ERROR"`` per element.
        raw_status: Clarabel's own status name per element.
    """

    x: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    objective: torch.Tensor
    status: tuple[str, ...]
    raw_status: tuple[str, ...]


# --------------------------------------------------------------------------- helpers


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=_F64, generator=g)


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, dtype=_F64, generator=g)


def _random_mask(g: torch.Generator, batch: int, m: int, k: int) -> torch.Tensor:
    """``[batch, m]`` boolean, exactly ``k`` True entries per row at random places."""
    order = torch.rand(batch, m, generator=g).argsort(dim=-1)
    mask = torch.zeros(batch, m, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _complementary_orthant(g: torch.Generator, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slack and dual on the nonnegative orthant: ``s = 0 < z`` on active rows, ``z = 0 < s`` elsewhere."""
    value = _uniform(g, 0.5, 2.0, *active.shape)
    zero = torch.zeros_like(value)
    return torch.where(active, zero, value), torch.where(active, value, zero)


def _psd(g: torch.Generator, batch: int, n: int, rank: int | None) -> torch.Tensor:
    """``L L' / n`` with ``L`` of ``rank`` columns; ``+ 0.1 I`` (positive definite) when ``rank`` is None."""
    k = n if rank is None else rank
    L = _randn(g, batch, n, k)
    P = L @ L.mT / n
    if rank is None:
        P = P + 0.1 * torch.eye(n, dtype=_F64)
    return 0.5 * (P + P.mT)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")


def _finish(P, q, A, b, cones, dtype, known: tuple | None = None) -> ConicBatch:
    known = None if known is None else KnownSolution(*known)
    return ConicBatch(P, q, A, b, cones, known).to(dtype=dtype)


# ------------------------------------------------------------------------ families


def random_lp(batch: int, n: int, m: int, *, m_eq: int = 0, seed: int = 0,
              dtype: torch.dtype = _F64) -> ConicBatch:
    """Feasible, bounded LPs with a unique, nondegenerate primal-dual solution.

    ``m_eq`` equality rows and ``m`` inequality rows; exactly ``n - m_eq`` inequalities
    are active at the solution, with strictly positive duals, so the optimal vertex is
    unique and nondegenerate (for generic ``A``).

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m: number of inequality rows (``>= n - m_eq``).
        m_eq: number of equality rows (``<= n``).
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``P = None`` and ``Cones(zero=m_eq, nonneg=m)``.

    Raises:
        ValueError: if ``m_eq > n`` or ``m < n - m_eq``.
    """
    _check_sizes(batch=batch, n=n, m=m, m_eq=m_eq)
    if m_eq > n or m < n - m_eq:
        raise ValueError(f"random_lp needs m_eq <= n and m >= n - m_eq; got n={n}, m={m}, m_eq={m_eq}.")
    g = _generator(seed)
    A = _randn(g, batch, m_eq + m, n)
    x0 = _randn(g, batch, n)
    s_in, z_in = _complementary_orthant(g, _random_mask(g, batch, m, n - m_eq))
    s = torch.cat([torch.zeros(batch, m_eq, dtype=_F64), s_in], dim=1)
    z = torch.cat([_randn(g, batch, m_eq), z_in], dim=1)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + s
    q = -(A.mT @ z.unsqueeze(-1)).squeeze(-1)
    return _finish(None, q, A, b, Cones(zero=m_eq, nonneg=m), dtype, (x0, z, s))


def random_conic_qp(batch: int, n: int, m_ineq: int, *, m_eq: int = 0, rank: int | None = None,
                    seed: int = 0, dtype: torch.dtype = _F64) -> ConicBatch:
    """Convex QPs with equality and inequality rows and a unique primal-dual solution.

    ``P = L L'`` with ``L`` of ``rank`` columns (positive semidefinite, rank
    deficient when ``rank < n``; ``rank=0`` is an LP written with a zero ``P``), or
    ``L L' / n + 0.1 I`` (positive definite) when ``rank`` is None. For a given
    ``rank``, ``L`` holds an orthonormal basis of the null space of the active rows
    plus random columns, so the reduced Hessian is at least ``I`` and ``x*`` is well
    conditioned. Enough inequalities are active (about half of them, and at least
    ``n - rank - m_eq``) for the solution to be unique, and at most ``n - m_eq`` so
    that the duals are unique too.

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m_ineq: number of inequality rows.
        m_eq: number of equality rows.
        rank: rank of ``P``, or None for a positive definite ``P``.
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``Cones(zero=m_eq, nonneg=m_ineq)``.

    Raises:
        ValueError: if the rows cannot make the solution unique.
    """
    _check_sizes(batch=batch, n=n, m_ineq=m_ineq, m_eq=m_eq)
    r = n if rank is None else rank
    if not 0 <= r <= n:
        raise ValueError(f"rank must be in [0, n={n}] or None, got {rank!r}.")
    k = min(m_ineq, n - m_eq, max(n - r - m_eq, m_ineq // 2))
    if m_eq > n or m_eq + k < n - r:
        raise ValueError(
            f"random_conic_qp: with n={n}, rank={rank}, m_eq={m_eq}, m_ineq={m_ineq} the solution "
            f"is not unique; use m_eq + m_ineq >= n - rank and m_eq <= n.")
    g = _generator(seed)
    A = _randn(g, batch, m_eq + m_ineq, n)
    x0 = _randn(g, batch, n)
    active = _random_mask(g, batch, m_ineq, k)
    s_in, z_in = _complementary_orthant(g, active)
    if rank is None:
        P = _psd(g, batch, n, None)
    else:
        # A random rank-r P can be nearly singular on the null space of the active rows,
        # which makes x* ill-conditioned; put that null space into the range of P so the
        # reduced Hessian is >= I.
        rows = torch.cat([torch.ones(batch, m_eq, dtype=torch.bool), active], dim=1)
        null = torch.linalg.svd(A * rows.unsqueeze(-1), full_matrices=True).Vh[:, m_eq + k:].mT
        L = torch.cat([null, _randn(g, batch, n, r - null.shape[-1]) / math.sqrt(n)], dim=-1)
        P = L @ L.mT
        P = 0.5 * (P + P.mT)
    s = torch.cat([torch.zeros(batch, m_eq, dtype=_F64), s_in], dim=1)
    z = torch.cat([_randn(g, batch, m_eq), z_in], dim=1)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + s
    q = -(P @ x0.unsqueeze(-1)).squeeze(-1) - (A.mT @ z.unsqueeze(-1)).squeeze(-1)
    return _finish(P, q, A, b, Cones(zero=m_eq, nonneg=m_ineq), dtype, (x0, z, s))


def random_socp(batch: int, n: int, soc: Sequence[int] = (3, 4, 5), *, m_ineq: int = 0, m_eq: int = 0,
                quadratic: bool = False, seed: int = 0, dtype: torch.dtype = _F64) -> ConicBatch:
    """Feasible, bounded second-order cone programs (optionally with a quadratic objective).

    Each second-order block is, per element and at random, strictly inside the cone
    (dual zero), at the apex (slack zero, dual strictly inside the dual cone), or on
    the boundary with a complementary dual on the opposite ray ``s = a (1, u)``,
    ``z = c (1, -u)``, ``||u|| = 1``; every pair is strictly complementary. Without a
    quadratic term, blocks are moved to the apex until the optimal rows pin all ``n``
    directions, so the solution is unique (for generic ``A``) in both cases.

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        soc: dimension of each second-order cone (each ``>= 1``).
        m_ineq: number of nonnegative rows (about half active at the solution).
        m_eq: number of equality rows (``<= n``). Without ``quadratic``,
            ``m_eq + m_ineq // 2 + sum(soc) >= n`` is required.
        quadratic: add a positive definite ``P``; ``P = None`` otherwise.
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``Cones(zero=m_eq, nonneg=m_ineq, soc=tuple(soc))``.
    """
    _check_sizes(batch=batch, n=n, m_ineq=m_ineq, m_eq=m_eq)
    cones = Cones(zero=m_eq, nonneg=m_ineq, soc=tuple(soc))
    if m_eq > n:
        raise ValueError(f"random_socp needs m_eq <= n; got n={n}, m_eq={m_eq}.")
    pinned_at_most = m_eq + m_ineq // 2 + sum(cones.soc)
    if not quadratic and pinned_at_most < n:
        raise ValueError(
            f"random_socp: without a quadratic term the solution is unique only if m_eq + m_ineq // 2 + sum(soc) "
            f">= n; got {pinned_at_most} < n={n}. Add rows or cones, or pass quadratic=True.")
    g = _generator(seed)
    P = _psd(g, batch, n, None) if quadratic else None
    A = _randn(g, batch, cones.dim, n)
    x0 = _randn(g, batch, n)
    s_in, z_in = _complementary_orthant(g, _random_mask(g, batch, m_ineq, m_ineq // 2))
    s_parts, z_parts = [torch.zeros(batch, m_eq, dtype=_F64), s_in], [_randn(g, batch, m_eq), z_in]
    # kind 0: s interior, z = 0 (pins nothing);  kind 1: s = 0, z interior (pins d
    # directions);  kind 2: both on the boundary, s = a (1, u), z = c (1, -u) (s must
    # stay on its ray: pins d - 1 directions). Without P, cones are moved to kind 1
    # until n directions are pinned, so that x* is unique.
    kinds = [torch.randint(0, 3 if d > 1 else 2, (batch,), generator=g) for d in cones.soc]

    def pinned():
        count = torch.full((batch,), m_eq + m_ineq // 2)
        for d, kind in zip(cones.soc, kinds):
            count = count + torch.where(kind == 1, d, torch.where(kind == 2, d - 1, 0))
        return count

    if not quadratic:
        for j in range(len(kinds)):
            kinds[j] = torch.where(pinned() < n, 1, kinds[j])
    for d, kind in zip(cones.soc, kinds):
        kind = kind.unsqueeze(-1)
        w = _randn(g, batch, d - 1)
        interior = torch.cat([w.norm(dim=-1, keepdim=True) + _uniform(g, 0.5, 1.5, batch, 1), w], dim=1)
        u = _randn(g, batch, d - 1)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, c = _uniform(g, 0.5, 2.0, batch, 1), _uniform(g, 0.5, 2.0, batch, 1)
        ones = torch.ones(batch, 1, dtype=_F64)
        s_edge, z_edge = a * torch.cat([ones, u], dim=1), c * torch.cat([ones, -u], dim=1)
        zero = torch.zeros(batch, d, dtype=_F64)
        s_parts.append(torch.where(kind == 0, interior, torch.where(kind == 1, zero, s_edge)))
        z_parts.append(torch.where(kind == 0, zero, torch.where(kind == 1, interior, z_edge)))
    s, z = torch.cat(s_parts, dim=1), torch.cat(z_parts, dim=1)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + s
    q = -(A.mT @ z.unsqueeze(-1)).squeeze(-1)
    if P is not None:
        q = q - (P @ x0.unsqueeze(-1)).squeeze(-1)
    return _finish(P, q, A, b, cones, dtype, (x0, z, s))


def degenerate_lp(batch: int, n: int, m: int, *, seed: int = 0, dtype: torch.dtype = _F64) -> ConicBatch:
    """Bounded LPs whose solutions are degenerate; the optimal value stays unique.

    Rows are ``m`` random inequalities followed by the box ``-3 <= x <= 3`` (``2n``
    rows), so every problem is bounded. Even elements have several optimal vertices:
    only ``max(1, n // 2)`` inequalities carry a positive dual, so the cost is
    orthogonal to a face of dimension ``n - n // 2``. Odd elements have a unique but
    degenerate optimal vertex: ``n + 2`` inequalities are tight there and only ``n``
    of them carry a positive dual (the duals are not unique).

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m: number of random inequality rows (``>= n + 2``).
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``P = None`` and ``Cones(nonneg=m + 2 * n)``.
    """
    _check_sizes(batch=batch, n=n, m=m)
    if m < n + 2:
        raise ValueError(f"degenerate_lp needs m >= n + 2 random rows; got n={n}, m={m}.")
    g = _generator(seed)
    radius = 3.0
    A_rand = _randn(g, batch, m, n)
    x0 = _uniform(g, -1.0, 1.0, batch, n)
    odd = (torch.arange(batch) % 2 == 1).unsqueeze(-1)
    # Even: a face; odd: a vertex with two extra tight rows, whose duals are zero.
    tight_even = _random_mask(g, batch, m, max(1, n // 2))
    tight_odd = _random_mask(g, batch, m, n + 2)
    order = torch.where(tight_odd, torch.rand(batch, m, generator=g), 2.0).argsort(dim=-1)
    dual_odd = torch.zeros(batch, m, dtype=torch.bool).scatter_(1, order[:, :n], True)
    tight = torch.where(odd, tight_odd, tight_even)
    positive_dual = torch.where(odd, dual_odd, tight_even)
    value = _uniform(g, 0.5, 2.0, batch, m)
    s_rand = torch.where(tight, 0.0, value)
    z_rand = torch.where(positive_dual, _uniform(g, 0.5, 2.0, batch, m), 0.0)
    eye = torch.eye(n, dtype=_F64).expand(batch, n, n)
    A = torch.cat([A_rand, eye, -eye], dim=1)
    b = torch.cat([(A_rand @ x0.unsqueeze(-1)).squeeze(-1) + s_rand,
                   torch.full((batch, 2 * n), radius, dtype=_F64)], dim=1)
    q = -(A_rand.mT @ z_rand.unsqueeze(-1)).squeeze(-1)
    known = (x0, torch.cat([z_rand, torch.zeros(batch, 2 * n, dtype=_F64)], dim=1),
             torch.cat([s_rand, radius - x0, radius + x0], dim=1))
    return _finish(None, q, A, b, Cones(nonneg=m + 2 * n), dtype, known)


def primal_infeasible_lp(batch: int, n: int, m: int, *, m_eq: int = 0, seed: int = 0,
                         dtype: torch.dtype = _F64) -> ConicBatch:
    """Primal infeasible LPs, shaped like :func:`random_lp` with the same arguments.

    A Farkas certificate ``y`` (free on equality rows, ``>= 0`` on three inequality
    rows, zero elsewhere) with ``A'y = 0`` and ``b'y = -1`` is built in, so no ``x``
    satisfies ``A x + s = b, s in K``: one row of ``A`` and ``b`` is solved for.

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m: number of inequality rows (``>= 2``).
        m_eq: number of equality rows.
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``P = None`` and ``Cones(zero=m_eq, nonneg=m)``.
    """
    _check_sizes(batch=batch, n=n, m=m, m_eq=m_eq)
    if m < 2:
        raise ValueError(f"primal_infeasible_lp needs m >= 2 inequality rows; got m={m}.")
    g = _generator(seed)
    A = _randn(g, batch, m_eq + m, n)
    b = _randn(g, batch, m_eq + m)
    q = _randn(g, batch, n)
    support = _random_mask(g, batch, m, min(m, 3))
    y = torch.cat([_randn(g, batch, m_eq), torch.where(support, _uniform(g, 0.5, 2.0, batch, m), 0.0)], dim=1)
    # Row j (the first supported inequality) absorbs the certificate.
    j = m_eq + support.to(torch.int64).argmax(dim=-1)
    rows = torch.arange(batch)
    yj = y[rows, j]
    y_others = y.clone()
    y_others[rows, j] = 0.0
    A[rows, j] = -(A.mT @ y_others.unsqueeze(-1)).squeeze(-1) / yj.unsqueeze(-1)
    b[rows, j] = (-1.0 - (b * y_others).sum(dim=-1)) / yj
    return _finish(None, q, A, b, Cones(zero=m_eq, nonneg=m), dtype)


def dual_infeasible_lp(batch: int, n: int, m: int, *, m_eq: int = 0, seed: int = 0,
                       dtype: torch.dtype = _F64) -> ConicBatch:
    """Feasible but unbounded LPs, shaped like :func:`random_lp` with the same arguments.

    A strictly feasible ``x0`` and a recession direction ``d`` with ``A_eq d = 0``,
    ``A_in d < 0`` and ``q'd = -1`` are built in, so ``x0 + t d`` stays feasible while
    the objective decreases without bound.

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m: number of inequality rows.
        m_eq: number of equality rows (``< n``).
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``ConicBatch`` with ``P = None`` and ``Cones(zero=m_eq, nonneg=m)``.
    """
    _check_sizes(batch=batch, n=n, m=m, m_eq=m_eq)
    if m_eq >= n:
        raise ValueError(f"dual_infeasible_lp needs m_eq < n; got n={n}, m_eq={m_eq}.")
    g = _generator(seed)
    A = _randn(g, batch, m_eq + m, n)
    d = _randn(g, batch, n)
    dd = (d * d).sum(dim=-1, keepdim=True).unsqueeze(-1)
    target = torch.cat([torch.zeros(batch, m_eq, dtype=_F64), -_uniform(g, 0.5, 1.5, batch, m)], dim=1)
    Ad = (A @ d.unsqueeze(-1)).squeeze(-1)
    A = A + ((target - Ad).unsqueeze(-1) * d.unsqueeze(-2)) / dd
    q = _randn(g, batch, n)
    q = q - ((q * d).sum(dim=-1, keepdim=True) + 1.0) * d / dd.squeeze(-1)
    x0 = _randn(g, batch, n)
    s = torch.cat([torch.zeros(batch, m_eq, dtype=_F64), _uniform(g, 0.5, 2.0, batch, m)], dim=1)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1) + s
    return _finish(None, q, A, b, Cones(zero=m_eq, nonneg=m), dtype)


def random_qp(batch: int, n: int, m_ineq: int, m_eq: int = 0, seed: int = 0,
              dtype: torch.dtype = _F64) -> QPData:
    """Dense, strictly convex, feasible QPs in ``QPLayer`` form (the benchmark data).

    ``P = L L' / n + 0.1 I`` with ``L`` standard normal ``n x n``; ``G``, ``A``, ``q``
    standard normal; ``h = G x0 + slack`` with ``slack`` uniform in ``[0.1, 1]`` and
    ``b = A x0`` for a standard normal ``x0``, so ``x0`` is strictly feasible. Which
    inequalities are active at the solution is left to chance (typically a fraction).

    Args:
        batch: number of problems ``B``.
        n: number of variables.
        m_ineq: number of inequalities ``G x <= h`` (``0`` gives ``G = h = None``).
        m_eq: number of equalities ``A x = b`` (``0`` gives ``A = b = None``; ``< n``).
        seed: seed of the generator.
        dtype: dtype of the returned tensors.

    Returns:
        ``QPData(P, q, G, h, A, b)`` with batch dimension ``B`` on every tensor.
    """
    _check_sizes(batch=batch, n=n, m_ineq=m_ineq, m_eq=m_eq)
    if m_eq >= n and m_eq > 0:
        raise ValueError(f"random_qp needs m_eq < n; got n={n}, m_eq={m_eq}.")
    g = _generator(seed)
    P = _psd(g, batch, n, None)
    q = _randn(g, batch, n)
    x0 = _randn(g, batch, n)
    G = _randn(g, batch, m_ineq, n)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + _uniform(g, 0.1, 1.0, batch, m_ineq)
    A = _randn(g, batch, m_eq, n)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)

    def cast(t, present):
        return t.to(dtype) if present else None

    return QPData(P.to(dtype), q.to(dtype), cast(G, m_ineq > 0), cast(h, m_ineq > 0), cast(A, m_eq > 0),
                  cast(b, m_eq > 0))


# --------------------------------------------------------------------- conversions


def qp_to_conic(P: torch.Tensor | None, q: torch.Tensor, G: torch.Tensor | None = None,
                h: torch.Tensor | None = None, A: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> ConicBatch:
    """Write ``minimize 1/2 x'Px + q'x s.t. G x <= h, A x = b`` as a cone program.

    Rows are ``[A; G]`` and ``[b; h]`` with ``Cones(zero=m_eq, nonneg=m_ineq)``; the
    conic dual ``z`` splits as ``z = [nu; lam]``. Unbatched tensors are expanded to
    the batch size of ``q`` (``q`` must be batched, ``[B, n]``).
    """
    if q.dim() != 2:
        raise ValueError(f"qp_to_conic expects a batched q of shape [B, n], got {tuple(q.shape)}.")
    B, n = q.shape

    def expand(t, dims):
        return None if t is None else (t if t.dim() == dims + 1 else t.expand(B, *t.shape))

    P, G, h, A, b = expand(P, 2), expand(G, 2), expand(h, 1), expand(A, 2), expand(b, 1)
    empty_rows, empty_rhs = q.new_zeros(B, 0, n), q.new_zeros(B, 0)
    G = empty_rows if G is None else G
    h = empty_rhs if h is None else h
    A = empty_rows if A is None else A
    b = empty_rhs if b is None else b
    return ConicBatch(P, q, torch.cat([A, G], dim=1), torch.cat([b, h], dim=1),
                      Cones(zero=A.shape[1], nonneg=G.shape[1]))


def concat_problems(problems: Sequence[ConicBatch]) -> ConicBatch:
    """Stack batches of equal shape and equal cones along the batch dimension.

    ``P`` must be ``None`` in all of them or in none.
    """
    problems = list(problems)
    if not problems:
        raise ValueError("concat_problems needs at least one ConicBatch.")
    cones = problems[0].cones
    if any(p.cones != cones for p in problems):
        raise ValueError(f"concat_problems: cones differ: {[p.cones for p in problems]}.")
    has_P = [p.P is not None for p in problems]
    if any(has_P) and not all(has_P):
        raise ValueError("concat_problems: P is None in some batches and not in others.")
    P = torch.cat([p.P for p in problems]) if all(has_P) else None
    known = None
    if all(p.solution is not None for p in problems):
        known = KnownSolution(*(torch.cat(parts) for parts in zip(*(p.solution for p in problems))))
    return ConicBatch(P, torch.cat([p.q for p in problems]), torch.cat([p.A for p in problems]),
                      torch.cat([p.b for p in problems]), cones, known)


# ---------------------------------------------------------------------- reference

_STATUS = {
    "Solved": "SUCCESS",
    "AlmostSolved": "INACCURATE",
    "PrimalInfeasible": "PRIMAL_INFEASIBLE",
    "AlmostPrimalInfeasible": "PRIMAL_INFEASIBLE",
    "DualInfeasible": "DUAL_INFEASIBLE",
    "AlmostDualInfeasible": "DUAL_INFEASIBLE",
    "MaxIterations": "MAX_STEPS",
    "MaxTime": "MAX_STEPS",
}


def reference_solve(P: torch.Tensor | None, q: torch.Tensor, A: torch.Tensor, b: torch.Tensor, cones: Cones, *,
                    tol: float = 1e-10, max_iter: int = 200) -> ReferenceSolution:
    """Solve each element of a batch of cone programs with Clarabel, in float64 on the CPU.

    The problem and the sign conventions are those of the module docstring (they are
    Clarabel's own: ``A x + s = b``, ``s in K``, ``P x + q + A'z = 0``, ``z in K*``).
    Optimal values agree with the constructed optima to about ``1e-9``; ``x`` does to
    about ``1e-11`` on LPs and QPs but only to a few ``1e-6`` with second-order cones,
    where ``ConicBatch.solution`` is the better reference for ``x``.

    Args:
        P: ``[B, n, n]`` (its symmetric part ``(P + P')/2`` is used) or None for an LP.
        q: ``[B, n]``.
        A: ``[B, m, n]``.
        b: ``[B, m]``.
        cones: the cone of the rows.
        tol: Clarabel's ``tol_gap_abs``, ``tol_gap_rel`` and ``tol_feas``. An element
            that ends ``AlmostSolved`` is solved again at ``10 * tol``, then ``100 * tol``.
        max_iter: Clarabel's iteration limit.

    Returns:
        ``ReferenceSolution`` with float64 CPU tensors and a status per element.

    Raises:
        ImportError: if ``clarabel`` (a dependency of cvxpy) is not installed.
    """
    import clarabel
    import scipy.sparse as sp

    if q.dim() != 2 or A.dim() != 3 or b.dim() != 2 or (P is not None and P.dim() != 3):
        raise ValueError("reference_solve expects batched P [B,n,n] (or None), q [B,n], A [B,m,n], b [B,m].")
    B, n = q.shape
    m = cones.dim
    if A.shape != (B, m, n) or b.shape != (B, m):
        raise ValueError(f"reference_solve: A {tuple(A.shape)} and b {tuple(b.shape)} do not match "
                         f"B={B}, n={n}, cones.dim={m}.")
    to_np = lambda t: t.detach().to(device="cpu", dtype=_F64).numpy()  # noqa: E731
    Pn = None if P is None else to_np(0.5 * (P + P.mT))  # 1/2 x'Px reads only the symmetric part
    qn, An, bn = to_np(q), to_np(A), to_np(b)
    clarabel_cones = []
    if cones.zero:
        clarabel_cones.append(clarabel.ZeroConeT(cones.zero))
    if cones.nonneg:
        clarabel_cones.append(clarabel.NonnegativeConeT(cones.nonneg))
    # A one-dimensional second-order cone is the half line t >= 0.
    clarabel_cones += [clarabel.SecondOrderConeT(d) if d > 1 else clarabel.NonnegativeConeT(1) for d in cones.soc]
    def settings_for(tolerance):
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        settings.tol_gap_abs = tolerance
        settings.tol_gap_rel = tolerance
        settings.tol_feas = tolerance
        settings.tol_ktratio = min(1e-6, 100 * tolerance)
        settings.max_iter = max_iter
        settings.presolve_enable = False  # keep every row, so that z and s have m entries
        return settings

    # Clarabel sometimes stalls just short of a very tight tolerance on second-order
    # cones and then reports AlmostSolved at its much looser reduced tolerances;
    # a solve at 10x or 100x the tolerance is then the more accurate answer.
    attempts = [settings_for(tol * factor) for factor in (1.0, 10.0, 100.0)]

    x = np.full((B, n), np.nan)
    z = np.full((B, m), np.nan)
    s = np.full((B, m), np.nan)
    objective = np.full(B, np.nan)
    status, raw = [], []
    for i in range(B):
        Pi = sp.csc_matrix((n, n)) if Pn is None else sp.csc_matrix(np.triu(Pn[i]))
        Ai = sp.csc_matrix(An[i])
        for settings in attempts:
            sol = clarabel.DefaultSolver(Pi, qn[i], Ai, bn[i], clarabel_cones, settings).solve()
            if str(sol.status).split(".")[-1] != "AlmostSolved":
                break
        name = str(sol.status).split(".")[-1]
        raw.append(name)
        mapped = _STATUS.get(name, "NUMERICAL_ERROR")
        status.append(mapped)
        if mapped in ("SUCCESS", "INACCURATE"):
            x[i], z[i], s[i] = np.asarray(sol.x), np.asarray(sol.z), np.asarray(sol.s)
            quad = 0.0 if Pn is None else 0.5 * x[i] @ Pn[i] @ x[i]
            objective[i] = quad + qn[i] @ x[i]
        elif mapped == "PRIMAL_INFEASIBLE":
            objective[i] = math.inf
        elif mapped == "DUAL_INFEASIBLE":
            objective[i] = -math.inf
    as_t = lambda a: torch.from_numpy(a)  # noqa: E731
    return ReferenceSolution(as_t(x), as_t(z), as_t(s), as_t(objective), tuple(status), tuple(raw))
