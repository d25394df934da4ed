"""BiCGStab for general (nonsymmetric) operators."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import _where, batch_dot, batch_norm
from ._linear import KrylovSolver, safe_divide
from ._solution import Status

__all__ = ["BiCGStab"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiCGStab(KrylovSolver):
    """Right-preconditioned BiCGStab (van der Vorst), batched.

    Solves ``A x = b`` for general nonsingular ``A`` with short recurrences: memory
    does not grow with the number of steps (unlike GMRES) at the cost of two matvecs
    per step, an erratic residual history and possible breakdowns. Use it for large
    nonsymmetric systems where the GMRES basis does not fit; prefer GMRES when
    robustness matters more than memory.

    Breakdown: when ``r_hat . r``, ``r_hat . A p`` or ``t . s`` (the stabilizing
    step's numerator) vanishes relative to the norms involved (below the dtype's
    machine epsilon), the recurrences would divide by zero: the sample keeps its last
    iterate and ends with ``Status.BREAKDOWN``, unless its residual already meets the
    tolerance. Restarting from that iterate, or GMRES, usually gets past it.

    The preconditioner ``M ~ A^-1`` is applied on the right, so the monitored
    residual is the true ``||b - A x||`` (kept up to date by recurrence).

    Args:
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> BiCGStab().solve(DenseOperator(A), b).value
        tensor([[0.3333, 0.3333]], dtype=torch.float64)

    References:
        van der Vorst, Bi-CGSTAB (1992), DOI 10.1137/0913035.
        Barrett et al., Templates for the Solution of Linear Systems (1994), Sec. 2.3.8,
        DOI 10.1137/1.9781611971538.
    """

    def _init(self, A, M, b, x):
        r = b - A.mv(x)
        one = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
        return {
            "x": x,
            "r": r,
            "r_hat": r,  # the shadow residual, fixed
            "p": torch.zeros_like(b),
            "v": torch.zeros_like(b),
            "rho": one,
            "alpha": one,
            "omega": one,
            "failure": torch.zeros(b.shape[0], dtype=torch.int64, device=b.device),
        }

    def _step(self, A, M, b, s):
        eps = torch.finfo(b.dtype).eps
        x, r, r_hat, p, v = s["x"], s["r"], s["r_hat"], s["p"], s["v"]
        r_hat_norm = batch_norm(r_hat)

        rho = batch_dot(r_hat, r)
        # (rho / rho_old) * (alpha / omega); omega == 0 was already reported below.
        beta = safe_divide(rho, s["rho"])[0] * safe_divide(s["alpha"], s["omega"])[0]
        p = r + beta[:, None] * (p - s["omega"][:, None] * v)
        p_hat = M.mv(p)
        v = A.mv(p_hat)
        rv = batch_dot(r_hat, v)
        alpha = safe_divide(rho, rv)[0]
        s_vec = r - alpha[:, None] * v
        s_hat = M.mv(s_vec)
        t = A.mv(s_hat)
        ts = batch_dot(t, s_vec)
        omega = safe_divide(ts, batch_dot(t, t))[0]
        new = {
            "x": x + alpha[:, None] * p_hat + omega[:, None] * s_hat,
            "r": s_vec - omega[:, None] * t,
            "r_hat": r_hat,
            "p": p,
            "v": v,
            "rho": rho,
            "alpha": alpha,
            "omega": omega,
            "failure": s["failure"],
        }
        # r_hat orthogonal to r or to A p: no BiCG step exists; nothing is updated.
        no_bicg = (rho.abs() <= eps * r_hat_norm * batch_norm(r)) | (rv.abs() <= eps * r_hat_norm * batch_norm(v))
        # t orthogonal to s: the stabilizing step is zero and the next beta would divide
        # by omega == 0. The half step x + alpha p_hat is still valid (and exact when
        # s == 0), so keep it before stopping.
        no_stab = ~no_bicg & (ts.abs() <= eps * batch_norm(t) * batch_norm(s_vec))
        half = dict(new, x=x + alpha[:, None] * p_hat, r=s_vec)
        new = _where(no_stab, half, new)
        failed = s["failure"] != 0
        new = _where(no_bicg | failed, s, new)
        new["failure"] = torch.where(no_bicg | no_stab, int(Status.BREAKDOWN), s["failure"])
        return new
