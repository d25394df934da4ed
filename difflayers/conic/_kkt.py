"""Batched factorization of the KKT matrix of a cone program, shared by the
interior-point steps and the implicit backward.

The matrix, with ``E`` the equality rows and ``I`` the cone rows (``W`` the scaling)::

    K = [[P,    A_E',  A_I' ],
         [A_E,  0,     0    ],
         [A_I,  0,    -W^2  ]]          (symmetric, quasi-definite)

is solved by eliminating ``dz_I = W^-2 (A_I dx - r_I)`` and adding ``rho A_E'`` times
the equality rows to the first block row (an augmented Lagrangian, exact for any
``rho > 0``)::

    M = P + A_I' W^-2 A_I + rho A_E' A_E + eps I        (Cholesky, n x n)
    S = A_E M^-1 A_E'                                  (Cholesky, p x p)

so only two batched Cholesky factorizations are needed even when ``P`` is singular
(an LP) or only positive semi-definite. ``eps`` is a tiny static regularization
relative to the largest diagonal entry of ``M``; a few steps of iterative refinement
against the unregularized ``K`` remove its effect (and recover float32 accuracy).
"""

from __future__ import annotations

import copy

import torch

from ..solvers._tracing import compiling, host_any
from ._cone_algebra import Scaling

__all__ = ["KKTFactorization", "DualKKTFactorization", "DualPrecomputation"]


# Row-vector products: on CPU a batched [1, n] x [n, m] product is several times
# faster than the [m, n] x [n, 1] one.
def _bmv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` for ``A [B, m, n]``, ``x [B, n]``."""
    return torch.bmm(x.unsqueeze(1), A.transpose(1, 2)).squeeze(1)


def _bmtv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A' x`` for ``A [B, m, n]``, ``x [B, m]``."""
    return torch.bmm(x.unsqueeze(1), A).squeeze(1)


class KKTFactorization:
    """Factorized ``K`` for one batch of problems at one scaling.

    Args:
        P: ``[B, n, n]`` symmetric PSD, or ``None`` (zero).
        A: ``[B, m, n]`` with rows ``[A_E; A_I]`` (``A_I`` in grouped layout).
        num_eq: number of equality rows ``p``.
        scaling: the ``Scaling`` of the cone rows.
        refine_steps: iterative-refinement steps per solve.
        regularization: ``eps`` relative to ``max diag(M)``.
        eq_diag: optional ``[B, p]`` diagonal ``D >= 0`` of the equality block
            (``K`` then has ``-D`` there). A row with ``D = 1`` must be a zero row of
            ``A``; it stands for a dropped constraint (``dz = 0``: its right-hand side
            is ignored).
    """

    def __init__(
        self,
        P: torch.Tensor | None,
        A: torch.Tensor,
        num_eq: int,
        scaling: Scaling,
        *,
        refine_steps: int,
        regularization: float,
        eq_diag: torch.Tensor | None = None,
    ):
        self.P, self.A, self.p, self.scaling = P, A, num_eq, scaling
        self.eq_diag = eq_diag
        self.refine_steps = refine_steps
        A_E, A_I = A[:, :num_eq], A[:, num_eq:]
        self.A_E, self.A_I = A_E, A_I
        batch, n = A.shape[0], A.shape[2]
        G = scaling.apply_inverse(A_I) if A_I.shape[1] > 0 else A_I  # W^-1 A_I
        if eq_diag is not None:
            self.keep = (eq_diag == 0).to(A.dtype)
        # the regularization follows the data's scale, not the scaling W (whose
        # entries span many orders of magnitude near a solution)
        data_scale = A.square().sum(2).amax(1) if A.shape[1] > 0 else A.new_zeros(batch)
        if P is not None:
            data_scale = torch.maximum(data_scale, P.diagonal(dim1=1, dim2=2).abs().amax(1))
        data_scale = data_scale.clamp_min(1.0)
        M = G.transpose(1, 2) @ G
        if P is not None:
            M = M + P
        if num_eq > 0:
            # rho scales the equality block like the data, so that neither dominates
            mean_row = A_E.square().sum((1, 2)) / num_eq
            self.rho = (data_scale / mean_row.clamp_min(torch.finfo(A.dtype).tiny)).clamp(1e-8, 1e8)
            M = M + self.rho[:, None, None] * (A_E.transpose(1, 2) @ A_E)
        eps = regularization * data_scale
        self.eps = eps
        M = M + eps[:, None, None] * torch.eye(n, dtype=A.dtype, device=A.device)
        self.L, info = _cholesky(M, regularization)
        if num_eq > 0:
            Y = torch.cholesky_solve(A_E.transpose(1, 2), self.L)  # M^-1 A_E'
            S = A_E @ Y
            S = 0.5 * (S + S.transpose(1, 2))
            if eq_diag is not None:
                S = S + torch.diag_embed(eq_diag)
            S = S + (regularization / self.rho)[:, None, None] * torch.eye(num_eq, dtype=A.dtype, device=A.device)
            self.LS, info_s = _cholesky(S, regularization)
            info = torch.maximum(info, info_s)
        self.info = info  # > 0 where a factorization failed (that sample's step is NaN)

    # -- K and its regularized inverse -------------------------------------------------
    # Right-hand sides are stacked as rows: dx [B, k, n], dz [B, k, m]. Solving k
    # systems at once streams each matrix once instead of k times (the products are
    # memory bound).
    def matvec(self, dx: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K [dx; dz]`` with the exact (unregularized) ``K``; rows are right-hand sides."""
        return _kkt_matvec(self, dx, dz)

    def _solve_once(self, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_E, r_I = rz[:, :, : self.p], rz[:, :, self.p :]
        sc = self.scaling
        w2r = _rows(sc.apply_inverse, _rows(sc.apply_inverse, r_I)) if r_I.shape[2] > 0 else r_I  # W^-2 r_I
        t = rx + torch.bmm(w2r, self.A_I)
        if self.p > 0:
            t = t + self.rho[:, None, None] * torch.bmm(r_E, self.A_E)
            u = torch.cholesky_solve(t.transpose(1, 2), self.L)  # [B, n, k]
            dz_E = torch.cholesky_solve(torch.bmm(self.A_E, u) - r_E.transpose(1, 2), self.LS).transpose(1, 2)
            dx = torch.cholesky_solve((t - torch.bmm(dz_E, self.A_E)).transpose(1, 2), self.L).transpose(1, 2)
        else:
            dx = torch.cholesky_solve(t.transpose(1, 2), self.L).transpose(1, 2)
            dz_E = r_E
        if r_I.shape[2] > 0:
            dz_I = _rows(sc.apply_inverse, _rows(sc.apply_inverse, torch.bmm(dx, self.A_I.transpose(1, 2)))) - w2r
            dz = torch.cat([dz_E, dz_I], dim=2)
        else:
            dz = dz_E
        return dx, dz

    def solve(self, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``K [dx; dz] = [rx; rz]`` with refinement.

        ``rx [B, n]``, ``rz [B, m]``, or ``k`` systems at once as ``[B, k, n]``,
        ``[B, k, m]``.
        """
        return _refined_solve(self, rx, rz)


def _cholesky(M: torch.Tensor, regularization: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky factor of a symmetric positive semi-definite ``M``.

    The caller's regularization follows the data's scale, which keeps the steps
    accurate; where that leaves a matrix numerically indefinite (entries of the
    scaling spanning more than the working precision), those samples are factorized
    again with a regularization relative to their largest diagonal entry. Costs one
    host sync (none while torch.compile traces: the second factorization then always
    runs, and is kept only where the first failed).
    """
    L, info = torch.linalg.cholesky_ex(M)
    bad = info > 0
    if host_any(bad):
        # the whole batch again, not M[bad]: a data-dependent shape cannot be traced
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        shift = max(regularization, 1e3 * torch.finfo(M.dtype).eps) * M.diagonal(dim1=1, dim2=2).abs().amax(-1)
        Lb, info_b = torch.linalg.cholesky_ex(M + shift[:, None, None] * eye)
        L, info = torch.where(bad[:, None, None], Lb, L), torch.where(bad, info_b, info)
    return L, info


def _rows(apply, R: torch.Tensor) -> torch.Tensor:
    """Apply a column-wise operator (``[B, mi, r] -> [B, mi, r]``) to rows ``[B, k, mi]``."""
    return apply(R.transpose(1, 2)).transpose(1, 2)


def _kkt_matvec(kkt, dx: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.bmm(dz, kkt.A)
    if kkt.P is not None:
        top = top + torch.bmm(dx, kkt.P)  # P symmetric
    bottom = torch.bmm(dx, kkt.A.transpose(1, 2))
    p = kkt.p
    parts = [bottom[:, :, :p]]
    if kkt.eq_diag is not None:
        parts = [bottom[:, :, :p] - kkt.eq_diag[:, None, :] * dz[:, :, :p]]
    if bottom.shape[2] > p:
        sc = kkt.scaling
        parts.append(bottom[:, :, p:] - _rows(sc.apply, _rows(sc.apply, dz[:, :, p:])))
    return top, torch.cat(parts, dim=2)


def _refined_solve(kkt, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vector = rx.dim() == 2
    if vector:
        rx, rz = rx.unsqueeze(1), rz.unsqueeze(1)
    if kkt.eq_diag is not None:
        rz = torch.cat([rz[:, :, : kkt.p] * kkt.keep[:, None, :], rz[:, :, kkt.p :]], dim=2)
    dx, dz = kkt._solve_once(rx, rz)
    for _ in range(kkt.refine_steps):
        kx, kz = _kkt_matvec(kkt, dx, dz)
        cx, cz = kkt._solve_once(rx - kx, rz - kz)
        dx, dz = dx + cx, dz + cz
    if vector:
        dx, dz = dx.squeeze(1), dz.squeeze(1)
    return dx, dz


class DualPrecomputation:
    """What the dual (``m``-space) factorization reuses at every iteration.

    For a positive definite ``P``: its Cholesky factor, ``P^-1 A'`` and
    ``A P^-1 A'``, computed once per solve.
    """

    def __init__(self, P: torch.Tensor, A: torch.Tensor, L: torch.Tensor):
        self.P, self.A, self.L = P, A, L
        # P's explicit inverse: computed once per solve, then one product per use
        self.Pinv = torch.cholesky_inverse(L)
        self.PinvAt = self.Pinv @ A.transpose(1, 2)  # [B, n, m]
        APA = A @ self.PinvAt
        self.APA = 0.5 * (APA + APA.transpose(1, 2))
        self.data_scale = self.APA.diagonal(dim1=1, dim2=2).abs().amax(-1).clamp_min(1.0)

    def map(self, fn) -> DualPrecomputation:
        """A copy with ``fn`` applied to every tensor (e.g. a differentiable identity)."""
        out = copy.copy(self)
        for name in ("P", "A", "L", "Pinv", "PinvAt", "APA", "data_scale"):
            setattr(out, name, fn(getattr(self, name)))
        return out

    @staticmethod
    def try_build(P: torch.Tensor | None, A: torch.Tensor) -> DualPrecomputation | None:
        """The precomputation if every ``P`` of the batch is positive definite and
        ``A`` has no more rows than columns (where the ``m``-space system is the
        smaller one); ``None`` otherwise. Costs one host sync; while torch.compile
        traces, where the choice cannot depend on the data, always ``None``."""
        if P is None or A.shape[1] == 0 or A.shape[1] > A.shape[2] or compiling():
            return None
        L, info = torch.linalg.cholesky_ex(P)
        if bool((info > 0).any()):
            return None
        return DualPrecomputation(P, A, L)


class DualKKTFactorization:
    """``K`` factorized through its ``m x m`` Schur complement (``P`` positive definite).

    Eliminating ``dx = P^-1 (rx - A'dz)`` leaves

        S dz = A P^-1 rx - rz,      S = A P^-1 A' + H,    H = [[0, 0], [0, W^2]]

    so each iteration factorizes only ``S`` (``m x m``, ``m <= n``), reusing ``P``'s
    Cholesky factor and ``A P^-1 A'`` from ``DualPrecomputation``.
    """

    def __init__(self, pre: DualPrecomputation, num_eq: int, scaling: Scaling, *, refine_steps: int, regularization: float):
        self.pre, self.P, self.A, self.p, self.scaling = pre, pre.P, pre.A, num_eq, scaling
        self.refine_steps = refine_steps
        self.eq_diag = None
        self.row_mask = None  # rows of A kept (None: all); see _exact._DualExact
        S = pre.APA
        mi = S.shape[1] - num_eq
        if mi > 0 and not scaling.w:  # orthant only: W^2 = diag(s / z)
            pad = torch.nn.functional.pad(scaling.lin.square(), (num_eq, 0))
            S = S + torch.diag_embed(pad)
        elif mi > 0:
            eye = torch.eye(mi, dtype=S.dtype, device=S.device).expand(S.shape[0], mi, mi)
            H = scaling.apply(scaling.apply(eye))  # W^2, column by column
            S = S.clone()
            S[:, num_eq:, num_eq:] += 0.5 * (H + H.transpose(1, 2))
        d = pre.data_scale  # the data's scale
        S = S + (regularization * d)[:, None, None] * torch.eye(S.shape[1], dtype=S.dtype, device=S.device)
        self.LS, self.info = _cholesky(S, regularization)

    matvec = KKTFactorization.matvec
    solve = KKTFactorization.solve

    def _solve_once(self, rx, rz):
        pre = self.pre
        t = torch.bmm(rx, pre.PinvAt)  # rows of A P^-1 rx
        if self.row_mask is not None:
            t = t * self.row_mask[:, None, :]
        y = torch.linalg.solve_triangular(self.LS, (t - rz).transpose(1, 2), upper=False)
        dz = torch.linalg.solve_triangular(self.LS.transpose(1, 2), y, upper=True).transpose(1, 2)
        dx = torch.bmm(rx - torch.bmm(dz, self.A), pre.Pinv)
        return dx, dz
