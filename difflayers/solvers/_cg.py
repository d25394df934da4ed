"""Conjugate gradients for symmetric positive definite operators."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import batch_dot
from ._linear import KrylovSolver
from ._solution import Status

__all__ = ["CG"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(KrylovSolver):
    """Preconditioned conjugate gradients, batched.

    Solves ``A x = b`` for symmetric positive definite ``A`` (and a symmetric
    positive definite preconditioner ``M ~ A^-1``). A non-positive curvature
    ``p^T A p <= 0`` shows that ``A`` is not positive definite: that sample stops with
    ``Status.BREAKDOWN`` (use MINRES for symmetric indefinite operators).

    Args:
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> CG().solve(DenseOperator(A, symmetric=True, positive_definite=True), b).value
        tensor([[0.0909, 0.6364]], dtype=torch.float64)

    References:
        Hestenes & Stiefel (1952), DOI 10.6028/jres.049.044.
    """

    def _init(self, A, M, b, x):
        r = b - A.mv(x)
        z = M.mv(r)
        failure = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        return {"x": x, "r": r, "p": z, "rz": batch_dot(r, z), "failure": failure}

    def _step(self, A, M, b, s):
        p, r, rz = s["p"], s["r"], s["rz"]
        Ap = A.mv(p)
        pAp = batch_dot(p, Ap)
        # Few, fused operations: on small systems CG is bound by per-operation overhead.
        curved = pAp > 0
        alpha = torch.where(curved, rz.detach() / torch.where(curved, pAp.detach(), 1.0), 0.0)
        # rz == 0 means r == 0 already: not a breakdown, just nothing left to do.
        breakdown = ~curved & (rz != 0)
        x = torch.addcmul(s["x"], alpha[:, None], p)
        r = torch.addcmul(r, alpha[:, None], Ap, value=-1.0)
        z = M.mv(r)
        rz_new = batch_dot(r, z)
        nonzero = rz != 0
        beta = torch.where(nonzero, rz_new.detach() / torch.where(nonzero, rz.detach(), 1.0), 0.0)
        failure = torch.where(breakdown, int(Status.BREAKDOWN), s["failure"])
        return {"x": x, "r": r, "p": torch.addcmul(z, beta[:, None], p), "rz": rz_new, "failure": failure}
