"""Soft sorting and ranking through an optimal transport plan to sorted anchors."""

from __future__ import annotations

import torch

from ..implicit import Adjoint, Implicit
from ..solvers._precision import to_compute, to_output
from ._api import sinkhorn
from ._sinkhorn import Sinkhorn

__all__ = ["soft_sort", "soft_rank"]


def _plan_to_anchors(x: torch.Tensor, epsilon: float, m: int | None, solver, adjoint):
    """Plan between ``x`` (squashed to ``(0, 1)``) and ``m`` sorted anchors in ``[0, 1]``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("soft_sort/soft_rank: x must be a floating-point tensor.")
    batched = x.dim() == 2
    if x.dim() not in (1, 2):
        raise ValueError(f"soft_sort/soft_rank: x must be [n] or [B, n], got {list(x.shape)}.")
    x = to_compute(x)  # 16-bit values are sorted in float32 (the callers cast back)
    xb = x if batched else x[None]
    n = xb.shape[1]
    m = n if m is None else m
    if n < 2 or (not isinstance(m, int) or m < 2):
        raise ValueError(f"soft_sort/soft_rank: need at least two values and two anchors; got n = {n}, m = {m!r}.")
    if xb.shape[0] == 0:  # an empty batch: an empty plan
        return xb, xb.new_zeros(0, n, m), batched, n, m
    # standardize, then squash into (0, 1): the anchors' scale is independent of x's
    z = (xb - xb.mean(1, keepdim=True)) / xb.std(1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)
    u = torch.sigmoid(z)
    anchors = torch.linspace(0.0, 1.0, m, dtype=x.dtype, device=x.device).expand(xb.shape[0], m)
    cost = (u[:, :, None] - anchors[:, None, :]).square()
    # small epsilons are the point here: scale epsilon down from the cost's scale
    solver = Sinkhorn(rtol=1e-7, atol=1e-10, max_steps=20000, epsilon_scaling=0.5) if solver is None else solver
    res = sinkhorn(cost=cost, epsilon=epsilon, solver=solver, adjoint=Implicit() if adjoint is None else adjoint)
    return xb, res.plan, batched, n, m


def soft_sort(
    x: torch.Tensor,
    *,
    epsilon: float = 1e-2,
    m: int | None = None,
    solver: Sinkhorn | None = None,
    adjoint: Adjoint | None = None,
) -> torch.Tensor:
    """A differentiable, increasing "sort" of ``x`` (``[n]`` or ``[B, n]``).

    The values are squashed to ``(0, 1)`` and transported to ``m`` (default ``n``)
    uniform anchors ``0 = t_1 < ... < t_m = 1`` with the entropic plan ``P``; the soft
    sorted values are the barycenters ``S_j = sum_i P_ij x_i / b_j``. As ``epsilon ->
    0`` they tend to the sorted values (for ``m = n``).

    Args:
        x: values, ``[n]`` or ``[B, n]``.
        epsilon: entropic regularization, in the squashed units (``(0, 1)``).
        m: number of outputs (quantiles); ``None``: ``n``.
        solver: a ``Sinkhorn`` (default: ``rtol=1e-7``, ``max_steps=20000``,
            ``epsilon_scaling=0.5``; small epsilons converge slowly).
        adjoint: ``Implicit()`` (default) or ``Unroll()``.

    Returns:
        ``[m]`` or ``[B, m]`` soft sorted values, in ``x``'s dtype (float16 and
        bfloat16 are computed in float32 and cast back).

    References:
        Cuturi, Teboul and Vert, Differentiable Ranks and Sorting using Optimal
        Transport (2019), arXiv:1905.11885.
    """
    xb, plan, batched, n, m = _plan_to_anchors(x, epsilon, m, solver, adjoint)
    out = torch.bmm(plan.transpose(1, 2), xb[:, :, None])[:, :, 0] * m
    return to_output(out if batched else out[0], x.dtype)


def soft_rank(
    x: torch.Tensor,
    *,
    epsilon: float = 1e-2,
    m: int | None = None,
    solver: Sinkhorn | None = None,
    adjoint: Adjoint | None = None,
) -> torch.Tensor:
    """Differentiable ranks of ``x`` in ``[1, n]`` (``[n]`` or ``[B, n]``).

    With the plan ``P`` of ``soft_sort`` and the anchors' cumulative weights
    ``c_j = j / m``, the soft rank is ``R_i = n * sum_j P_ij c_j / a_i`` (``a_i = 1 / n``);
    as ``epsilon -> 0`` it tends to the rank of ``x_i`` (1 for the smallest).

    Args:
        x, epsilon, m, solver, adjoint: as in ``soft_sort``.

    Returns:
        Soft ranks shaped like ``x``, in its dtype (float16 and bfloat16 are computed
        in float32 and cast back).

    References:
        Cuturi, Teboul and Vert, Differentiable Ranks and Sorting using Optimal
        Transport (2019), arXiv:1905.11885.
    """
    xb, plan, batched, n, m = _plan_to_anchors(x, epsilon, m, solver, adjoint)
    cumulative = torch.arange(1, m + 1, dtype=xb.dtype, device=x.device) / m
    ranks = n * n * torch.bmm(plan, cumulative.expand(xb.shape[0], m)[:, :, None])[:, :, 0]
    return to_output(ranks if batched else ranks[0], x.dtype)
