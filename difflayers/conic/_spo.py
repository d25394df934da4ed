"""SPO+: the convex surrogate of the decision regret of a linear program."""

from __future__ import annotations

import torch

from ._interior_point import InteriorPoint
from ._qp import solve_qp

__all__ = ["spo_plus_loss"]


def spo_plus_loss(
    c_hat: torch.Tensor,
    c: torch.Tensor,
    G: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    lb: torch.Tensor | None = None,
    ub: torch.Tensor | None = None,
    w_true: torch.Tensor | None = None,
    solver: InteriorPoint | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """SPO+ loss of predicted costs ``c_hat`` for the LP ``min_w c'w s.t. w in S``.

    With ``S = {w : G w <= h, A w = b, lb <= w <= ub}`` and ``w*(c)`` an optimal
    decision for the true cost ``c``,

        SPO+(c_hat, c) = max_{w in S} (c - 2 c_hat)'w + 2 c_hat'w*(c) - c'w*(c),

    a convex upper bound of the regret ``c'w*(c_hat) - c'w*(c)``. Its subgradient
    with respect to ``c_hat`` is ``2 (w*(c) - w*(2 c_hat - c))``: two LP solves, no
    derivative of a solver. Both LPs are solved with the batched interior point;
    pass ``w_true`` (``w*(c)``, e.g. precomputed for a training set) to skip the
    first.

    Args:
        c_hat: predicted costs ``[B, n]`` (or ``[n]``).
        c: true costs, same shape.
        G, h, A, b, lb, ub: the feasible set, batched or not (see ``QPLayer``).
        w_true: optional optimal decisions for ``c``.
        solver: an ``InteriorPoint``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.

    Returns:
        The loss (a scalar, or ``[B]`` with ``reduction="none"``).

    Raises:
        TypeError, ValueError: mismatched shapes, dtypes or devices of ``c_hat``, ``c``,
            ``w_true``; NaN/Inf costs; ``reduction="mean"`` over an empty batch.
        ConvergenceError: if an LP is infeasible or unbounded (SPO+ needs a bounded
            feasible set).

    Example:
        >>> import torch, difflayers as dl
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64)     # w1 + w2 <= 1, w >= 0
        >>> h = torch.ones(1, dtype=torch.float64)
        >>> lb = torch.zeros(2, dtype=torch.float64)
        >>> c = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
        >>> c_hat = torch.tensor([[-2.0, -1.0]], dtype=torch.float64, requires_grad=True)
        >>> loss = dl.conic.spo_plus_loss(c_hat, c, G, h, lb=lb)
        >>> round(loss.item(), 6)           # regret of c_hat's decision: 1.0
        3.0

    References:
        Elmachtoub and Grigas, Smart "Predict, then Optimize" (2022),
        arXiv:1710.08005.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"spo_plus_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if not isinstance(c_hat, torch.Tensor) or not isinstance(c, torch.Tensor):
        raise TypeError("spo_plus_loss: c_hat and c must be tensors.")
    if c_hat.shape != c.shape:
        raise ValueError(f"spo_plus_loss: c_hat {list(c_hat.shape)} and c {list(c.shape)} must have one shape.")
    if c.dim() not in (1, 2):
        raise ValueError(f"spo_plus_loss: c_hat and c must have shape [B, n] or [n]; got {list(c.shape)}.")
    if w_true is not None and (not isinstance(w_true, torch.Tensor) or w_true.shape != c.shape):
        got = list(w_true.shape) if isinstance(w_true, torch.Tensor) else type(w_true).__name__
        raise ValueError(f"spo_plus_loss: w_true must have the shape of c {list(c.shape)}; got {got}.")
    for name, t in (("c", c), ("w_true", w_true)):
        if t is not None and t.dtype != c_hat.dtype:
            raise TypeError(f"spo_plus_loss: {name} has dtype {t.dtype} but c_hat has {c_hat.dtype}; pass one dtype.")
        if t is not None and t.device != c_hat.device:
            raise ValueError(
                f"spo_plus_loss: {name} is on {t.device} but c_hat is on {c_hat.device}; move them to one device."
            )
    for name, t in (("c_hat", c_hat), ("c", c), ("w_true", w_true)):
        if t is not None and t.device.type != "meta" and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"spo_plus_loss: {name} contains NaN or Inf; clean the inputs before computing the loss.")
    if reduction == "mean" and c.dim() == 2 and c.shape[0] == 0:
        raise ValueError(
            "spo_plus_loss: the batch is empty (B = 0), so its mean is undefined; use reduction='sum' (0 for an "
            "empty batch) or 'none', or skip the call."
        )
    squeeze = c.dim() == 1
    if squeeze:
        c_hat, c = c_hat.unsqueeze(0), c.unsqueeze(0)
        w_true = None if w_true is None else w_true.unsqueeze(0)
    c = c.detach()

    def solve(cost):
        sol, _, _, _ = solve_qp(None, cost, G, h, A, b, lb=lb, ub=ub, solver=solver, on_failure="raise")
        return sol.value

    with torch.no_grad():
        if w_true is None:
            w_true = solve(c)
        w_tilde = solve(2.0 * c_hat.detach() - c)
    w_true = w_true.detach()
    # max_w (c - 2 c_hat)'w = -(2 c_hat - c)'w_tilde; autograd then gives the SPO+
    # subgradient 2 (w_true - w_tilde) with respect to c_hat
    loss = -((2.0 * c_hat - c) * w_tilde).sum(-1) + 2.0 * (c_hat * w_true).sum(-1) - (c * w_true).sum(-1)
    if squeeze and reduction == "none":
        return loss[0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
