"""Diagnostics returned with every hypergradient, and the warm-start state."""

from __future__ import annotations

import dataclasses

import torch

from ..solvers import Status
from ._tree import Tree

__all__ = ["HypergradientInfo", "WarmStart"]


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """What the next outer step can reuse: pass ``state=info.state`` back to
    ``hypergradient``.

    Attributes:
        w: the inner solution (or last inner iterate), used as the next inner starting point.
        adjoint: the adjoint vector ``v`` ``[B, n]`` of the last linear solve (the initial
            guess of the next Krylov solve), or ``None``.
    """

    w: Tree
    adjoint: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class HypergradientInfo:
    """Diagnostics of one hypergradient estimate. Per-problem tensors have shape ``[B]``
    (``B = 1`` unbatched).

    Attributes:
        estimator: the estimator used.
        value: the outer objective ``f(w, lam)`` at the inner solution (shape of ``outer``'s output).
        w: the inner solution (or the last inner iterate for unrolled estimators), detached.
        inner_residual: ``||G(w, lam)||``, the norm of the inner optimality condition
            (the inner gradient norm for an objective).
        inner_steps: inner iterations taken.
        inner_status: ``Status`` codes of the inner solve.
        linear_residual: ``||df/dw - (dG/dw)^T v||`` of the adjoint solve (implicit
            estimators), else ``None``.
        linear_steps: iterations of the adjoint solve, else ``None``.
        linear_status: ``Status`` codes of the adjoint solve, else ``None``.
        state: ``WarmStart`` for the next call.
        checked: whether the inner and linear statuses were required to be SUCCESS
            (estimators that rely on a converged inner solution or adjoint).
        extra: estimator-specific diagnostics (e.g. the penalized solve of ``Penalty``).
    """

    estimator: object
    value: torch.Tensor
    w: Tree
    inner_residual: torch.Tensor
    inner_steps: torch.Tensor
    inner_status: torch.Tensor
    linear_residual: torch.Tensor | None
    linear_steps: torch.Tensor | None
    linear_status: torch.Tensor | None
    state: WarmStart
    checked: bool = True
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def converged(self) -> torch.Tensor:
        """``[B]`` bool: inner (and linear, where there is one) solves succeeded."""
        ok = self.inner_status == int(Status.SUCCESS)
        if self.linear_status is not None:
            ok = ok & (self.linear_status == int(Status.SUCCESS))
        return ok

    def describe(self) -> str:
        """One line: estimator, outer value, residuals and iterations (synchronizes once)."""
        def worst(residual, steps, status):
            if residual.numel() == 0:  # an empty batch: nothing was solved
                return "(empty batch)"
            return (f"{float(residual.max()):.2e} ({int(steps.max())} steps, "
                    f"{Status(int(status.max())).name})")

        parts = [
            self.estimator.describe(),
            f"outer {float(self.value.detach().sum()):.6g}",
            f"inner residual {worst(self.inner_residual, self.inner_steps, self.inner_status)}",
        ]
        if self.linear_residual is not None:
            parts.append(
                f"linear residual {worst(self.linear_residual, self.linear_steps, self.linear_status)}"
            )
        return ", ".join(parts)
