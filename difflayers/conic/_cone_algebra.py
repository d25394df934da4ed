"""Jordan algebra, Nesterov-Todd scaling and step lengths on ``R_+^l x SOC(d_1) x ...``.

The interior-point method works on the inequality rows only (the zero cone has no
slack). Internally those rows are stored *grouped*: first the ``l`` orthant rows,
then, for each distinct second-order-cone dimension ``d``, its ``k`` cones as one
contiguous block viewed as ``[B, k, d]``. ``ConeLayout`` holds the permutation from
the user's row order to that grouped order, so every operation below is a handful
of batched tensor operations, with no Python loop over cones or samples.

Conventions (Vandenberghe, "The CVXOPT linear and quadratic cone program solvers",
2010): for ``s, z`` in the interior, the Nesterov-Todd scaling ``W`` is symmetric
positive definite with ``W z = W^{-1} s = lambda``. For the orthant ``W = diag(sqrt(s /
z))``; for a second-order cone ``W = eta [[w0, w1'], [w1, I + w1 w1' / (1 + w0)]]`` with
``w = (s_bar + J z_bar) / (2 gamma)`` built from the normalized ``s, z``.
"""

from __future__ import annotations

import torch

from ._cones import Cones

__all__ = ["ConeLayout", "Scaling"]


def _expand(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """View per-cone data ``[B, k, ...]`` so that it broadcasts against ``v``."""
    return w.reshape(w.shape + (1,) * (v.dim() - w.dim()))


def _jnorm2(u: torch.Tensor) -> torch.Tensor:
    """``u'J u = (u0 - ||u1||)(u0 + ||u1||)`` per cone, kept positive."""
    r = torch.linalg.vector_norm(u[..., 1:], dim=-1)
    return ((u[..., 0] - r) * (u[..., 0] + r)).clamp_min(torch.finfo(u.dtype).tiny)


class ConeLayout:
    """Grouped row layout of the inequality part of a cone.

    Args:
        cones: the cone sizes.
        device: where the permutation lives.
    """

    def __init__(self, cones: Cones, device: torch.device | None = None):
        self.cones = cones
        self.l = cones.nonneg
        self.mi = cones.num_inequality
        dims = list(dict.fromkeys(cones.soc))  # distinct dims, first-seen order
        self.groups = [(d, sum(1 for c in cones.soc if c == d)) for d in dims]
        starts, offset = [], self.l
        for d in cones.soc:
            starts.append(offset)
            offset += d
        order = list(range(self.l))
        for d, _ in self.groups:
            for start, c in zip(starts, cones.soc):
                if c == d:
                    order.extend(range(start, start + d))
        self.padded = None
        self.real = None  # [k, d] bool: which padded entries are real rows
        msoc, dmax = sum(cones.soc), max(cones.soc, default=0)
        if len(self.groups) > 1 and len(cones.soc) * dmax <= 2 * msoc:
            # Cones of different sizes become one block padded with zeros to the
            # largest size (zero entries leave the algebra of a cone unchanged): one
            # batched operation per step instead of one per distinct size.
            k = len(cones.soc)
            gather = torch.full((k, dmax), msoc, dtype=torch.long)
            offset = 0
            for i, d in enumerate(cones.soc):
                gather[i, :d] = torch.arange(offset, offset + d)
                offset += d
            self.real = (gather < msoc).to(device)
            scatter = torch.nonzero(gather.flatten() < msoc).flatten()
            self.padded = (gather.flatten().to(device), scatter.to(device))
            self.groups = [(dmax, k)]
            order = list(range(self.mi))
        if order == list(range(self.mi)):
            self.perm = self.inverse = None
        else:
            perm = torch.tensor(order, dtype=torch.long, device=device)
            self.perm = perm
            self.inverse = torch.argsort(perm)

    # -- row order -------------------------------------------------------------------
    def to_grouped(self, v: torch.Tensor) -> torch.Tensor:
        """Reorder inequality rows (dim 1) from the user's order to the grouped order."""
        return v if self.perm is None else v.index_select(1, self.perm.to(v.device))

    def from_grouped(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.inverse is None else v.index_select(1, self.inverse.to(v.device))

    # -- blocks ----------------------------------------------------------------------
    def split(self, v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``v [B, mi, ...] -> (orthant part [B, l, ...], [cones [B, k, d, ...] per group])``."""
        rest = v.shape[2:]
        lin = v[:, : self.l]
        if self.padded is not None:
            (d, k), (gather, _) = self.groups[0], self.padded
            soc = torch.cat([v[:, self.l :], v.new_zeros((v.shape[0], 1) + rest)], dim=1)
            return lin, [soc.index_select(1, gather.to(v.device)).reshape(v.shape[0], k, d, *rest)]
        socs, start = [], self.l
        for d, k in self.groups:
            socs.append(v[:, start : start + k * d].reshape(v.shape[0], k, d, *rest))
            start += k * d
        return lin, socs

    def join(self, lin: torch.Tensor, socs: list[torch.Tensor]) -> torch.Tensor:
        parts = [lin] + [c.reshape(c.shape[0], -1, *c.shape[3:]) for c in socs]
        if self.padded is not None:
            parts[1] = parts[1].index_select(1, self.padded[1].to(lin.device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else lin

    # -- Jordan algebra ----------------------------------------------------------------
    def identity(self, batch: int, dtype, device) -> torch.Tensor:
        """The identity element ``e``: ones on the orthant, ``(1, 0, ..., 0)`` per cone."""
        e = torch.zeros(batch, self.mi, dtype=dtype, device=device)
        lin, socs = self.split(e)
        lin = lin + 1.0
        socs = [torch.nn.functional.pad(torch.ones_like(c[..., :1]), (0, c.shape[-1] - 1)) for c in socs]
        return self.join(lin, socs)

    def product(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Jordan product ``u o v``: elementwise on the orthant, ``(u'v, u0 v1 + v0 u1)`` per cone."""
        if not self.groups:
            return u * v
        ul, us = self.split(u)
        vl, vs = self.split(v)
        out = [
            torch.cat([(a * c).sum(-1, keepdim=True), a[..., :1] * c[..., 1:] + c[..., :1] * a[..., 1:]], dim=-1)
            for a, c in zip(us, vs)
        ]
        return self.join(ul * vl, out)

    def divide(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``u o\\ v``: the ``w`` with ``u o w = v``, for ``u`` in the interior."""
        if not self.groups:
            return v / u
        ul, us = self.split(u)
        vl, vs = self.split(v)
        out = []
        for a, c in zip(us, vs):
            a0, a1, c0, c1 = a[..., :1], a[..., 1:], c[..., :1], c[..., 1:]
            det = a0 * a0 - (a1 * a1).sum(-1, keepdim=True)
            w0 = (a0 * c0 - (a1 * c1).sum(-1, keepdim=True)) / det
            out.append(torch.cat([w0, (c1 - w0 * a1) / a0], dim=-1))
        return self.join(vl / ul, out)

    def min_eigenvalue(self, u: torch.Tensor) -> torch.Tensor:
        """Smallest Jordan eigenvalue over all cones, per sample ``[B]`` (``+inf`` if ``mi = 0``)."""
        ul, us = self.split(u)
        parts = [ul]
        for c in us:
            parts.append(c[..., 0] - torch.linalg.vector_norm(c[..., 1:], dim=-1))
        flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        if flat.shape[1] == 0:
            return torch.full((u.shape[0],), float("inf"), dtype=u.dtype, device=u.device)
        return flat.min(dim=1).values

    def max_step(self, u: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
        """Largest ``alpha >= 0`` with ``u + alpha du`` in the cone, per sample (may be ``inf``).

        On the orthant ``alpha = min(-u_i / du_i)`` over ``du_i < 0``. On a second-order
        cone ``lambda_min(u + alpha du) = (u0 + alpha du0) - ||u1 + alpha du1||`` is concave
        in ``alpha``, so the boundary is the smallest positive root of
        ``a alpha^2 + 2 b alpha + c`` with ``a = du'J du``, ``b = u'J du``, ``c = u'J u > 0``.
        """
        inf = torch.tensor(float("inf"), dtype=u.dtype, device=u.device)
        ul, us = self.split(u)
        dl, ds = self.split(du)
        parts = [torch.where(dl < 0, -ul / dl, inf)]
        for c, dc in zip(us, ds):
            if c.shape[-1] == 1:  # a one-dimensional cone is a ray: t >= 0
                parts.append(torch.where(dc[..., 0] < 0, -c[..., 0] / dc[..., 0], inf))
                continue
            a = dc[..., 0] ** 2 - (dc[..., 1:] ** 2).sum(-1)
            b = c[..., 0] * dc[..., 0] - (c[..., 1:] * dc[..., 1:]).sum(-1)
            cc = (c[..., 0] ** 2 - (c[..., 1:] ** 2).sum(-1)).clamp_min(0.0)
            disc = b * b - a * cc
            # a tangent line has disc = 0; rounding must not turn it into "no root"
            disc = torch.where(disc.abs() <= 1e-12 * (b * b + (a * cc).abs()), torch.zeros_like(disc), disc)
            root = torch.sqrt(disc.clamp_min(0.0))
            qq = -(b + torch.where(b >= 0, root, -root))
            r1 = torch.where(a != 0, qq / torch.where(a != 0, a, 1.0), inf)
            r2 = torch.where(qq != 0, cc / torch.where(qq != 0, qq, 1.0), inf)
            r1 = torch.where(r1 > 0, r1, inf)
            r2 = torch.where(r2 > 0, r2, inf)
            alpha = torch.where(disc >= 0, torch.minimum(r1, r2), inf)
            parts.append(alpha)
        flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        if flat.shape[1] == 0:
            return torch.full((u.shape[0],), float("inf"), dtype=u.dtype, device=u.device)
        return flat.min(dim=1).values

    def scaling(self, s: torch.Tensor, z: torch.Tensor) -> Scaling:
        """Nesterov-Todd scaling at interior ``s, z`` (both ``[B, mi]``)."""
        return Scaling(self, s, z)

    def identity_scaling(self, batch: int, dtype, device) -> Scaling:
        e = self.identity(batch, dtype, device)
        return Scaling(self, e, e)


class Scaling:
    """The Nesterov-Todd scaling ``W`` at ``(s, z)`` and ``lambda = W z``.

    For each second-order cone with ``J = diag(1, -I)``:
    ``s_bar = s / sqrt(s'Js)``, ``z_bar = z / sqrt(z'Jz)``,
    ``gamma = sqrt((1 + z_bar's_bar) / 2)``, ``w = (s_bar + J z_bar) / (2 gamma)``,
    ``eta = (s'Js / z'Jz)^(1/4)``.
    """

    def __init__(self, layout: ConeLayout, s: torch.Tensor, z: torch.Tensor):
        self.layout = layout
        sl, ss = layout.split(s)
        zl, zs = layout.split(z)
        self.lin = torch.sqrt(sl / zl)  # W on the orthant
        self.eta, self.w = [], []
        for sc, zc in zip(ss, zs):
            sj = _jnorm2(sc)
            zj = _jnorm2(zc)
            sb = sc / torch.sqrt(sj).unsqueeze(-1)
            zb = zc / torch.sqrt(zj).unsqueeze(-1)
            gamma = torch.sqrt((1.0 + (sb * zb).sum(-1)) / 2.0)
            w = sb.clone()
            w[..., :1] = w[..., :1] + zb[..., :1]
            w[..., 1:] = w[..., 1:] - zb[..., 1:]
            w = w / (2.0 * gamma).unsqueeze(-1)
            self.eta.append((sj / zj) ** 0.25)
            self.w.append(w)
        self.lam = self.apply(z)

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        if not self.w:  # orthant only: a diagonal scaling
            lin = self.lin if v.dim() == 2 else self.lin.unsqueeze(-1)
            return v / lin if inverse else v * lin
        vl, vs = self.layout.split(v)
        lin = _expand(self.lin, vl)
        out_l = vl / lin if inverse else vl * lin
        out = []
        for eta, w, c in zip(self.eta, self.w, vs):
            w = _expand(w, c) if c.dim() > w.dim() else w
            eta = _expand(eta, c[:, :, 0])
            w0, w1 = w[:, :, :1], w[:, :, 1:]
            c0, c1 = c[:, :, :1], c[:, :, 1:]
            w1c1 = (w1 * c1).sum(2, keepdim=True)
            if inverse:
                o0 = w0 * c0 - w1c1
                o1 = c1 + (w1c1 / (1.0 + w0) - c0) * w1
                scale = 1.0 / eta
            else:
                o0 = w0 * c0 + w1c1
                o1 = c1 + (w1c1 / (1.0 + w0) + c0) * w1
                scale = eta
            out.append(torch.cat([o0, o1], dim=2) * scale.unsqueeze(2))
        return self.layout.join(out_l, out)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``W v`` for ``v`` of shape ``[B, mi]`` or ``[B, mi, r]``."""
        return self._apply(v, inverse=False)

    def apply_inverse(self, v: torch.Tensor) -> torch.Tensor:
        """``W^{-1} v`` for ``v`` of shape ``[B, mi]`` or ``[B, mi, r]``."""
        return self._apply(v, inverse=True)
