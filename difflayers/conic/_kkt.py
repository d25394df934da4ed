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

import torch

from ._cone_algebra import ConeLayout, Scaling

__all__ = ["KKTFactorization"]


def _bmv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _bmtv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-2) @ A).squeeze(-2)


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
        M = G.transpose(1, 2) @ G
        if P is not None:
            M = M + P
        if num_eq > 0:
            # rho scales the equality block like the rest of M, so that neither dominates
            self.rho = (M.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1.0) / A_E.square().sum((1, 2)).clamp_min(1e-300)
                        * num_eq).clamp(1e-8, 1e8)
            M = M + self.rho[:, None, None] * (A_E.transpose(1, 2) @ A_E)
        diag = M.diagonal(dim1=1, dim2=2)
        eps = regularization * diag.abs().amax(-1).clamp_min(1.0)
        self.eps = eps
        M = M + eps[:, None, None] * torch.eye(n, dtype=A.dtype, device=A.device)
        self.L, info = torch.linalg.cholesky_ex(M)
        if num_eq > 0:
            Y = torch.cholesky_solve(A_E.transpose(1, 2), self.L)  # M^-1 A_E'
            S = A_E @ Y
            S = 0.5 * (S + S.transpose(1, 2))
            if eq_diag is not None:
                S = S + torch.diag_embed(eq_diag)
            Sd = S.diagonal(dim1=1, dim2=2).abs().amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
            S = S + (regularization * Sd)[:, None, None] * torch.eye(num_eq, dtype=A.dtype, device=A.device)
            self.LS, info_s = torch.linalg.cholesky_ex(S)
            info = torch.maximum(info, info_s)
        self.info = info  # > 0 where a factorization failed (that sample's step is NaN)

    # -- K and its regularized inverse -------------------------------------------------
    def matvec(self, dx: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K [dx; dz]`` with the exact (unregularized) ``K``."""
        top = _bmtv(self.A, dz)
        if self.P is not None:
            top = top + _bmv(self.P, dx)
        bottom = _bmv(self.A, dx)
        if self.eq_diag is not None:
            bottom = torch.cat([bottom[:, : self.p] - self.eq_diag * dz[:, : self.p], bottom[:, self.p :]], dim=1)
        if bottom.shape[1] > self.p:
            dz_I = dz[:, self.p :]
            h = self.scaling.apply(self.scaling.apply(dz_I))
            bottom = torch.cat([bottom[:, : self.p], bottom[:, self.p :] - h], dim=1)
        return top, bottom

    def _solve_once(self, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_E, r_I = rz[:, : self.p], rz[:, self.p :]
        sc = self.scaling
        w2r = sc.apply_inverse(sc.apply_inverse(r_I)) if r_I.shape[1] > 0 else r_I  # W^-2 r_I
        t = rx + _bmtv(self.A_I, w2r)
        if self.p > 0:
            t = t + self.rho[:, None] * _bmtv(self.A_E, r_E)
            u = torch.cholesky_solve(t.unsqueeze(-1), self.L).squeeze(-1)
            dz_E = torch.cholesky_solve((_bmv(self.A_E, u) - r_E).unsqueeze(-1), self.LS).squeeze(-1)
            dx = torch.cholesky_solve((t - _bmtv(self.A_E, dz_E)).unsqueeze(-1), self.L).squeeze(-1)
        else:
            dx = torch.cholesky_solve(t.unsqueeze(-1), self.L).squeeze(-1)
            dz_E = r_E
        if r_I.shape[1] > 0:
            dz_I = sc.apply_inverse(sc.apply_inverse(_bmv(self.A_I, dx))) - w2r
            dz = torch.cat([dz_E, dz_I], dim=1)
        else:
            dz = dz_E
        return dx, dz

    def solve(self, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``K [dx; dz] = [rx; rz]`` (``rx [B, n]``, ``rz [B, m]``), with refinement."""
        if self.eq_diag is not None:
            rz = torch.cat([rz[:, : self.p] * self.keep, rz[:, self.p :]], dim=1)
        dx, dz = self._solve_once(rx, rz)
        for _ in range(self.refine_steps):
            kx, kz = self.matvec(dx, dz)
            cx, cz = self._solve_once(rx - kx, rz - kz)
            dx, dz = dx + cx, dz + cz
        return dx, dz
