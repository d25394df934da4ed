"""Restarted GMRES for general (nonsymmetric) operators."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import _where, batch_norm
from ._linear import KrylovSolver, safe_divide
from ._operator import IdentityOperator
from ._solution import Status

__all__ = ["GMRES"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(KrylovSolver):
    """Restarted GMRES(m) with right preconditioning, batched.

    Solves ``A x = b`` for any nonsingular ``A`` by minimizing ``||b - A x||`` over a
    Krylov space built by Arnoldi; the basis is restarted after ``restart`` vectors to
    bound memory (``[B, restart + 1, n]``) and cost per step. Use it for
    nonsymmetric operators such as ``I - dT/dz`` of a fixed-point layer; prefer CG
    (symmetric positive definite) or MINRES (symmetric) where they apply, since they
    need no basis.

    Right preconditioning solves ``A M u = b`` and returns ``x = M u`` with
    ``M ~ A^-1``, so the residual GMRES minimizes and monitors is the true
    ``||b - A x||`` whatever ``M`` is (``M`` need not be symmetric).

    Each driver step costs one matvec: either one Arnoldi step, or, once ``restart``
    vectors have been built, a restart that recomputes the true residual
    ``b - A x`` and starts a new basis from it. ``stats["num_steps"]`` therefore
    counts matvecs, and the reported residual is the Arnoldi estimate
    ``|g_{j+1}|`` of ``||b - A x||`` (exact in exact arithmetic), or the true residual
    right after a restart.

    Implementation: orthogonalization is classical Gram-Schmidt with one
    re-orthogonalization pass (as stable as modified Gram-Schmidt, and made of
    batched matrix products instead of a loop over the basis). The Givens rotations
    that reduce the Hessenberg matrix to triangular form are accumulated into one
    orthogonal matrix ``Q``, so that rotating a new column is one product rather than
    a loop whose length would depend on each sample's position in its cycle. The
    current iterate is formed at every step from the small triangular system, so a
    sample can stop at any step. A new column that adds nothing (``A`` singular on
    the Krylov space, e.g. a zero operator) ends the sample with
    ``Status.BREAKDOWN``; a singular inconsistent system usually stagnates and ends
    with ``Status.MAX_STEPS``.

    Args:
        restart: Krylov basis size ``m`` between restarts (>= 1).
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> GMRES().solve(DenseOperator(A), b).value
        tensor([[0.3333, 0.3333]], dtype=torch.float64)

    References:
        Saad & Schultz, GMRES (1986), DOI 10.1137/0907058.
        Giraud, Langou & Rozloznik, The loss of orthogonality in the Gram-Schmidt
        orthogonalization process (2005), DOI 10.1016/j.camwa.2005.08.009.
    """

    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an int >= 1, got {self.restart!r}.")

    def _cycle_start(self, x, r, preconditioned):
        """State at the start of a restart cycle from the iterate ``x`` and ``b - A x``."""
        batch, n = x.shape
        m = self.restart
        beta = batch_norm(r)
        V = x.new_zeros(batch, m + 1, n)
        V[:, 0] = safe_divide(r, beta[:, None])[0]
        state = {
            "x": x,
            "x_cycle": x,
            "V": V,
            "Q": torch.eye(m + 1, dtype=x.dtype, device=x.device).expand(batch, m + 1, m + 1).clone(),
            "R": x.new_zeros(batch, m, m),
            "beta": beta,
            "j": torch.zeros(batch, dtype=torch.int64, device=x.device),
            "res": beta,
        }
        if preconditioned:
            state["Z"] = x.new_zeros(batch, m, n)  # M v_j, the directions x moves along
        return state

    def _init(self, A, M, b, x):
        state = self._cycle_start(x, b - A.mv(x), not isinstance(M, IdentityOperator))
        state["failure"] = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        return state

    def _residual_norm(self, state):
        return state["res"]

    def _step(self, A, M, b, s):
        m = self.restart
        preconditioned = "Z" in s
        V, Q, R, j = s["V"], s["Q"], s["R"], s["j"]
        dtype = V.dtype
        restart = j == m
        jc = j.clamp(max=m - 1)  # the Arnoldi branch is discarded where restart holds
        e_j = torch.nn.functional.one_hot(jc, m + 1).to(dtype)
        e_next = torch.nn.functional.one_hot(jc + 1, m + 1).to(dtype)
        col_j = torch.nn.functional.one_hot(jc, m).to(dtype)

        # One matvec serves both branches: A x for a restart, A M v_j for Arnoldi.
        v_j = torch.einsum("bk,bkn->bn", e_j, V)
        z_j = M.mv(v_j) if preconditioned else v_j
        Au = A.mv(torch.where(restart[:, None], s["x"], z_j))

        # Arnoldi: orthogonalize A z_j against v_0..v_j. Rows of V past j are zero, so
        # products with the whole of V only see the current basis.
        w = Au
        h = torch.einsum("bkn,bn->bk", V, w)
        w = w - torch.einsum("bkn,bk->bn", V, h)
        h2 = torch.einsum("bkn,bn->bk", V, w)
        w = w - torch.einsum("bkn,bk->bn", V, h2)
        h_next = batch_norm(w)
        V_new = V + e_next[:, :, None] * safe_divide(w, h_next[:, None])[0][:, None, :]
        column = h + h2 + e_next * h_next[:, None]

        # Rotate the new Hessenberg column by all previous rotations (accumulated in Q),
        # then annihilate its subdiagonal entry with a new rotation on rows j, j + 1.
        c = torch.einsum("bik,bk->bi", Q, column)
        a = (e_j * c).sum(-1)
        sub = (e_next * c).sum(-1)
        gamma = torch.hypot(a, sub)
        eps = torch.finfo(dtype).eps
        no_progress = gamma <= eps * batch_norm(column)
        cs = safe_divide(a, gamma)[0][:, None]
        sn = safe_divide(sub, gamma)[0][:, None]
        q_j = torch.einsum("bk,bkl->bl", e_j, Q)
        q_next = torch.einsum("bk,bkl->bl", e_next, Q)
        Q_new = (
            Q
            + e_j[:, :, None] * (cs * q_j + sn * q_next - q_j)[:, None, :]
            + e_next[:, :, None] * (-sn * q_j + cs * q_next - q_next)[:, None, :]
        )
        c = c + e_j * (gamma - a)[:, None] - e_next * sub[:, None]
        R_new = R + c[:, :m, None] * col_j[:, None, :]
        g = s["beta"][:, None] * Q_new[:, :, 0]  # Q (beta e_1): the rotated right-hand side
        res = (e_next * g).sum(-1).abs()

        # Least-squares solution over the first j + 1 columns; the unused part of R is
        # replaced by the identity and of g by zeros, which gives y_i = 0 there.
        used = torch.arange(m, device=j.device)[None, :] <= jc[:, None]
        R_solve = R_new + torch.diag_embed((~used).to(dtype))
        y = torch.linalg.solve_triangular(R_solve, (g[:, :m] * used)[:, :, None], upper=True)[:, :, 0]
        arnoldi = {
            "x_cycle": s["x_cycle"],
            "V": V_new,
            "Q": Q_new,
            "R": R_new,
            "beta": s["beta"],
            "j": j + 1,
            "res": res,
        }
        if preconditioned:
            arnoldi["Z"] = s["Z"] + col_j[:, :, None] * z_j[:, None, :]
            arnoldi["x"] = s["x_cycle"] + torch.einsum("bkn,bk->bn", arnoldi["Z"], y)
        else:
            arnoldi["x"] = s["x_cycle"] + torch.einsum("bkn,bk->bn", V_new[:, :m], y)

        new = _where(restart, self._cycle_start(s["x"], b - Au, preconditioned), arnoldi)
        # A column with nothing new: A is singular on the Krylov space (or the residual
        # is already zero, in which case the driver reports SUCCESS). Keep the last state.
        stop = ~restart & no_progress
        failed = s["failure"] != 0
        new["failure"] = s["failure"]
        new = _where(stop | failed, s, new)
        new["failure"] = torch.where(stop, int(Status.BREAKDOWN), s["failure"])
        return new
