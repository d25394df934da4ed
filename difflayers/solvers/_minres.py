"""MINRES for symmetric, possibly indefinite, operators."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import _where, batch_dot
from ._linear import KrylovSolver, safe_divide
from ._solution import Status

__all__ = ["MINRES"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MINRES(KrylovSolver):
    """Preconditioned MINRES (Paige-Saunders), batched.

    Solves ``A x = b`` for symmetric ``A`` that may be indefinite (saddle points, KKT
    systems, Hessians away from a minimum) by minimizing ``||b - A x||`` over the
    Krylov space with short Lanczos recurrences: memory and cost per step stay those
    of CG, one matvec and one preconditioner application. Use CG when ``A`` is also
    positive definite (cheaper, same convergence), GMRES when it is not symmetric.

    The preconditioner ``M ~ A^-1`` must be symmetric positive definite (MINRES
    minimizes the residual in the ``M``-norm); a negative ``r^T M r`` ends that sample
    with ``Status.BREAKDOWN``. The stopping rule uses the 2-norm of ``b - A x``, kept
    up to date by recurrence, so it is the same rule as for every other linear solver.
    On a singular, inconsistent system MINRES stagnates at the least-squares residual
    and stops with ``Status.MAX_STEPS``.

    Args:
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> b = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> MINRES().solve(DenseOperator(A, symmetric=True), b).value
        tensor([[0.2000, 0.4000]], dtype=torch.float64)

    References:
        Paige & Saunders, Solution of sparse indefinite systems of linear equations
        (1975), DOI 10.1137/0712047.
        Choi, Paige & Saunders, MINRES-QLP (2011), DOI 10.1137/100787921.
    """

    def _init(self, A, M, b, x):
        r = b - A.mv(x)
        y = M.mv(r)
        beta_sq = batch_dot(r, y)
        failure = torch.where(beta_sq < 0, int(Status.BREAKDOWN), 0)  # M is not positive definite
        beta = beta_sq.clamp_min(0).sqrt()
        zero = torch.zeros_like(beta)
        zeros = torch.zeros_like(b)
        return {
            "x": x,
            "r": r,  # the true residual b - A x, updated by recurrence
            "r1": r,  # the Lanczos vectors before preconditioning, two steps
            "r2": r,
            "y": y,
            "beta": beta,
            "oldb": zero,
            "dbar": zero,
            "epsln": zero,
            "phibar": beta,
            "cs": -torch.ones_like(beta),
            "sn": zero,
            "w": zeros,  # search directions (columns of V R^-1), two steps
            "w2": zeros,
            "Aw": zeros,  # and their images under A, which update r without a matvec
            "Aw2": zeros,
            "failure": failure.to(torch.int64),
        }

    def _step(self, A, M, b, s):
        beta, oldb, r1, r2 = s["beta"], s["oldb"], s["r1"], s["r2"]
        # Lanczos step on the preconditioned operator: v is the new basis vector.
        v = safe_divide(s["y"], beta[:, None])[0]
        Av = A.mv(v)
        y = Av - safe_divide(beta, oldb)[0][:, None] * r1  # oldb == 0 on the first step
        alfa = batch_dot(v, y)
        y = y - safe_divide(alfa, beta)[0][:, None] * r2
        r1, r2 = r2, y
        y = M.mv(r2)
        beta_sq = batch_dot(r2, y)
        new_beta = beta_sq.clamp_min(0).sqrt()

        # Apply the previous Givens rotation to the new column of the tridiagonal
        # matrix, then compute the rotation that annihilates its subdiagonal entry.
        cs, sn, dbar = s["cs"], s["sn"], s["dbar"]
        oldeps = s["epsln"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * new_beta
        dbar = -cs * new_beta
        gamma = torch.hypot(gbar, new_beta)
        cs, singular = safe_divide(gbar, gamma)
        sn = safe_divide(new_beta, gamma)[0]
        phi = cs * s["phibar"]
        phibar = sn * s["phibar"]

        inv_gamma = safe_divide(torch.ones_like(gamma), gamma)[0][:, None]
        w = (v - oldeps[:, None] * s["w2"] - delta[:, None] * s["w"]) * inv_gamma
        Aw = (Av - oldeps[:, None] * s["Aw2"] - delta[:, None] * s["Aw"]) * inv_gamma
        new = {
            "x": s["x"] + phi[:, None] * w,
            "r": s["r"] - phi[:, None] * Aw,
            "r1": r1,
            "r2": r2,
            "y": y,
            "beta": new_beta,
            "oldb": beta,
            "dbar": dbar,
            "epsln": epsln,
            "phibar": phibar,
            "cs": cs,
            "sn": sn,
            "w": w,
            "w2": s["w"],
            "Aw": Aw,
            "Aw2": s["Aw"],
            "failure": s["failure"],
        }
        # beta == 0 on entry: the Krylov space is invariant, the last step was exact
        # (the driver reports SUCCESS if the residual agrees). gamma == 0: A is singular
        # on the Krylov space. r^T M r < 0: M is not positive definite. In each case the
        # sample keeps its last valid state and reports BREAKDOWN unless converged.
        stop = (beta == 0) | singular | (beta_sq < 0)
        failure = torch.where(stop, int(Status.BREAKDOWN), s["failure"])
        new = _where(stop | (s["failure"] != 0), s, new)
        new["failure"] = failure
        return new
