"""The KKT system of the *exact* derivative at a solution, factorized once.

At a solution the complementarity conditions ``s in K, z in K*, s'z = 0`` are the
Moreau decomposition ``z = Pi_K(v)``, ``s = Pi_K(v) - v`` of ``v = z - s``.
Differentiating it gives ``dz = DPi dv`` and ``ds = (DPi - I) dv``, i.e. a relation
``ds = -H dz`` whose eigen-directions are of three kinds:

* equality directions (``DPi = 1``: ``ds = 0``, the constraint is active),
* dropped directions (``DPi = 0``: ``dz = 0``, the constraint is inactive),
* finite directions (``0 < DPi < 1``, only on a second-order cone where both ``s``
  and ``z`` are nonzero boundary points): ``H = (1 - c) / (1 + c)`` with
  ``c = v0 / ||v1||``, i.e. ``H = sigma / zeta`` for ``s = sigma (1, -u)``,
  ``z = zeta (1, u)``.

On the orthant a row is an equality where ``z_i > s_i`` and dropped otherwise. A
second-order cone with ``v`` in ``K`` is all equalities, with ``v`` in ``-K`` all
dropped; otherwise it is rotated to the orthonormal basis ``(1, u)/sqrt 2`` (equality),
``(1, -u)/sqrt 2`` (dropped) and ``(0, w)``, ``w`` orthogonal to ``u`` (finite). With the
interior point's own scaling ``H = W^2`` instead, the gradient would carry an error of
the order of the last iterate's distance to the solution, and on a second-order cone
(where ``W`` depends on how the iterate approaches the boundary) even a constant
error.

References:
    Busseti, Moursi and Boyd, Solution refinement at regular points of conic problems
    (2019), arXiv:1811.02157; Agrawal et al., Differentiating through a cone program
    (2019), arXiv:1904.09043.
"""

from __future__ import annotations

import math

import torch

from ._cone_algebra import ConeLayout
from ._cones import Cones
from ._kkt import DualKKTFactorization, DualPrecomputation, KKTFactorization, _cholesky

__all__ = ["ExactKKT"]


def _rotation(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``Q [..., d, d]`` with columns ``(1, u)/sqrt2, (1, -u)/sqrt2, (0, w_j)``.

    ``u [..., d - 1]`` is a unit vector; the ``w_j`` complete it to an orthonormal
    basis (the columns 2.. of a Householder reflection that maps ``e1`` to ``+-u``).
    """
    d1 = u.shape[-1]
    e1 = torch.zeros_like(u)
    e1[..., 0] = 1.0
    flip = u[..., :1] > 0
    w = torch.where(flip, e1 + u, e1 - u)
    ww = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    house = torch.eye(d1, dtype=u.dtype, device=u.device) - 2.0 * w[..., :, None] * w[..., None, :] / ww[..., None]
    tangent = house[..., :, 1:]  # orthogonal to u, [..., d-1, d-2]
    r = 1.0 / math.sqrt(2.0)
    ones = torch.full_like(u[..., :1], r)
    first = torch.cat([ones, r * u], -1)
    second = torch.cat([ones, -r * u], -1)
    rest = torch.cat([torch.zeros_like(tangent[..., :1, :]), tangent], -2)
    return torch.cat([first[..., :, None], second[..., :, None], rest], -1)


class ExactKKT:
    """Factorized KKT system of the exact derivative at a solution ``(s, z)``.

    ``ratio`` moves the active-set threshold on the orthant (active where
    ``z_i > ratio * s_i``). ``solve(rx, rz)`` solves ``[[P, A'], [A, -H]] [dx; dz] = [rx; rz]`` with ``H`` the
    limit described in the module docstring (``dz = 0`` on dropped directions).
    Rows are in the interior point's grouped layout.
    """

    def __init__(
        self,
        P,
        A,
        cones: Cones,
        s,
        z,
        *,
        refine_steps: int,
        regularization: float,
        ratio: float = 1.0,
        pre: DualPrecomputation | None = None,
    ):
        p, l = cones.zero, cones.nonneg
        self.dual = None
        if pre is not None and not cones.soc:
            active = torch.cat([torch.ones_like(s[:, :p], dtype=torch.bool), z[:, p:] > ratio * s[:, p:]], 1)
            self.dual = _DualExact(pre, active, refine_steps=refine_steps, regularization=regularization)
            return
        batch, n = A.shape[0], A.shape[2]
        dtype = A.dtype
        self.p, self.l = p, l
        self.soc_layout = ConeLayout(Cones(soc=cones.soc), A.device)
        active = z[:, p : p + l] > ratio * s[:, p : p + l]
        eq_rows = [A[:, :p], A[:, p : p + l] * active[:, :, None].to(dtype)]
        eq_diag = [torch.zeros_like(s[:, :p]), (~active).to(dtype)]
        self.rotations = []
        fin_rows, fin_weight = [], []
        if cones.soc:
            _, s_soc = self.soc_layout.split(s[:, p + l :])
            _, z_soc = self.soc_layout.split(z[:, p + l :])
            _, A_soc = self.soc_layout.split(A[:, p + l :])
            eq_mask_parts, fin_parts, rot_rows, eq_part_rows = [], [], [], []
            for sc, zc, Ac in zip(s_soc, z_soc, A_soc):
                k, d = sc.shape[1], sc.shape[2]
                v = zc - sc
                v0 = v[..., 0]
                r = torch.linalg.vector_norm(v[..., 1:], dim=-1)
                in_K = r <= v0
                in_polar = r <= -v0
                mixed = ~in_K & ~in_polar
                eye = torch.eye(d, dtype=dtype, device=A.device).expand(batch, k, d, d)
                if d >= 2:
                    u = v[..., 1:] / torch.where(r > 0, r, 1.0)[..., None]
                    Q = torch.where(mixed[..., None, None], _rotation(u), eye)
                else:
                    Q = eye
                c = v0 / torch.where(r > 0, r, 1.0)
                weight = ((1.0 + c) / (1.0 - c).clamp_min(torch.finfo(dtype).tiny))  # H^-1 on tangents
                col = torch.arange(d, device=A.device)
                eq_mask = torch.where(mixed[..., None], col == 0, in_K[..., None].expand(batch, k, d))
                if self.soc_layout.real is not None:  # padding rows are dropped, never equalities
                    eq_mask = eq_mask & self.soc_layout.real
                fin = mixed[..., None] & (col >= 2)
                w_fin = torch.where(fin, weight[..., None], torch.zeros_like(sc))
                A_rot = Q.transpose(-1, -2) @ Ac  # [B, k, d, n]
                self.rotations.append(Q)
                eq_part_rows.append(A_rot * eq_mask[..., None].to(dtype))
                eq_mask_parts.append((~eq_mask).to(dtype))
                rot_rows.append(A_rot * fin[..., None].to(dtype))
                fin_parts.append(w_fin)
            cat = lambda parts: torch.cat([t.reshape(batch, -1, *t.shape[3:]) for t in parts], 1)  # noqa: E731
            eq_rows.append(cat(eq_part_rows))
            eq_diag.append(cat(eq_mask_parts))
            fin_rows.append(cat(rot_rows))
            fin_weight.append(cat(fin_parts))
        num_eq = sum(t.shape[1] for t in eq_rows)
        rows = eq_rows + fin_rows
        A_big = torch.cat(rows, 1) if rows else A.new_zeros(batch, 0, n)
        m_fin = sum(t.shape[1] for t in fin_rows)
        fin_layout = ConeLayout(Cones(nonneg=m_fin), A.device)
        if m_fin > 0:
            w = torch.cat(fin_weight, 1)
            self.fin_mask = w > 0
            # a diagonal scaling with W^-2 = w on finite rows and 1 on the (zero) others
            s_fin = torch.where(self.fin_mask, 1.0 / torch.where(self.fin_mask, w, 1.0), torch.ones_like(w))
            scaling = fin_layout.scaling(s_fin, torch.ones_like(w))
        else:
            self.fin_mask = None
            scaling = fin_layout.identity_scaling(batch, dtype, A.device)
        self.num_eq, self.m_fin = num_eq, m_fin
        self.kkt = KKTFactorization(
            P,
            A_big,
            num_eq,
            scaling,
            refine_steps=refine_steps,
            regularization=regularization,
            eq_diag=torch.cat(eq_diag, 1),
        )

    def _rotate(self, r_soc: torch.Tensor) -> torch.Tensor:
        """Cone rows (user layout) -> rotated coordinates, flattened blocks (padded)."""
        _, blocks = self.soc_layout.split(r_soc)
        out = [(Q.transpose(-1, -2) @ blk[..., None])[..., 0] for Q, blk in zip(self.rotations, blocks)]
        return torch.cat([t.reshape(t.shape[0], -1) for t in out], 1)

    def _unrotate(self, r_rot: torch.Tensor) -> torch.Tensor:
        """Rotated coordinates (flattened blocks) -> cone rows in the user layout."""
        blocks, start = [], 0
        for Q in self.rotations:
            k, d = Q.shape[1], Q.shape[2]
            blk = r_rot[:, start : start + k * d].reshape(r_rot.shape[0], k, d)
            blocks.append((Q @ blk[..., None])[..., 0])
            start += k * d
        return self.soc_layout.join(r_rot[:, :0], blocks)

    def solve(self, rx: torch.Tensor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dual is not None:
            return self.dual.solve(rx, rz)
        p, l = self.p, self.l
        parts = [rz[:, : p + l]]
        if self.rotations:
            r_rot = self._rotate(rz[:, p + l :])
            parts += [r_rot, torch.where(self.fin_mask, r_rot, 0.0) if self.fin_mask is not None else r_rot[:, :0]]
        dx, dz_big = self.kkt.solve(rx, torch.cat(parts, 1))
        dz = dz_big[:, : p + l]
        if self.rotations:
            m_rot = r_rot.shape[1]
            dz_rot = dz_big[:, p + l : p + l + m_rot]
            if self.m_fin > 0:
                dz_rot = dz_rot + dz_big[:, p + l + m_rot :]
            dz = torch.cat([dz, self._unrotate(dz_rot)], 1)
        return dx, dz


class _DualExact(DualKKTFactorization):
    """The exact-derivative system of an LP/QP with positive definite ``P`` in ``m``-space.

    With ``A_act`` the rows of ``A`` on the active set (others zero) and ``D`` = 1 on
    the dropped rows, ``dz = (A_act P^-1 A_act' + D)^-1 (A_act P^-1 rx - rz)`` and
    ``dx = P^-1 (rx - A_act' dz)``, reusing ``P^-1`` and ``A P^-1 A'`` of the solve.
    """

    def __init__(self, pre: DualPrecomputation, active: torch.Tensor, *, refine_steps: int, regularization: float):
        act = active.to(pre.A.dtype)
        self.pre, self.P, self.A, self.p = pre, pre.P, pre.A * act[:, :, None], active.shape[1]
        self.scaling, self.refine_steps = None, refine_steps
        self.row_mask, self.keep, self.eq_diag = act, act, 1.0 - act
        S = act[:, :, None] * pre.APA * act[:, None, :]
        S = S + torch.diag_embed(self.eq_diag + regularization * pre.data_scale[:, None])
        self.LS, self.info = _cholesky(S, regularization)
