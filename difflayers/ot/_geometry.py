"""Costs of optimal-transport problems: a dense matrix, or point clouds whose cost is
computed on the fly in row tiles so that memory stays ``O(B * tile * m)``.

Everything the Sinkhorn iterations need is a soft-minimum over one side,

    rows:  LSE_j(h_j - C_ij / eps)   [B, n]        cols:  LSE_i(h_i - C_ij / eps)   [B, m]

and, for gradients and plans, sums of ``P_ij * (something)`` over tiles.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["Geometry", "COSTS", "pnorm_cost", "matvec", "rmatvec"]


def matvec(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K v`` for ``K [B, n, m]``, ``v [B, m]``, as ``v' K'``: the row-vector form maps to
    a fast BLAS kernel where ``bmm(K, v[..., None])`` is several times slower on CPU."""
    return torch.bmm(v[:, None, :], k.transpose(1, 2))[:, 0]


def rmatvec(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``K' u`` for ``K [B, n, m]``, ``u [B, n]``."""
    return torch.bmm(u[:, None, :], k)[:, 0]


def _sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # ||x||^2 + ||y||^2 - 2 x.y, clamped: rounding must not make a distance negative
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1).unsqueeze(-2)
    return (xx + yy - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0.0)


def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y)


def pnorm_cost(p: float, power: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The cost ``c(x, y) = ||x - y||_p ** power`` as a ``cost_fn`` for point clouds.

    Args:
        p: the norm, ``p >= 1`` (``float("inf")`` for the maximum norm).
        power: exponent applied to the distance, ``> 0``.

    Example:
        >>> import torch, difflayers as dl
        >>> x, y = torch.rand(20, 2, dtype=torch.float64), torch.rand(25, 2, dtype=torch.float64)
        >>> res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.05, cost_fn=dl.ot.pnorm_cost(1.0))   # cityblock
    """
    if not (isinstance(p, (int, float)) and p >= 1):
        raise ValueError(f"pnorm_cost: p must be a number >= 1 (or inf), got {p!r}.")
    if not (isinstance(power, (int, float)) and 0 < power < float("inf")):
        raise ValueError(f"pnorm_cost: power must be a finite number > 0, got {power!r}.")

    def cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, y, p=float(p))
        return d if power == 1.0 else d**power

    cost.__name__ = f"pnorm_cost(p={p}, power={power})"
    return cost


COSTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sqeuclidean": _sqeuclidean,
    "euclidean": _euclidean,
}


class Geometry:
    """The cost of a batch of transport problems.

    Args:
        cost: a dense ``[B, n, m]`` cost, or ``None``.
        x, y: point clouds ``[B, n, d]``, ``[B, m, d]`` (with ``cost=None``).
        cost_fn: ``(x [B, t, d], y [B, m, d]) -> [B, t, m]``.
        tile: rows of the cost computed at a time for point clouds; ``None`` uses
            the whole matrix when it holds at most ``2**24`` entries.
    """

    def __init__(self, cost=None, x=None, y=None, cost_fn=None, tile: int | None = None):
        self.cost, self.x, self.y, self.cost_fn = cost, x, y, cost_fn
        self._whole = {}  # grad mode -> the point-cloud cost, when one tile covers it
        self._scaled = {}  # (grad mode, eps) -> C / eps
        if cost is not None:
            self.batch, self.n, self.m = cost.shape
            self.tile = self.n
        else:
            self.batch, self.n, self.m = x.shape[0], x.shape[1], y.shape[1]
            if tile is None:
                tile = self.n if self.batch * self.n * self.m <= 2**24 else max(1, 2**24 // (self.batch * self.m))
            self.tile = max(1, min(int(tile), self.n))

    def tiles(self):
        """Yield ``(start, stop, C[:, start:stop])``."""
        if self.cost is not None:
            yield 0, self.n, self.cost
            return
        if self.tile >= self.n:  # small enough: computed once per grad mode, then reused
            mode = torch.is_grad_enabled()
            if mode not in self._whole:
                self._whole[mode] = self.cost_fn(self.x, self.y)
            yield 0, self.n, self._whole[mode]
            return
        for start in range(0, self.n, self.tile):
            stop = min(start + self.tile, self.n)
            yield start, stop, self.cost_fn(self.x[:, start:stop], self.y)

    def dense(self) -> torch.Tensor:
        """The full ``[B, n, m]`` cost (materialized for point clouds)."""
        return torch.cat([c for _, _, c in self.tiles()], dim=1)

    def _scaled_tiles(self, eps):
        """Tiles of ``C / eps``; with a constant ``eps`` (a float) and one tile, the
        scaled matrix is computed once and reused by every iteration."""
        if isinstance(eps, float) and (self.cost is not None or self.tile >= self.n):
            key = (torch.is_grad_enabled(), eps)
            if key not in self._scaled:
                self._scaled.clear()
                (_, _, c), = self.tiles()
                self._scaled[key] = c / eps
            yield 0, self.n, self._scaled[key]
            return
        inv = 1.0 / eps if isinstance(eps, float) else (1.0 / eps)[:, None, None]
        for start, stop, c in self.tiles():
            yield start, stop, c * inv

    def lse_rows(self, h_cols: torch.Tensor, eps) -> torch.Tensor:
        """``LSE_j(h_j - C_ij / eps)``, shape ``[B, n]`` (``eps``: a float or ``[B]``)."""
        parts = [torch.logsumexp(h_cols[:, None, :] - c, dim=2) for _, _, c in self._scaled_tiles(eps)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def lse_cols(self, h_rows: torch.Tensor, eps) -> torch.Tensor:
        """``LSE_i(h_i - C_ij / eps)``, shape ``[B, m]``, accumulated over row tiles."""
        total = None
        for start, stop, c in self._scaled_tiles(eps):
            part = torch.logsumexp(h_rows[:, start:stop, None] - c, dim=1)
            total = part if total is None else torch.logaddexp(total, part)
        return total
